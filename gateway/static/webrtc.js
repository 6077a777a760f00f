// One s2s session as an OpenAI-Realtime-style WebRTC call (POST /v1/realtime/calls):
// the microphone goes out as an Opus track, the reply comes back as one (played by an
// <audio> element, so the browser's echo canceller knows what it plays), and the
// Realtime events of the `oai-events` data channel are turned into the page's own
// messages. Same interface and events as Connection (connection.js), plus:
//   fallback   {reason}: WebRTC cannot be used here (no endpoint, no route for the
//              media) before any call worked: the page goes on over the WebSocket
//   rtcstats   {...}: what the browser measured of the call (getStats), every 250 ms

import { RetryingSession, defaultUrl, storedKey } from "./connection.js";

export function callsUrl(wsUrl = defaultUrl()) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = u.pathname.replace(/\/ws$/, "") + "/v1/realtime/calls";
  u.search = "";
  u.hash = "";
  return u.toString();
}

const OUT_RATE = 48000; // Opus's clock
const STATS_EVERY_MS = 250;
const AUDIBLE_RMS = 0.01; // -40 dBFS: a stats interval louder than this carried reply audio
// the gateway's answer to a refused call: trying again cannot help
const FATAL_STATUS = new Set([401, 403, 429]);
// no such endpoint here (an older gateway, a static server): use the WebSocket
const ABSENT_STATUS = new Set([404, 405, 501]);

export class RtcConnection extends RetryingSession {
  constructor({ url = callsUrl(), apiKey = storedKey(), stream, connectTimeoutMs = 10000,
                minDelayMs = 500, maxDelayMs = 15000 } = {}) {
    super({ url, apiKey, minDelayMs, maxDelayMs });
    this.stream = stream; // the microphone
    this.connectTimeoutMs = connectTimeoutMs;
    this.isRtc = true;
    this.pc = null;
    this.dc = null;
    this.audio = null;
    this.statsTimer = null;
    this.resetTurns();
    this.measured = { packetsSent: 0, packetsReceived: 0, replySeconds: 0, audioEnergy: 0,
                      samplesDuration: 0, codec: null, loudIntervals: 0 };
  }

  resetTurns() {
    this.turn = 0;
    this.itemTurn = new Map(); // user item id -> turn
    this.itemSpan = new Map(); // user item id -> [start_s, end_s]
    this.responseTurn = new Map();
    this.pieces = new Map();
  }

  stop() {
    this.wanted = false;
    this.opening += 1;
    clearTimeout(this.retryTimer);
    this.teardown();
    this.sessionId = null;
    this.setState("closed");
  }

  /** The microphone is a track: there are no frames to send. */
  sendAudio() {
    return false;
  }

  /** Sends a Realtime client event on the data channel. */
  send(event) {
    if (this.dc && this.dc.readyState === "open") this.dc.send(JSON.stringify(event));
  }

  teardown() {
    clearTimeout(this.readyTimer);
    clearInterval(this.statsTimer);
    this.isReady = false;
    const pc = this.pc;
    this.pc = null;
    this.dc = null;
    if (pc) {
      pc.onconnectionstatechange = pc.ontrack = null;
      try { pc.close(); } catch { /* closed */ }
    }
    if (this.audio) {
      this.audio.srcObject = null;
      this.audio.remove();
      this.audio = null;
    }
  }

  async open() {
    clearTimeout(this.retryTimer);
    this.teardown();
    const attempt = ++this.opening;
    this.setState("connecting", { attempt: this.attempt });
    const pc = new RTCPeerConnection();
    this.pc = pc;
    const audio = document.createElement("audio");
    audio.autoplay = true;
    audio.hidden = true;
    document.body.append(audio);
    this.audio = audio;
    pc.ontrack = (e) => { audio.srcObject = e.streams[0] || new MediaStream([e.track]); };
    for (const track of this.stream.getAudioTracks()) pc.addTrack(track, this.stream);
    const dc = pc.createDataChannel("oai-events");
    this.dc = dc;
    dc.onmessage = (e) => { if (this.pc === pc) this.onEvent(e.data); };
    dc.onclose = () => { if (this.pc === pc) this.lost("the connection to the server was lost"); };
    pc.onconnectionstatechange = () => {
      if (this.pc === pc && ["failed", "closed"].includes(pc.connectionState)) {
        this.lost("the connection to the server was lost");
      }
    };
    let response;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      const headers = { "Content-Type": "application/sdp" };
      if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
      response = await fetch(this.url, { method: "POST", body: pc.localDescription.sdp, headers });
    } catch (err) {
      if (attempt === this.opening && this.wanted) this.unusable("cannot reach the s2s server");
      return;
    }
    if (attempt !== this.opening || !this.wanted) return;
    if (response.status !== 201) {
      await this.refused(response);
      return;
    }
    const answer = await response.text();
    if (attempt !== this.opening || !this.wanted) return;
    try {
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
    } catch (err) {
      this.unusable(`the server's answer was not usable (${err.message || err})`);
      return;
    }
    // session.created comes on the data channel once the media path works
    this.readyTimer = setTimeout(() => {
      if (this.pc === pc && !this.isReady) this.unusable("the call did not connect");
    }, this.connectTimeoutMs);
  }

  async refused(response) {
    const status = response.status;
    let body = {};
    try { body = await response.json(); } catch { /* no details */ }
    const error = body.error || {};
    if (ABSENT_STATUS.has(status) || !error.code) {
      this.unusable(`no WebRTC endpoint (HTTP ${status})`);
      return;
    }
    const message = error.message || `HTTP ${status}`;
    this.teardown();
    if (FATAL_STATUS.has(status)) {
      this.lastError = { code: error.code, message: (status === 401 || status === 403) && this.apiKey
        ? `the key was not accepted (${message})` : message };
      this.wanted = false;
      this.setState("failed", { reason: this.lastError.message, code: status });
      return;
    }
    this.lastError = { code: error.code, message };
    this.scheduleRetry(message, status);
  }

  /** WebRTC does not work here: before any call worked, the page falls back. */
  unusable(reason) {
    if (!this.everReady) {
      this.wanted = false;
      this.teardown();
      this.emit("fallback", { reason });
      return;
    }
    this.lost(reason);
  }

  lost(reason) {
    if (!this.wanted) return;
    const wasReady = this.isReady;
    this.teardown();
    this.scheduleRetry(wasReady ? "the connection to the server was lost" : reason);
  }

  // ---------------------------------------------------------------- events in

  onEvent(raw) {
    let ev;
    try { ev = JSON.parse(raw); } catch { return; }
    for (const msg of this.translate(ev)) this.emit("message", msg);
  }

  /** A Realtime server event -> the page's messages (the WebSocket protocol's shapes). */
  translate(ev) {
    switch (ev.type) {
      case "session.created": {
        clearTimeout(this.readyTimer);
        this.sessionId = String((ev.session && ev.session.id) || "").replace(/^sess_/, "");
        this.isReady = true;
        this.attempt = 0;
        this.lastError = null;
        const reconnected = this.everReady;
        this.everReady = true;
        this.resetTurns();
        this.startStats();
        this.setState("ready", { resumed: false, reconnected, sessionId: this.sessionId });
        return [{ type: "ready", session_id: this.sessionId, output_sample_rate: OUT_RATE }];
      }
      case "input_audio_buffer.speech_started":
        this.turn += 1;
        this.itemTurn.set(ev.item_id, this.turn);
        this.itemSpan.set(ev.item_id, [(ev.audio_start_ms || 0) / 1000, null]);
        return [{ type: "speech_started", turn: this.turn }];
      case "input_audio_buffer.speech_stopped": {
        const span = this.itemSpan.get(ev.item_id) || [null, null];
        span[1] = (ev.audio_end_ms || 0) / 1000;
        this.itemSpan.set(ev.item_id, span);
        return [];
      }
      case "conversation.item.input_audio_transcription.completed": {
        if (!this.itemTurn.has(ev.item_id)) this.itemTurn.set(ev.item_id, ++this.turn);
        const [start, end] = this.itemSpan.get(ev.item_id) || [null, null];
        return [{ type: "transcript", turn: this.itemTurn.get(ev.item_id), text: ev.transcript || "",
                  start_s: start, end_s: end }];
      }
      case "response.created":
        this.responseTurn.set(ev.response.id, this.turn);
        return [];
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta": {
        const seq = (this.pieces.get(ev.response_id) ?? -1) + 1;
        this.pieces.set(ev.response_id, seq);
        return [{ type: "reply_text", turn: this.responseTurn.get(ev.response_id) ?? this.turn,
                  seq, text: ev.delta || "", final: false }];
      }
      case "output_audio_buffer.started":
        return [{ type: "audio_start", turn: this.responseTurn.get(ev.response_id) ?? this.turn,
                  sample_rate: OUT_RATE, voice_to_voice_ms: ev.voice_to_voice_ms ?? null }];
      case "output_audio_buffer.stopped":
        return [{ type: "audio_stopped", turn: this.responseTurn.get(ev.response_id) ?? this.turn }];
      case "output_audio_buffer.cleared": // the server emptied the reply track: barge-in
        return [{ type: "interrupt", turn: this.turn + 1 }];
      case "response.done":
        if (ev.response && ev.response.status === "completed") {
          return [{ type: "reply_done", turn: this.responseTurn.get(ev.response.id) ?? this.turn }];
        }
        return [];
      case "error": {
        const err = ev.error || {};
        this.lastError = { code: err.code, message: err.message };
        return [{ type: "error", code: err.code, message: err.message }];
      }
      default:
        return [];
    }
  }

  // ---------------------------------------------------------------- measures

  startStats() {
    clearInterval(this.statsTimer);
    let last = null;
    const pc = this.pc;
    this.statsTimer = setInterval(async () => {
      if (this.pc !== pc) return;
      const report = await pc.getStats();
      const m = this.measured;
      let inbound = null;
      report.forEach((s) => {
        if (s.type === "outbound-rtp" && s.kind === "audio") m.packetsSent = s.packetsSent || 0;
        if (s.type === "inbound-rtp" && s.kind === "audio") inbound = s;
      });
      if (inbound) {
        m.packetsReceived = inbound.packetsReceived || 0;
        const codec = inbound.codecId && report.get(inbound.codecId);
        if (codec) m.codec = codec.mimeType;
        const energy = inbound.totalAudioEnergy || 0;
        const duration = inbound.totalSamplesDuration || 0;
        if (last && duration > last.duration) {
          // the played-out level of this interval: reply audio if it is audible
          const rms = Math.sqrt((energy - last.energy) / (duration - last.duration));
          if (rms > AUDIBLE_RMS) {
            m.replySeconds += duration - last.duration;
            m.loudIntervals += 1;
          }
        }
        last = { energy, duration };
        m.audioEnergy = energy;
        m.samplesDuration = duration;
      }
      this.emit("rtcstats", { ...m });
    }, STATS_EVERY_MS);
  }
}
