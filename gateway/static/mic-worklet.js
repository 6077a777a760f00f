// AudioWorklet processor: microphone -> 16-bit PCM frames at the target rate.
//
// Runs on the audio rendering thread. It mixes the input down to mono, resamples it
// from the AudioContext's rate to `targetRate` with a windowed-sinc low-pass
// interpolator (no aliasing when going 48 kHz -> 16 kHz), and posts one Int16Array of
// `frameMs` milliseconds at a time to the main thread (its buffer is transferred),
// together with the frame's peak level (0..1) for the level meter.

const PHASES = 256; // sub-sample positions of the precomputed kernel

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    // Cut off a little below the lower Nyquist frequency.
    const fc = 0.92 * Math.min(1, outRate / inRate); // in cycles per input sample * 2
    this.half = Math.ceil(8 / fc); // kernel half-width in input samples
    const taps = 2 * this.half;
    this.taps = taps;
    this.table = new Float32Array(PHASES * taps);
    for (let p = 0; p < PHASES; p++) {
      const frac = p / PHASES;
      let sum = 0;
      for (let k = 0; k < taps; k++) {
        const u = k - this.half + 1 - frac; // distance from the output position
        const x = fc * u;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const w = 0.5 + 0.5 * Math.cos((Math.PI * u) / (this.half + 1)); // Hann window
        const h = sinc * w;
        this.table[p * taps + k] = h;
        sum += h;
      }
      for (let k = 0; k < taps; k++) this.table[p * taps + k] /= sum; // unity DC gain
    }
    this.buf = new Float32Array(4096);
    this.len = this.half; // start with `half` zeros of history
    this.pos = this.half; // input position (in buf) of the next output sample
  }

  // Appends `input` and calls emit(sample) for every output sample it can compute.
  push(input, emit) {
    if (this.len + input.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.len + input.length));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const { buf, table, taps, half, step } = this;
    while (this.pos + half < this.len) {
      const base = Math.floor(this.pos);
      const phase = Math.min(PHASES - 1, Math.round((this.pos - base) * PHASES));
      const start = base - half + 1; // first input sample under the kernel
      const row = phase * taps;
      let acc = 0;
      for (let k = 0; k < taps; k++) acc += buf[start + k] * table[row + k];
      emit(acc);
      this.pos += step;
    }
    // Drop input no later output needs.
    const keep = Math.floor(this.pos) - half + 1;
    if (keep > 0) {
      buf.copyWithin(0, keep, this.len);
      this.len -= keep;
      this.pos -= keep;
    }
  }
}

class MicProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    const frameMs = opts.frameMs || 20;
    this.frameLen = Math.round((this.outRate * frameMs) / 1000);
    this.resampler = this.outRate === sampleRate ? null : new Resampler(sampleRate, this.outRate);
    this.mono = new Float32Array(128);
    this.newFrame();
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "stop") this.running = false;
    };
    this.emit = (s) => {
      if (s > 1) s = 1;
      else if (s < -1) s = -1;
      const a = s < 0 ? -s : s;
      if (a > this.peak) this.peak = a;
      this.frame[this.n++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
      if (this.n === this.frameLen) {
        this.port.postMessage({ pcm: this.frame, peak: this.peak }, [this.frame.buffer]);
        this.newFrame();
      }
    };
  }

  newFrame() {
    this.frame = new Int16Array(this.frameLen);
    this.n = 0;
    this.peak = 0;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0) return true; // not connected (yet)
    const len = input[0].length;
    if (this.mono.length !== len) this.mono = new Float32Array(len);
    const mono = this.mono;
    if (input.length === 1) {
      mono.set(input[0]);
    } else {
      mono.fill(0);
      for (const ch of input) for (let i = 0; i < len; i++) mono[i] += ch[i];
      for (let i = 0; i < len; i++) mono[i] /= input.length;
    }
    if (this.resampler) this.resampler.push(mono, this.emit);
    else for (let i = 0; i < len; i++) this.emit(mono[i]);
    return true;
  }
}

registerProcessor("s2s-mic", MicProcessor);
