// The page's sound: the microphone (with the browser's echo cancellation, noise suppression
// and gain control, cut into 20 ms frames at 24 kHz) and the model's voice (24 kHz blocks
// scheduled back to back on the audio context, through a meter that reports what played).

import { Framer, Resampler, rms } from "./resample.js";

export const MODEL_RATE = 24000;
export const FRAME_SAMPLES = 480; // 20 ms at 24 kHz: what the page sends per audio packet

/** The page's one audio context, made inside a user gesture (Safari and Chromium's
 * autoplay rules), with the worklets loaded. */
export async function openAudio() {
  // iOS: a recording session plays through the loudspeaker even with the ringer off.
  if (navigator.audioSession) navigator.audioSession.type = "play-and-record";
  const context = new AudioContext({ latencyHint: "interactive" });
  const resumed = context.resume(); // at once, while the click still counts (Safari)
  await context.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
  await resumed;
  return context;
}

/**
 * The microphone: `onFrame(Float32Array(480))` gets each 20 ms at 24 kHz, `level` the
 * last block's RMS. Muting disables the track, so the browser delivers silence and the
 * conversation keeps its pace (the model hears nothing rather than a gap).
 */
export class Microphone {
  static async open(context, onFrame) {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: true,
        noiseSuppression: true,
        autoGainControl: true,
        channelCount: 1,
      },
    });
    return new Microphone(context, stream, onFrame);
  }

  constructor(context, stream, onFrame) {
    this.stream = stream;
    this.level = 0;
    this.source = context.createMediaStreamSource(stream);
    // Its output is silence, connected so that every browser runs it (WebKit renders
    // only what leads to the destination).
    this.node = new AudioWorkletNode(context, "capture", { outputChannelCount: [1] });
    const resampler = new Resampler(context.sampleRate, MODEL_RATE);
    const framer = new Framer(FRAME_SAMPLES);
    this.node.port.onmessage = ({ data }) => {
      this.level = rms(data);
      for (const frame of framer.push(resampler.push(data))) onFrame(frame);
    };
    this.source.connect(this.node);
    this.node.connect(context.destination);
  }

  set muted(value) {
    for (const track of this.stream.getAudioTracks()) track.enabled = !value;
  }

  get muted() {
    return this.stream.getAudioTracks().every((t) => !t.enabled);
  }

  close() {
    this.node.port.onmessage = null;
    this.source.disconnect();
    this.node.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
  }
}

/**
 * The model's voice: blocks of samples at any rate, converted to the context's rate by
 * one resampler per source rate (continuous across blocks) and queued on the player
 * worklet. Playback starts `lead` seconds after the first block, so that network jitter
 * does not cut the voice; running dry counts an underrun and waits for `lead` again.
 */
export class Player {
  constructor(context, { lead = 0.08 } = {}) {
    this.context = context;
    this.resamplers = new Map();
    this.underruns = 0;
    this.queued = 0;
    this.scheduled = { samples: 0, seconds: 0, sumSquares: 0 };
    this.played = { samples: 0, sumSquares: 0, peak: 0 };
    this.node = new AudioWorkletNode(context, "player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { lead },
    });
    this.node.port.onmessage = ({ data }) => {
      this.played.samples += data.samples;
      this.played.sumSquares += data.sumSquares;
      this.played.peak = Math.max(this.played.peak, data.peak);
      this.queued = data.queued;
      this.underruns = data.underruns;
    };
    this.node.connect(context.destination);
  }

  /** Seconds of voice queued ahead of what is playing now. */
  get buffered() {
    return this.queued / this.context.sampleRate;
  }

  play(samples, rate) {
    if (!samples.length) return;
    if (!this.resamplers.has(rate)) {
      this.resamplers.set(rate, new Resampler(rate, this.context.sampleRate));
    }
    const block = this.resamplers.get(rate).push(samples);
    if (block.length) this.node.port.postMessage(block, [block.buffer]);
    this.scheduled.samples += samples.length;
    this.scheduled.seconds += samples.length / rate;
    let sum = 0;
    for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
    this.scheduled.sumSquares += sum;
  }

  /** Silences what is queued (a restart). */
  stop() {
    this.node.port.postMessage("clear");
    this.resamplers.clear();
  }

  close() {
    this.stop();
    this.node.port.onmessage = null;
    this.node.disconnect();
  }
}
