// /dashboard: polls /dashboard/data and draws it with uPlot (vendored, window.uPlot).
//
// Login is the voice page's: the key from the #key=… fragment `s2s up` prints (kept for this
// tab, removed from the address bar) goes in an Authorization header, never in a URL.
// window.s2sDashboard holds the last figures shown, for tests and the curious.
import { storedKey, takeKeyFromFragment } from "/static/connection.js";

takeKeyFromFragment();

const STAGES = ["vad", "stt", "llm", "tts"];
const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const COLORS = { vad: "#18895b", stt: "#5b5bd6", llm: "#c4314b", tts: "#d08a1c" };
const state = (window.s2sDashboard = { updates: 0, failures: 0, last: null, error: null,
                                         shown: {} });

export function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`;
}

// axis ticks: finer than fmtMs, which rounds to whole milliseconds
const tickMs = (v) => (v >= 1000 ? `${+(v / 1000).toFixed(2)} s` : `${+v.toFixed(v < 10 ? 1 : 0)} ms`);

const fmtNum = (v) => (v === null || v === undefined ? "–" : String(Math.round(v * 10) / 10));

// --- charts ---------------------------------------------------------------------------
function chart(el, series, { unit = "" } = {}) {
  const axis = { stroke: css("--muted"), grid: { stroke: css("--line"), width: 1 },
                 ticks: { stroke: css("--line"), width: 1 } };
  const opts = {
    width: Math.max(300, el.clientWidth), height: 210,
    // from 0, and at least 0-100 ms (0-1) while a chart has no data yet
    scales: { x: { time: true },
              y: { range: (u, min, max) => [0, Math.max(max * 1.1, unit === "ms" ? 100 : 1)] } },
    axes: [axis, { ...axis, size: 60, values: (u, ticks) => ticks.map(unit === "ms" ? tickMs : fmtNum),
                   // counts (workers, items, sessions) tick at whole numbers
                   ...(unit === "ms" ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }) }],
    legend: { live: true },
    series: [{}, ...series.map((s) => ({
      width: 2, points: { show: false }, ...s,
      value: (u, v) => (unit === "ms" ? fmtMs(v) : fmtNum(v)),
    }))],
  };
  const plot = new uPlot(opts, [[], ...series.map(() => [])], el);
  new ResizeObserver(() => plot.setSize({ width: Math.max(300, el.clientWidth), height: 210 }))
    .observe(el);
  return plot;
}

const perStage = (extra = {}) => STAGES.map((s) => ({ label: s, stroke: COLORS[s], ...extra }));

const charts = {
  v2v: chart($("chart-v2v"), [
    { label: "p50", stroke: css("--accent") || "#5b5bd6" },
    { label: "p95", stroke: "#c4314b", dash: [6, 4] },
  ], { unit: "ms" }),
  queue: chart($("chart-queue"), perStage(), { unit: "ms" }),
  processing: chart($("chart-processing"), perStage(), { unit: "ms" }),
  inflight: chart($("chart-inflight"), perStage()),
  sessions: chart($("chart-sessions"), [
    { label: "sessions open", stroke: css("--accent") || "#5b5bd6" },
    { label: "refusals/min", stroke: "#d08a1c" },
    { label: "errors/min", stroke: "#c4314b" },
  ]),
  workers: chart($("chart-workers"), perStage({ paths: uPlot.paths.stepped({ align: 1 }) })),
};

// --- figures --------------------------------------------------------------------------
function show(id, text, value) {
  const el = $(id);
  el.textContent = text;
  if (value !== undefined) el.dataset.value = value === null ? "" : String(value);
  state.shown[id] = value === undefined ? text : value;
}

function level(ms) {
  if (ms === null || ms === undefined) return "";
  return ms < 1000 ? "good" : ms < 2000 ? "slow" : "bad";
}

function reasons(counts) {
  return Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ${n}`)
    .join(", ");
}

function render(d) {
  const s = d.summary;
  const live = d.live;
  show("v2v-p50", fmtMs(s.v2v_p50_ms), s.v2v_p50_ms);
  show("v2v-p95", fmtMs(s.v2v_p95_ms), s.v2v_p95_ms);
  $("v2v-p50").dataset.level = level(s.v2v_p50_ms);
  $("v2v-p95").dataset.level = level(s.v2v_p95_ms);
  show("turns", String(s.turns), s.turns);
  show("turns-rate", s.turns_per_min === null ? "" : `${s.turns_per_min} / min`);
  show("sessions-open", String(live.sessions_open), live.sessions_open);
  show("sessions-opened", `${s.sessions_opened} opened`, s.sessions_opened);
  show("refusals", String(s.refusals_total), s.refusals_total);
  show("refusal-reasons", reasons(s.refusals));
  show("errors", String(s.errors_total), s.errors_total);
  show("error-detail", [reasons(s.errors), s.redis_errors ? `redis ${s.redis_errors}` : ""]
    .filter(Boolean).join(", "));
  const span = Math.round(d.range_s / 60);
  $("range-note").textContent =
    `Figures over the last ${span} min; lines: rolling ${Math.round(d.window_s)} s window, ` +
    `a sample every ${d.interval_s} s. Source: ${d.source === "prometheus" ? "Prometheus"
      : "the workers of the /sd registry, scraped by this gateway"}.`;

  const x = d.series.t;
  charts.v2v.setData([x, d.series.v2v_p50_ms, d.series.v2v_p95_ms]);
  charts.queue.setData([x, ...STAGES.map((st) => d.series.queue_wait_p95_ms[st])]);
  charts.processing.setData([x, ...STAGES.map((st) => d.series.processing_p95_ms[st])]);
  charts.inflight.setData([x, ...STAGES.map((st) => d.series.in_flight[st])]);
  charts.sessions.setData([x, d.series.sessions_open, d.series.refusals_per_min,
                           d.series.errors_per_min]);
  charts.workers.setData([x, ...STAGES.map((st) => d.series.workers[st])]);

  const stageRows = STAGES.map((st) => {
    const now = live.stages[st];
    const r = s.stages[st] || {};
    const cells = [st, now.workers, fmtNum(now.in_flight), fmtNum(now.lag), fmtNum(now.pending),
      fmtMs(r.queue_wait_p50_ms), fmtMs(r.queue_wait_p95_ms), fmtMs(r.processing_p50_ms),
      fmtMs(r.processing_p95_ms), r.items_ok ?? 0, r.items_error ?? 0];
    return `<tr data-stage="${st}">${cells.map((c, i) =>
      `<td${i === 1 && !now.workers ? ' class="down"' : ""}>${c}</td>`).join("")}</tr>`;
  });
  $("stages").tBodies[0].innerHTML = stageRows.join("");
  $("workers").tBodies[0].innerHTML = live.workers.map((w) => {
    const stateText = w.up ? "up" : `down${w.error ? ": " + escapeHtml(w.error) : ""}`;
    return `<tr><td>${w.role}</td><td>${escapeHtml(w.worker)}</td>` +
      `<td${w.up ? "" : ' class="down"'}>${stateText}</td><td>${fmtNum(w.in_flight)}</td></tr>`;
  }).join("");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// --- polling --------------------------------------------------------------------------
function alertBox(text) {
  $("alert").hidden = !text;
  $("alert-text").textContent = text || "";
}

function pill(stateName, text) {
  $("conn").dataset.state = stateName;
  $("conn").textContent = text;
}

let timer = null;

async function poll() {
  clearTimeout(timer);
  let next = state.last ? state.last.interval_s * 1000 : 2000;
  const key = storedKey();
  try {
    const reply = await fetch(`/dashboard/data?range=${$("range").value}`, {
      headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: "no-store",
    });
    const body = await reply.json().catch(() => ({}));
    if (reply.status === 401) {
      state.error = body.message || "unauthorized";
      pill("offline", "Not logged in");
      alertBox(`The gateway did not accept this page's credential (${state.error}). Open the ` +
               "dashboard URL `s2s up` printed (…/dashboard#key=…), or append #key=YOUR_KEY.");
      return; // polling cannot help until the page is opened with a key
    }
    if (!reply.ok) throw new Error(body.message || `HTTP ${reply.status}`);
    state.last = body;
    state.updates += 1;
    state.error = body.error || null;
    render(body);
    alertBox(body.error ? `Could not read the metrics: ${body.error}` : "");
    pill(body.error ? "connecting" : "online", body.error ? "Degraded" : "Live");
    next = body.interval_s * 1000;
  } catch (e) {
    state.failures += 1;
    state.error = String(e.message || e);
    pill("offline", "Gateway unreachable");
    alertBox(`Cannot reach the gateway (${state.error}); retrying.`);
  }
  timer = setTimeout(poll, next);
}

$("range").addEventListener("change", poll);
poll();
