// Streaming sample-rate conversion for the microphone (the audio context runs at the
// device's rate, 44.1 or 48 kHz; the model takes 24 kHz) and helpers on float samples.

const HALF_TAPS = 12; // kernel half-width in output samples: ~0.5 ms at 24 kHz

/**
 * A windowed-sinc resampler fed in blocks of any size: `push(samples)` returns the
 * output samples those inputs complete. The low-pass sits at the lower of the two
 * Nyquist rates, so downsampling does not fold the band above 12 kHz into the voice.
 */
export class Resampler {
  constructor(fromRate, toRate) {
    this.step = fromRate / toRate; // input samples per output sample
    this.cutoff = Math.min(1, toRate / fromRate); // in cycles per input sample, times 2
    this.half = Math.ceil(HALF_TAPS / this.cutoff); // half-width in input samples
    this.history = new Float32Array(this.half); // zeros before the first sample
    this.position = this.half; // of the next output sample, in history's coordinates
    this.identity = fromRate === toRate;
  }

  push(samples) {
    if (this.identity) return Float32Array.from(samples);
    const buf = new Float32Array(this.history.length + samples.length);
    buf.set(this.history, 0);
    buf.set(samples, this.history.length);
    const out = [];
    while (this.position + this.half < buf.length) {
      const centre = Math.floor(this.position);
      let acc = 0;
      let norm = 0;
      for (let k = centre - this.half + 1; k <= centre + this.half; k++) {
        const t = this.position - k;
        const w = kernel(t * this.cutoff) * hann(t / (this.half + 1));
        acc += buf[k] * w;
        norm += w;
      }
      out.push(norm > 0 ? acc / norm : 0);
      this.position += this.step;
    }
    const drop = Math.max(0, Math.floor(this.position) - this.half);
    this.history = buf.slice(drop);
    this.position -= drop;
    return Float32Array.from(out);
  }
}

const kernel = (x) => (x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x));
const hann = (x) => (Math.abs(x) >= 1 ? 0 : 0.5 + 0.5 * Math.cos(Math.PI * x));

/** Cuts a stream of samples into blocks of exactly `size`. */
export class Framer {
  constructor(size) {
    this.size = size;
    this.pending = new Float32Array(0);
  }

  push(samples) {
    const all = new Float32Array(this.pending.length + samples.length);
    all.set(this.pending, 0);
    all.set(samples, this.pending.length);
    const frames = [];
    let at = 0;
    for (; at + this.size <= all.length; at += this.size) {
      frames.push(all.slice(at, at + this.size));
    }
    this.pending = all.slice(at);
    return frames;
  }
}

export function rms(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  return samples.length ? Math.sqrt(sum / samples.length) : 0;
}
