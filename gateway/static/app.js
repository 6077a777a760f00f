// s2s web client: wires the microphone, the session, playback and the page. The session
// is a WebRTC call (webrtc.js: Opus both ways, the browser's echo canceller tied to the
// reply it plays) unless the browser or the server cannot do that; then, or with
// ?transport=ws, it is the WebSocket (connection.js: PCM, played by audio.js's Player).
import { Connection, defaultUrl, takeKeyFromFragment } from "./connection.js";
import { Mic, MicError, Player } from "./audio.js";
import { RtcConnection, callsUrl } from "./webrtc.js";

// a login link (#key=…) from `s2s up`: keep the key for this tab, clean the address bar
takeKeyFromFragment();

const MIC_RATE = 16000; // what we send: the rate the VAD and STT work at
const OUT_RATE = 24000; // what we ask for; audio_start tells the rate that really comes

const $ = (id) => document.getElementById(id);
const ui = {
  button: $("talk"),
  buttonLabel: $("talk-label"),
  status: $("status"),
  pill: $("conn"),
  alert: $("alert"),
  alertText: $("alert-text"),
  retry: $("retry"),
  log: $("log"),
  empty: $("empty"),
  meta: $("meta"),
};

// Read by tests and handy in the console.
const stats = (window.s2sStats = {
  state: "idle",
  sessionId: null,
  micFramesSent: 0,
  micFramesDropped: 0,
  audioChunksReceived: 0,
  audioChunksScheduled: 0,
  audioChunksPlayed: 0,
  audioSecondsPlayed: 0,
  audioChunksDropped: 0,
  interrupts: 0,
  transcripts: 0,
  replies: 0,
  lastVoiceToVoiceMs: null,
  connects: 0,
  reconnects: 0,
  errors: [],
  transport: null, // "webrtc" | "websocket"
  fallbacks: 0, // WebRTC given up for the WebSocket
  rtcCodec: null,
  rtcPacketsReceived: 0,
});

let ctx = null;
let mic = null;
let player = null;
let conn = null;
let running = false;
let level = 0;
let phase = "idle"; // listening | hearing | thinking | speaking
let outRate = OUT_RATE;
let audioTurn = -1; // turn of the audio now arriving (from audio_start)
let minAudioTurn = 0; // audio of older turns is dropped (after an interrupt)
let countdown = null;

// ---------------------------------------------------------------- conversation view

const turns = new Map(); // turn number -> view

function turnView(n) {
  let t = turns.get(n);
  if (t) return t;
  const el = document.createElement("article");
  el.className = "turn";
  el.dataset.turn = String(n);
  t = { n, el, user: null, bot: null, chunks: new Map(), done: false, text: "",
        parts: [], said: "", userText: "" };
  turns.set(n, t);
  // Keep turns in order even when an event of an older turn comes late.
  let before = null;
  for (const other of ui.log.querySelectorAll(".turn")) {
    if (Number(other.dataset.turn) > n) { before = other; break; }
  }
  ui.log.insertBefore(el, before);
  ui.empty.hidden = true;
  return t;
}

function bubble(t, who) {
  if (t[who]) return t[who];
  const el = document.createElement("div");
  el.className = `msg ${who}`;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who === "user" ? "You" : "Assistant";
  const text = document.createElement("p");
  text.className = "text";
  el.append(name, text);
  if (who === "user") t.el.prepend(el); // the user's words first, the reply after
  else t.el.append(el);
  t[who] = { el, text };
  return t[who];
}

/**
 * The user went on speaking before the previous turn got an answer (the pipeline
 * sends an utterance at each pause and drops it if the user goes on): that turn's
 * words move into turn `t`, so one user bubble shows everything said before the reply.
 * Each part keeps its audio span: a transcript that continues the thought re-heard
 * those parts (see showSaid).
 */
function adoptUnanswered(t) {
  let prev = null;
  for (const other of turns.values()) {
    if (other.n < t.n && (!prev || other.n > prev.n)) prev = other;
  }
  if (!prev || prev.bot || !prev.userText) return;
  t.parts = prev.said ? [...prev.parts, { text: prev.said, start: prev.start, end: prev.end }]
    : prev.parts;
  prev.el.remove();
  turns.delete(prev.n);
  showSaid(t);
}

/** The user bubble of `t`: the adopted parts, then what this turn's transcript said. */
function showSaid(t) {
  t.userText = [...t.parts.map((p) => p.text), t.said].filter(Boolean).join(" ");
  bubble(t, "user").text.textContent = t.userText;
}

function dropTurnIfEmpty(t) {
  if (!t.bot && !t.userText) {
    t.el.remove();
    turns.delete(t.n);
    ui.empty.hidden = turns.size > 0;
  }
}

function scrollToEnd() {
  const nearEnd = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 120;
  if (nearEnd) ui.log.scrollTop = ui.log.scrollHeight;
}

function joinChunks(chunks) {
  let out = "";
  for (const seq of [...chunks.keys()].sort((a, b) => a - b)) {
    const piece = chunks.get(seq);
    if (out && piece && !/\s$/.test(out) && !/^[\s,.;:!?)]/.test(piece)) out += " ";
    out += piece;
  }
  return out;
}

// ---------------------------------------------------------------- page state

function setStatus(text) {
  if (ui.status.textContent !== text) ui.status.textContent = text;
}

function setPhase(p) {
  phase = p;
  document.body.dataset.phase = p;
  const words = {
    idle: "Press Start and talk to the assistant.",
    starting: "Opening the microphone…",
    connecting: "Connecting to the assistant…",
    listening: "Listening. Say something.",
    hearing: "Hearing you…",
    thinking: "Thinking…",
    speaking: "Speaking. Talk to interrupt.",
  };
  if (words[p]) setStatus(words[p]);
}

function setPill(state, text) {
  ui.pill.dataset.state = state;
  ui.pill.textContent = text;
}

function showAlert(text, { retry = false, kind = "error" } = {}) {
  ui.alert.dataset.kind = kind;
  ui.alertText.textContent = text;
  ui.retry.hidden = !retry;
  ui.alert.hidden = false;
}

function hideAlert() {
  ui.alert.hidden = true;
  clearInterval(countdown);
  countdown = null;
}

function setButton(on) {
  running = on;
  ui.button.setAttribute("aria-pressed", String(on));
  ui.buttonLabel.textContent = on ? "Stop" : "Start";
  ui.button.title = on ? "Stop talking to the assistant" : "Start talking to the assistant";
  document.body.classList.toggle("running", on);
}

function recordError(code, message) {
  stats.errors.push({ code, message, at: Date.now() });
  if (stats.errors.length > 20) stats.errors.shift();
}

// ---------------------------------------------------------------- server events

function onMessage(msg) {
  const n = Number.isInteger(msg.turn) ? msg.turn : null;
  switch (msg.type) {
    case "ready":
      stats.sessionId = msg.session_id || null;
      if (msg.output_sample_rate) outRate = msg.output_sample_rate;
      break;
    case "speech_started": {
      for (const t of [...turns.values()]) if (t.n < n) dropTurnIfEmpty(t);
      const t = turnView(n);
      adoptUnanswered(t);
      const u = bubble(t, "user");
      if (!t.said) u.el.classList.add("pending");
      if (phase !== "speaking") setPhase("hearing");
      scrollToEnd();
      break;
    }
    case "interrupt": {
      stats.interrupts += 1;
      minAudioTurn = Math.max(minAudioTurn, n ?? 0, audioTurn + 1);
      const had = player && player.flush();
      for (const t of turns.values()) {
        if (t.n < minAudioTurn && t.bot && !t.done) {
          t.bot.el.classList.add("interrupted");
          t.bot.el.classList.remove("streaming");
          t.done = true;
        }
      }
      if (had || phase === "speaking") setPhase("hearing");
      break;
    }
    case "transcript": {
      stats.transcripts += 1;
      const t = turnView(n);
      adoptUnanswered(t);
      const u = bubble(t, "user");
      t.said = (msg.text || "").trim();
      t.start = msg.start_s;
      t.end = msg.end_s;
      // a continuation starts where the thought did: it holds the parts it re-heard
      t.parts = t.parts.filter((p) => !(p.start <= t.start && t.start < p.end));
      showSaid(t);
      u.el.classList.remove("pending");
      if (!t.userText) dropTurnIfEmpty(t);
      else if (phase !== "speaking") setPhase("thinking");
      scrollToEnd();
      break;
    }
    case "reply_text": {
      const t = turnView(n);
      if (t.done && t.bot && t.bot.el.classList.contains("interrupted")) break;
      const b = bubble(t, "bot");
      if (!t.chunks.size) stats.replies += 1;
      t.chunks.set(msg.seq ?? t.chunks.size, msg.text || "");
      t.text = joinChunks(t.chunks);
      b.text.textContent = t.text;
      b.el.classList.toggle("streaming", !msg.final);
      scrollToEnd();
      break;
    }
    case "audio_start": {
      audioTurn = n ?? audioTurn + 1;
      if (msg.sample_rate) outRate = msg.sample_rate;
      if (audioTurn < minAudioTurn) break;
      const t = turnView(audioTurn);
      const b = bubble(t, "bot");
      if (typeof msg.voice_to_voice_ms === "number") {
        stats.lastVoiceToVoiceMs = msg.voice_to_voice_ms;
        let badge = b.el.querySelector(".latency");
        if (!badge) {
          badge = document.createElement("span");
          badge.className = "latency";
          b.el.append(badge);
        }
        const ms = Math.round(msg.voice_to_voice_ms);
        const value = document.createElement("b");
        value.textContent = ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${ms} ms`;
        badge.replaceChildren(value, " voice-to-voice");
        badge.title = "Voice-to-voice latency: from the end of your speech to the first reply audio";
        badge.setAttribute("aria-label", `voice-to-voice latency ${ms} milliseconds`);
      }
      if (conn && conn.isRtc) setPhase("speaking"); // its audio is on the call's track
      break;
    }
    case "audio_stopped": // WebRTC: the reply has all been played out
      if (phase === "speaking") setPhase("listening");
      break;
    case "reply_done": {
      const t = turns.get(n);
      if (t && t.bot) {
        t.bot.el.classList.remove("streaming");
        t.done = true;
      }
      if (phase === "thinking" && !(player && player.playing)) setPhase("listening");
      break;
    }
    case "error":
      recordError(msg.code || "error", msg.message || "");
      showAlert(`Server error${msg.code ? ` (${msg.code})` : ""}: ${msg.message || "unknown"}`,
                { kind: "warning" });
      break;
    default:
      break; // events this page does not know are ignored
  }
}

function onAudio(data) {
  stats.audioChunksReceived += 1;
  if (!player || audioTurn < minAudioTurn || !running) {
    stats.audioChunksDropped += 1;
    return;
  }
  if (player.enqueue(data, outRate) > 0) {
    stats.audioChunksScheduled += 1;
    setPhase("speaking");
  }
}

function onConnState({ state, attempt, delayMs, reason, reconnected, resumed, retryAt }) {
  stats.state = state;
  if (state === "connecting") {
    setPill("connecting", attempt ? "Reconnecting" : "Connecting");
    if (!attempt) setPhase("connecting");
  } else if (state === "ready") {
    stats.connects += 1;
    if (reconnected) stats.reconnects += 1;
    setPill("online", "Connected");
    hideAlert();
    if (reconnected) {
      showAlert(resumed ? "Reconnected. The conversation goes on." : "Reconnected (a new session).",
                { kind: "info" });
      setTimeout(() => { if (ui.alert.dataset.kind === "info") hideAlert(); }, 3000);
    }
    setPhase("listening");
    const sid = conn.sessionId || "?";
    ui.meta.textContent = `Session ${sid.length > 12 ? sid.slice(0, 8) + "…" : sid} · ` +
      `mic: ${mic.label || "default"} ` + (conn.isRtc ? "(WebRTC, Opus)"
        : `(${ctx.sampleRate / 1000} kHz → ${MIC_RATE / 1000} kHz)`);
    ui.meta.title = `Session ${sid}`;
  } else if (state === "waiting") {
    setPill("offline", "Offline");
    if (player) player.flush();
    recordError("connection", reason);
    const what = reason.charAt(0).toUpperCase() + reason.slice(1);
    const tick = () => {
      const s = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
      showAlert(`${what}. Reconnecting in ${s} s (attempt ${attempt})…`, { retry: true });
    };
    clearInterval(countdown);
    tick();
    countdown = setInterval(tick, 500);
    setStatus("Waiting for the server…");
  } else if (state === "failed") {
    recordError("refused", reason);
    stop();
    showAlert(`The server refused the session: ${reason}`);
  } else if (state === "closed") {
    setPill("idle", "Offline");
  }
}

// ---------------------------------------------------------------- start / stop

async function start() {
  setButton(true);
  hideAlert();
  setPhase("starting");
  try {
    if (!ctx) {
      const AC = window.AudioContext || window.webkitAudioContext;
      ctx = new AC({ latencyHint: "interactive" });
      player = new Player(ctx, {
        onChunkPlayed: (s) => {
          stats.audioChunksPlayed += 1;
          stats.audioSecondsPlayed += s;
        },
        onIdle: () => { if (phase === "speaking") setPhase("listening"); },
      });
    }
    await ctx.resume();
    mic = new Mic(ctx, {
      targetRate: MIC_RATE,
      onFrame: (pcm, peak) => {
        level = Math.max(peak, level);
        if (conn && conn.isRtc) return; // the microphone is the call's track: level only
        if (conn && conn.sendAudio(pcm)) stats.micFramesSent += 1;
        else stats.micFramesDropped += 1;
      },
      onEnded: () => {
        if (!running) return;
        stop();
        showAlert("The microphone stopped (was it unplugged?). Press Start to try again.");
      },
    });
    await mic.start();
  } catch (err) {
    stop();
    const text = err instanceof MicError ? err.message : `Could not start: ${err.message || err}`;
    recordError(err instanceof MicError ? `mic_${err.kind}` : "start", text);
    showAlert(text);
    setStatus("Microphone unavailable.");
    return;
  }
  if (!running) return; // stopped while the microphone was opening
  minAudioTurn = 0;
  audioTurn = -1;
  const wantsWs = new URLSearchParams(location.search).get("transport") === "ws";
  if (window.RTCPeerConnection && !wantsWs) startRtc();
  else startWs();
}

function listen(c) {
  c.addEventListener("state", (e) => { if (conn === c) onConnState(e.detail); });
  c.addEventListener("message", (e) => { if (conn === c) onMessage(e.detail); });
  c.addEventListener("audio", (e) => { if (conn === c) onAudio(e.detail); });
}

function startWs() {
  stats.transport = "websocket";
  conn = new Connection({ url: defaultUrl(), sampleRate: MIC_RATE, outputSampleRate: OUT_RATE });
  listen(conn);
  conn.start();
}

function startRtc() {
  stats.transport = "webrtc";
  const rtc = new RtcConnection({ url: callsUrl(defaultUrl()), stream: mic.stream });
  conn = rtc;
  listen(rtc);
  rtc.addEventListener("rtcstats", (e) => {
    if (conn !== rtc) return;
    const m = e.detail;
    stats.micFramesSent = m.packetsSent; // 20 ms Opus frames of the microphone
    stats.rtcPacketsReceived = m.packetsReceived;
    stats.rtcCodec = m.codec;
    stats.audioSecondsPlayed = m.replySeconds; // measured: audible seconds played out
    stats.audioChunksPlayed = m.loudIntervals; // 250 ms intervals that carried the reply
  });
  rtc.addEventListener("fallback", (e) => {
    if (conn !== rtc || !running) return;
    stats.fallbacks += 1;
    recordError("webrtc", e.detail.reason);
    console.info(`WebRTC unavailable (${e.detail.reason}): using the WebSocket`);
    startWs();
  });
  rtc.start();
}

function stop() {
  setButton(false);
  if (conn) { conn.stop(); conn = null; }
  if (mic) { mic.stop(); mic = null; }
  if (player) player.flush();
  for (const t of turns.values()) {
    if (t.bot) t.bot.el.classList.remove("streaming");
    if (t.user) t.user.el.classList.remove("pending");
    dropTurnIfEmpty(t);
  }
  clearInterval(countdown);
  countdown = null;
  level = 0;
  stats.state = "idle";
  setPill("idle", "Offline");
  setPhase("idle");
  if (ctx && ctx.state === "running") ctx.suspend();
}

ui.button.addEventListener("click", () => {
  if (!running) return start();
  stop();
  hideAlert(); // the user ended it: no more "reconnecting" news
});
ui.retry.addEventListener("click", () => conn && conn.retryNow());
window.addEventListener("pagehide", () => { if (running) stop(); });
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && running) stop();
});

// The level ring around the button follows the microphone's peak level.
function animate() {
  level *= 0.88;
  ui.button.style.setProperty("--level", running ? Math.min(1, level * 2.5).toFixed(3) : "0");
  requestAnimationFrame(animate);
}
requestAnimationFrame(animate);
setPhase("idle");
