// One s2s WebSocket session that reconnects by itself (with backoff) and resumes.
//
// Events (EventTarget, `detail` carries the data):
//   state      {state: "connecting"|"ready"|"waiting"|"failed"|"closed", attempt, delayMs,
//               reason}; "failed": the server refused the session, no more retries
//   message    a JSON event from the server (ready, transcript, reply_text, …)
//   audio      an ArrayBuffer of reply PCM

export function defaultUrl() {
  const override = new URLSearchParams(location.search).get("ws");
  if (override) return override;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

// Authentication (docs/security.md): `s2s up` prints a URL with the key in its fragment
// (#key=…), which browsers never send to a server. The page keeps the key for this tab,
// removes it from the address bar, and before each connection trades it for a one-time
// ticket (POST /auth/ticket) that travels as a WebSocket subprotocol: no URL the server
// logs ever holds the key or the ticket.
const KEY_STORE = "s2s.key";

export function takeKeyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (!key) return false;
  try { sessionStorage.setItem(KEY_STORE, key); } catch { /* storage off: this load only */ }
  storedKeyFallback = key;
  params.delete("key");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return true;
}

let storedKeyFallback = null;

export function storedKey() {
  try { return sessionStorage.getItem(KEY_STORE) || storedKeyFallback; } catch { return storedKeyFallback; }
}

export function ticketUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = u.pathname.replace(/\/ws$/, "") + "/auth/ticket";
  u.search = "";
  u.hash = "";
  return u.toString();
}

const MAX_AUDIO_BYTES = 256 * 1024;
// Close codes after which reconnecting cannot help: unsupported data (1003), invalid
// payload (1007), policy violation (1008), message too big (1009).
const FATAL_CLOSE_CODES = new Set([1003, 1007, 1008, 1009]);
const PING_EVERY_MS = 5000; // when the server has been quiet this long
const DEAD_AFTER_MS = 15000; // nothing at all from the server: the link is dead

/**
 * What every transport of the page shares: its state events, and reconnecting with
 * exponential backoff (jittered) while the user wants a session.  A subclass provides
 * open() (one attempt) and calls scheduleRetry() when an attempt or a session fails.
 */
export class RetryingSession extends EventTarget {
  constructor({ url, apiKey, minDelayMs = 500, maxDelayMs = 15000 }) {
    super();
    this.url = url;
    this.apiKey = apiKey; // null: connect without credentials (a gateway with auth off)
    this.minDelayMs = minDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.opening = 0; // the current open() attempt (a stale ticket answer is ignored)
    this.sessionId = null;
    this.isReady = false;
    this.everReady = false;
    this.wanted = false; // the user wants a session (Start pressed)
    this.attempt = 0; // failed attempts since the last ready
    this.retryTimer = null;
    this.readyTimer = null;
    this.lastError = null; // the last `error` event of the server
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  setState(state, extra = {}) {
    this.state = state;
    this.emit("state", { state, ...extra });
  }

  start() {
    this.wanted = true;
    this.attempt = 0;
    this.lastError = null;
    this.open();
  }

  scheduleRetry(reason, code) {
    const base = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this.attempt);
    const delayMs = Math.round(base * (0.8 + 0.4 * Math.random()));
    this.attempt += 1;
    this.setState("waiting", { attempt: this.attempt, delayMs, reason, code,
                               retryAt: Date.now() + delayMs });
    this.retryTimer = setTimeout(() => {
      if (this.wanted) this.open();
    }, delayMs);
  }

  /** Skips the wait and tries again now. */
  retryNow() {
    if (this.wanted && this.state === "waiting") {
      clearTimeout(this.retryTimer);
      this.open();
    }
  }
}

export class Connection extends RetryingSession {
  constructor({ url = defaultUrl(), sampleRate = 16000, outputSampleRate = 24000,
                readyTimeoutMs = 10000, minDelayMs = 500, maxDelayMs = 15000,
                apiKey = storedKey() } = {}) {
    super({ url, apiKey, minDelayMs, maxDelayMs });
    this.sampleRate = sampleRate;
    this.outputSampleRate = outputSampleRate;
    this.readyTimeoutMs = readyTimeoutMs;
    this.ws = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.rttMs = null;
  }

  /** Ends the session: sends bye and does not reconnect. */
  stop() {
    this.wanted = false;
    this.opening += 1; // a ticket still on its way is not used
    clearTimeout(this.retryTimer);
    clearTimeout(this.readyTimer);
    clearInterval(this.heartbeat);
    const ws = this.ws;
    this.ws = null;
    this.isReady = false;
    if (ws) {
      if (ws.readyState === WebSocket.OPEN) {
        try { ws.send(JSON.stringify({ type: "bye" })); } catch { /* closing anyway */ }
      }
      ws.onclose = ws.onerror = ws.onmessage = ws.onopen = null;
      try { ws.close(1000, "bye"); } catch { /* already closed */ }
    }
    this.sessionId = null; // the next Start is a new conversation
    this.setState("closed");
  }

  /** Sends one frame of mic PCM (an Int16Array); dropped while not connected. */
  sendAudio(pcm) {
    if (!this.isReady || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    if (this.ws.bufferedAmount > 4 * MAX_AUDIO_BYTES) return false; // link stalled: drop, don't queue up
    this.ws.send(pcm.byteLength > MAX_AUDIO_BYTES ? pcm.subarray(0, MAX_AUDIO_BYTES / 2) : pcm);
    return true;
  }

  open() {
    clearTimeout(this.retryTimer);
    this.isReady = false;
    if (!this.apiKey) {
      this.connect(null);
      return;
    }
    const attempt = ++this.opening;
    this.setState("connecting", { attempt: this.attempt });
    fetch(ticketUrl(this.url), { method: "POST",
                                 headers: { Authorization: `Bearer ${this.apiKey}` } })
      .then(async (r) => {
        if (attempt !== this.opening || !this.wanted) return;
        if (r.status === 401 || r.status === 403) {
          let body = {};
          try { body = await r.json(); } catch { /* no details */ }
          this.lastError = { code: body.error || "unauthorized",
                             message: "the key was not accepted" +
                                      (body.message ? ` (${body.message})` : "") };
          this.wanted = false;
          this.setState("failed", { reason: this.lastError.message, code: r.status });
          return;
        }
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        this.connect((await r.json()).ticket);
      })
      .catch(() => {
        if (attempt === this.opening && this.wanted) this.scheduleRetry("cannot reach the s2s server");
      });
  }

  connect(ticket) {
    let ws;
    try {
      // the server selects "s2s"; the ticket rides along as a second offered protocol
      ws = ticket ? new WebSocket(this.url, ["s2s", `s2s.ticket.${ticket}`]) : new WebSocket(this.url);
    } catch (err) {
      this.scheduleRetry(`bad server address ${this.url}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.setState("connecting", { attempt: this.attempt });
    ws.onopen = () => {
      const hello = { type: "hello", sample_rate: this.sampleRate,
                      output_sample_rate: this.outputSampleRate };
      if (this.sessionId) hello.session_id = this.sessionId;
      ws.send(JSON.stringify(hello));
      this.readyTimer = setTimeout(() => {
        this.lastError = { code: "timeout", message: "the server did not answer" };
        ws.close(4000, "no ready");
      }, this.readyTimeoutMs);
    };
    ws.onmessage = (e) => {
      this.lastHeard = Date.now();
      if (typeof e.data !== "string") {
        this.emit("audio", e.data);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return; // not ours
      }
      if (msg.type === "ready") {
        clearTimeout(this.readyTimer);
        const resumed = this.sessionId !== null && msg.session_id === this.sessionId;
        this.sessionId = msg.session_id || this.sessionId;
        this.isReady = true;
        this.attempt = 0;
        this.lastError = null;
        const reconnected = this.everReady;
        this.everReady = true;
        this.startHeartbeat(ws);
        this.setState("ready", { resumed, reconnected, sessionId: this.sessionId });
      } else if (msg.type === "pong") {
        if (typeof msg.t === "number") this.rttMs = performance.now() - msg.t;
      } else if (msg.type === "error") {
        this.lastError = msg;
      }
      this.emit("message", msg);
    };
    ws.onerror = () => { /* onclose follows with the details we can have */ };
    ws.onclose = (e) => {
      if (this.ws !== ws) return; // an old socket (we gave up on it already)
      clearTimeout(this.readyTimer);
      clearInterval(this.heartbeat);
      this.ws = null;
      const wasReady = this.isReady;
      this.isReady = false;
      if (!this.wanted) {
        this.setState("closed");
        return;
      }
      let reason;
      if (this.lastError && this.lastError.message) reason = this.lastError.message;
      else if (e.reason) reason = e.reason;
      else if (wasReady) reason = "the connection to the server was lost";
      else reason = "cannot reach the s2s server";
      if (FATAL_CLOSE_CODES.has(e.code)) {
        // The server refused what this page sent: trying again would not help.
        this.wanted = false;
        this.setState("failed", { reason, code: e.code });
        return;
      }
      this.scheduleRetry(reason, e.code);
    };
  }

  /** Pings a quiet server; closes (and so reconnects) a link that went silent. */
  startHeartbeat(ws) {
    clearInterval(this.heartbeat);
    this.lastHeard = Date.now();
    this.heartbeat = setInterval(() => {
      if (this.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      const quiet = Date.now() - this.lastHeard;
      if (quiet > DEAD_AFTER_MS) {
        this.lastError = { code: "timeout", message: "the server stopped answering" };
        ws.close(4001, "no answer");
        // a dead TCP link may take minutes to report its close: go on at once
        ws.onclose({ code: 4001, reason: "" });
      } else if (quiet > PING_EVERY_MS) {
        ws.send(JSON.stringify({ type: "ping", t: performance.now() }));
      }
    }, 1000);
  }
}
