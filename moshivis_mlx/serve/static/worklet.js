// Audio worklet processors (run on the audio thread; loaded by audio.js).
//   capture: posts the microphone's samples to the page in blocks of about 10 ms (its
//            output stays silent)
//   player:  plays the model's voice from a queue of blocks at the context's rate, one
//            continuous stream (separate buffer sources click at every seam), and posts
//            what it played (sample count, sum of squares, peak), what is queued and
//            the underruns

class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = [];
    this.size = 0;
    this.want = Math.round(sampleRate / 100);
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      this.block.push(channel.slice());
      this.size += channel.length;
      if (this.size >= this.want) {
        const out = new Float32Array(this.size);
        let at = 0;
        for (const part of this.block) {
          out.set(part, at);
          at += part.length;
        }
        this.port.postMessage(out, [out.buffer]);
        this.block = [];
        this.size = 0;
      }
    }
    return true;
  }
}

class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.lead = Math.round(options.processorOptions.lead * sampleRate);
    this.queue = [];
    this.offset = 0; // into queue[0]
    this.queued = 0;
    this.playing = false;
    this.underruns = 0;
    this.quanta = 0;
    this.report = { samples: 0, sumSquares: 0, peak: 0 };
    this.port.onmessage = ({ data }) => {
      if (data === "clear") {
        this.queue = [];
        this.offset = 0;
        this.queued = 0;
        this.playing = false;
      } else {
        this.queue.push(data);
        this.queued += data.length;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    let n = 0;
    if (!this.playing && this.queued >= this.lead && this.queued > 0) this.playing = true;
    if (this.playing) {
      while (n < out.length && this.queue.length) {
        const block = this.queue[0];
        const take = Math.min(out.length - n, block.length - this.offset);
        out.set(block.subarray(this.offset, this.offset + take), n);
        n += take;
        this.offset += take;
        this.queued -= take;
        if (this.offset === block.length) {
          this.queue.shift();
          this.offset = 0;
        }
      }
      if (n < out.length) { // ran dry: wait for `lead` again before playing on
        this.playing = false;
        this.underruns++;
      }
    }
    out.fill(0, n);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    const r = this.report;
    for (let i = 0; i < n; i++) {
      r.sumSquares += out[i] * out[i];
      if (Math.abs(out[i]) > r.peak) r.peak = Math.abs(out[i]);
    }
    r.samples += n;
    if (++this.quanta % 16 === 0) { // about every 40 ms at 48 kHz
      this.port.postMessage({ ...r, queued: this.queued, underruns: this.underruns });
      this.report = { samples: 0, sumSquares: 0, peak: 0 };
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
