// The two ways audio travels. Where the browser has WebCodecs audio (AudioEncoder and
// AudioDecoder that take Opus), Kyutai's own format: Ogg Opus pages in 0x01 messages,
// written and read here. Elsewhere, 16-bit PCM in 0x81 messages (the page then asks the
// server for `audio=pcm`, and the server answers in PCM too).

import { OggOpusWriter, OggReader, parseOpusHead } from "./ogg.js";
import { encodeAudio, encodePcm } from "./protocol.js";
import { MODEL_RATE } from "./audio.js";

const BASE_ENCODER_CONFIG = {
  codec: "opus", sampleRate: MODEL_RATE, numberOfChannels: 1, bitrate: 32000,
};
// 20 ms packets as Kyutai's clients send; browsers that do not know the Opus options get
// their default frame (also 20 ms in Chromium), and the granule positions follow the
// packets' real durations either way.
const ENCODER_CONFIGS = [
  { ...BASE_ENCODER_CONFIG, opus: { frameDuration: 20000, application: "voip" } },
  { ...BASE_ENCODER_CONFIG, opus: { frameDuration: 20000 } },
  BASE_ENCODER_CONFIG,
];
const DECODER_CONFIG = { codec: "opus", sampleRate: 48000, numberOfChannels: 1 };

/** The encoder settings this browser takes when it can encode and decode Opus with
 * WebCodecs; null when it cannot (the page then uses PCM). */
export async function webCodecsOpus() {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") return null;
  try {
    if (!(await AudioDecoder.isConfigSupported(DECODER_CONFIG)).supported) return null;
    for (const config of ENCODER_CONFIGS) {
      if ((await AudioEncoder.isConfigSupported(config)).supported) return config;
    }
  } catch {
    // a browser that throws on the question has no usable Opus either
  }
  return null;
}

const bytesOf = (data) => (ArrayBuffer.isView(data)
  ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  : new Uint8Array(data));

/** Microphone frames out as Ogg Opus: `send(frame)` with 20 ms at 24 kHz; `emit(message)`
 * gets each websocket message (the two header pages first, then one page per packet). */
export class OpusSender {
  constructor(config, emit, onError) {
    this.emit = emit;
    this.timestamp = 0;
    this.ogg = null;
    this.encoder = new AudioEncoder({
      output: (chunk, metadata) => this.#packet(chunk, metadata),
      error: (e) => onError(`audio encoder: ${e.message}`),
    });
    this.encoder.configure(config);
  }

  send(frame) {
    if (this.encoder.state !== "configured") return;
    const data = new AudioData({
      format: "f32",
      sampleRate: MODEL_RATE,
      numberOfFrames: frame.length,
      numberOfChannels: 1,
      timestamp: this.timestamp,
      data: frame,
    });
    this.timestamp += Math.round((frame.length / MODEL_RATE) * 1e6);
    this.encoder.encode(data);
    data.close();
  }

  #packet(chunk, metadata) {
    if (!this.ogg) {
      // The encoder's own OpusHead (when it gives one) knows its pre-skip.
      const description = metadata?.decoderConfig?.description;
      const head = description ? parseOpusHead(bytesOf(description)) : null;
      this.ogg = new OggOpusWriter({ preSkip: head ? head.preSkip : 312, inputRate: MODEL_RATE });
      this.emit(encodeAudio(this.ogg.headers()));
    }
    const bytes = new Uint8Array(chunk.byteLength);
    chunk.copyTo(bytes);
    const samples48k = Math.round(((chunk.duration ?? 20000) / 1e6) * 48000);
    this.emit(encodeAudio(this.ogg.packet(bytes, samples48k)));
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

/** The server's Ogg Opus stream in: `receive(bytes)` with each 0x01 payload; `play(samples,
 * rate)` gets the decoded voice, the pre-skip dropped. */
export class OpusReceiver {
  constructor(play, onError) {
    this.play = play;
    this.onError = onError;
    this.ogg = new OggReader();
    this.decoder = null;
    this.skip = 0;
    this.timestamp = 0;
    this.headers = 0;
  }

  receive(bytes) {
    for (const packet of this.ogg.push(bytes)) {
      if (packet.first) {
        // A new stream (the server's encoder started afresh): its own headers follow.
        this.close();
        this.decoder = null;
        this.headers = 0;
      }
      if (this.headers < 2) {
        // OpusHead then OpusTags
        if (this.headers === 0) this.#open(packet.data);
        this.headers++;
        continue;
      }
      if (!this.decoder || this.decoder.state !== "configured") continue;
      this.decoder.decode(new EncodedAudioChunk({
        type: "key",
        timestamp: this.timestamp,
        data: packet.data,
      }));
      this.timestamp += 20000;
    }
  }

  #open(headPacket) {
    const head = parseOpusHead(headPacket);
    if (!head) {
      this.onError("the server's audio does not start with an Opus header");
      return;
    }
    this.skip = head.preSkip; // in 48 kHz samples
    this.decoder = new AudioDecoder({
      output: (data) => this.#output(data),
      error: (e) => this.onError(`audio decoder: ${e.message}`),
    });
    this.decoder.configure({ ...DECODER_CONFIG, description: headPacket });
  }

  #output(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    const rate = data.sampleRate;
    data.close();
    const drop = Math.min(samples.length, Math.round((this.skip * rate) / 48000));
    this.skip -= Math.round((drop * 48000) / rate);
    this.play(samples.subarray(drop), rate);
  }

  close() {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
  }
}

/** Microphone frames out as 0x81 PCM messages. */
export class PcmSender {
  constructor(emit) {
    this.emit = emit;
  }

  send(frame) {
    for (const message of encodePcm(frame)) this.emit(message);
  }

  close() {}
}

/** The server's 0x81 PCM in. */
export class PcmReceiver {
  constructor(play) {
    this.play = play;
  }

  receive(samples) {
    this.play(samples, MODEL_RATE);
  }

  close() {}
}
