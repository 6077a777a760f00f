// Microphone capture and gapless reply playback on one AudioContext.

/** Why the microphone could not be opened, in words a user can act on. */
export class MicError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind; // "denied" | "missing" | "busy" | "insecure" | "unsupported" | "other"
  }
}

function micError(err) {
  const name = (err && err.name) || "";
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new MicError("denied",
      "Microphone access was denied. Allow the microphone for this site " +
      "(the icon in the address bar), then press Start again.");
  }
  if (name === "NotFoundError" || name === "DevicesNotFoundError" || name === "OverconstrainedError") {
    return new MicError("missing", "No microphone was found. Plug one in, then press Start again.");
  }
  if (name === "NotReadableError" || name === "TrackStartError" || name === "AbortError") {
    return new MicError("busy",
      "The microphone could not be started: another application may be using it.");
  }
  return new MicError("other", `The microphone could not be opened (${name || err}).`);
}

/**
 * Captures the microphone through an AudioWorklet and calls onFrame(Int16Array, peak)
 * with ~20 ms frames of 16-bit PCM at `targetRate`.
 */
export class Mic {
  constructor(ctx, { targetRate = 16000, frameMs = 20, onFrame, onEnded } = {}) {
    this.ctx = ctx;
    this.targetRate = targetRate;
    this.frameMs = frameMs;
    this.onFrame = onFrame || (() => {});
    this.onEnded = onEnded || (() => {});
    this.stream = null;
    this.node = null;
    this.source = null;
  }

  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicError("insecure",
        "This page cannot use the microphone: open it over https:// or from http://localhost.");
    }
    if (!this.ctx.audioWorklet || typeof AudioWorkletNode === "undefined") {
      throw new MicError("unsupported", "This browser lacks AudioWorklet; use a current Chrome or Firefox.");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1,
          echoCancellation: true, // keep the assistant's own voice out of the microphone
          // Off: its artifacts cost the speech recognizer words (measured on
          // tests/data/jfk.wav: "ask not" became "asked not"); Whisper copes with noise.
          noiseSuppression: false,
          autoGainControl: true,
        },
        video: false,
      });
    } catch (err) {
      throw micError(err);
    }
    await this.ctx.audioWorklet.addModule(new URL("./mic-worklet.js", import.meta.url));
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "s2s-mic", {
      numberOfInputs: 1,
      numberOfOutputs: 0, // a sink: processed without being connected to the destination
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
      processorOptions: { targetRate: this.targetRate, frameMs: this.frameMs },
    });
    this.node.port.onmessage = (e) => this.onFrame(e.data.pcm, e.data.peak);
    this.source.connect(this.node);
    for (const track of this.stream.getAudioTracks()) {
      track.addEventListener("ended", () => this.onEnded());
    }
  }

  get label() {
    const track = this.stream && this.stream.getAudioTracks()[0];
    return track ? track.label : "";
  }

  stop() {
    if (this.node) {
      this.node.port.postMessage({ type: "stop" });
      this.node.port.onmessage = null;
      try { this.source.disconnect(); } catch { /* already disconnected */ }
      this.node = null;
      this.source = null;
    }
    if (this.stream) {
      for (const track of this.stream.getTracks()) track.stop();
      this.stream = null;
    }
  }
}

/**
 * Plays 16-bit mono PCM chunks back to back on the AudioContext clock (no gaps, no
 * overlaps) and stops everything at once on flush().
 */
export class Player {
  constructor(ctx, { leadS = 0.08, onChunkPlayed, onIdle } = {}) {
    this.ctx = ctx;
    this.leadS = leadS; // jitter buffer before the first chunk of a burst
    this.onChunkPlayed = onChunkPlayed || (() => {});
    this.onIdle = onIdle || (() => {});
    this.out = this.newOutput();
    this.sources = new Set();
    this.nextTime = 0;
    this.carry = null; // an odd trailing byte of the previous chunk
  }

  newOutput() {
    const gain = this.ctx.createGain();
    gain.connect(this.ctx.destination);
    return gain;
  }

  get playing() {
    return this.sources.size > 0;
  }

  /** Seconds of audio scheduled but not yet heard. */
  get bufferedS() {
    return Math.max(0, this.nextTime - this.ctx.currentTime);
  }

  /** Queues an ArrayBuffer of int16 LE mono PCM at `sampleRate`. */
  enqueue(data, sampleRate) {
    let bytes = new Uint8Array(data);
    if (this.carry !== null) {
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = this.carry;
      joined.set(bytes, 1);
      bytes = joined;
      this.carry = null;
    }
    if (bytes.length % 2 === 1) {
      this.carry = bytes[bytes.length - 1];
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    const n = bytes.length / 2;
    if (n === 0) return 0;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const buffer = this.ctx.createBuffer(1, n, sampleRate);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) samples[i] = view.getInt16(2 * i, true) / 32768;

    const src = this.ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.out);
    const now = this.ctx.currentTime;
    // Back to back with the previous chunk; after an underrun (or at the start of a
    // reply) leave a little lead so that the next chunks arrive in time.
    const start = this.nextTime >= now + 0.005 ? this.nextTime : now + this.leadS;
    src.start(start);
    this.nextTime = start + buffer.duration;
    this.sources.add(src);
    src.onended = () => {
      this.sources.delete(src);
      src.disconnect();
      this.onChunkPlayed(buffer.duration);
      if (this.sources.size === 0) this.onIdle();
    };
    return buffer.duration;
  }

  /** Stops all queued and playing audio now (with a 10 ms fade against clicks). */
  flush() {
    const had = this.sources.size > 0;
    const old = this.out;
    const now = this.ctx.currentTime;
    old.gain.setValueAtTime(old.gain.value, now);
    old.gain.linearRampToValueAtTime(0, now + 0.01);
    for (const src of this.sources) {
      src.onended = null;
      try { src.stop(now + 0.012); } catch { /* not started */ }
    }
    this.sources.clear();
    setTimeout(() => old.disconnect(), 100);
    this.out = this.newOutput();
    this.nextTime = 0;
    this.carry = null;
    if (had) this.onIdle();
    return had;
  }
}
