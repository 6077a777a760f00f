"""``s2s bench``: load-test a running stack and measure voice-to-voice latency.

Runs N concurrent sessions against the gateway's WebSocket (``--url``), each speaking
real speech (WAV files, or short questions synthesized by the project's own Piper voice
with ``--synth N``) paced in real time, for several turns.  For each concurrency level
of the sweep (``--sessions 1,2,4,8``) it reports p50 / p95 / max voice-to-voice latency
(user's end of speech -> first reply audio), the steps of a turn (first transcript,
first reply text, first audio) as the client saw them, the same quantiles from the
gateway's own histograms and the per-stage processing / queue-wait times from the
workers' ``/metrics`` (deltas over the level), and the errors.  It prints a table,
optionally one JSON object (``--json``) and a PNG of latency against sessions
(``--plot bench.png``).

Everything is bounded: each session has a time limit derived from its audio, each
level a time limit (``--level-timeout``), each scrape 2 s.

``--from-file-end`` (and ``--sweep readme``, the README table) hands over to
:mod:`s2s.bench.sweep`: voice-to-voice from the frame holding each input's known last
speech sample instead of the VAD's ``end_s``, fresh conversations per row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from s2s.client.url import gateway_url, resolve_url_arg
from s2s.config import redacted_url
from s2s.histograms import histogram_quantile

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAV = ROOT / "tests" / "data" / "jfk.wav"
SEND_RATE = 16000

# Short, answerable questions for --synth (spoken by the project's own Piper voice).
SENTENCES = [
    "What is the capital of France?",
    "Tell me a fun fact about octopuses.",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "What is the tallest mountain in the world?",
    "How do I make a cup of tea?",
    "What is the weather usually like in London?",
    "Give me a tip for sleeping better.",
    "How many legs does a spider have?",
    "What is your favorite color?",
]

# Gateway histograms (client-facing steps of a turn) and per-stage histograms.
GATEWAY_HISTOGRAMS = {
    "voice_to_voice": "s2s_voice_to_voice_seconds",
    "first_transcript": "s2s_time_to_first_transcript_seconds",
    "first_reply_text": "s2s_time_to_first_reply_text_seconds",
    "first_audio": "s2s_time_to_first_audio_seconds",
}
STAGE_HISTOGRAMS = {
    "processing": "s2s_stage_processing_seconds",
    "queue_wait": "s2s_stage_queue_wait_seconds",
    "first_output": "s2s_stage_first_output_seconds",
}
STAGE_ORDER = ("vad", "stt", "llm", "tts")


# --- results ---------------------------------------------------------------------------
@dataclass
class TurnSample:
    """One turn as the client saw it (milliseconds; None when it never came)."""
    voice_to_voice_ms: float | None = None
    first_transcript_ms: float | None = None
    first_reply_text_ms: float | None = None
    server_voice_to_voice_ms: float | None = None  # the gateway's own measure of the turn
    interrupted: bool = False
    superseded: bool = False   # the user went on speaking before any reply: no answer expected
    transcript: str = ""
    reply: str = ""


@dataclass
class SessionSample:
    turns: list[TurnSample] = field(default_factory=list)
    turns_expected: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    refused: str | None = None  # the gateway's error code when it refused the session (busy…)


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of the values that are not None."""
    data = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not data:
        return None
    return float(np.percentile(np.asarray(data), q))


def summarize(sessions: int, samples: Sequence[SessionSample], wall_s: float,
              server: dict[str, Any] | None = None) -> dict[str, Any]:
    """Statistics of one concurrency level.  The steps of a turn leave out superseded
    turns (partial utterances a pause cut off before the user went on), which never get
    a reply and would skew the transcript times."""
    turns = [t for s in samples for t in s.turns]
    answered = [t for t in turns if t.voice_to_voice_ms is not None]
    final = [t for t in turns if not t.superseded or t.voice_to_voice_ms is not None]
    v2v = [t.voice_to_voice_ms for t in answered]
    ftr = [t.first_transcript_ms for t in final]
    frt = [t.first_reply_text_ms for t in final]
    errors = [e for s in samples for e in s.errors]
    expected = sum(s.turns_expected for s in samples)

    def q3(values: Sequence[float | None]) -> dict[str, float | None]:
        return {"p50": percentile(values, 50), "p95": percentile(values, 95),
                "max": percentile(values, 100)}

    return {
        "sessions": sessions,
        "turns_expected": expected,
        "turns_answered": len(v2v),
        "turns_interrupted": sum(t.interrupted for t in turns),
        "turns_superseded": sum(t.superseded for t in turns),
        "turns_missing": max(0, expected - len(v2v)),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:10],
        "wall_s": round(wall_s, 2),
        "voice_to_voice_ms": q3(v2v),
        "first_transcript_ms": q3(ftr),
        "first_reply_text_ms": q3(frt),
        "first_audio_ms": q3(v2v),
        "gateway_voice_to_voice_ms": q3([t.server_voice_to_voice_ms for t in answered]),
        "server": server or {},
    }


# --- Prometheus text: histogram deltas -> quantiles -------------------------------------
Hist = dict[tuple[str, float], float]  # (group label, le) -> cumulative count


def parse_histograms(text: str, name: str, by: str | None = None) -> Hist:
    """Cumulative bucket counts of histogram ``name`` summed over all other labels,
    grouped by label ``by`` ("" when None)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Hist = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name != name + "_bucket":
                continue
            key = (sample.labels.get(by, "") if by else "", float(sample.labels["le"]))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def hist_delta(after: Hist, before: Hist) -> Hist:
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}


def hist_quantile(q: float, hist: Hist, group: str = "") -> float | None:
    """Prometheus' histogram_quantile on one group of cumulative buckets (seconds)."""
    return histogram_quantile(q, sorted((le, c) for (g, le), c in hist.items() if g == group))


def hist_count(hist: Hist, group: str = "") -> int:
    counts = [c for (g, le), c in hist.items() if g == group and math.isinf(le)]
    return int(counts[0]) if counts else 0


def scrape(urls: Sequence[str], timeout: float = 2.0) -> str:
    """Concatenated /metrics text of every URL that answers within the timeout."""
    texts = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                texts.append(resp.read().decode("utf-8", "replace"))
        except Exception:
            continue
    return "\n".join(texts)


def server_breakdown(before: str, after: str) -> dict[str, Any]:
    """Quantiles (ms) of what the gateway and the workers measured during a level."""
    out: dict[str, Any] = {}
    if not before and not after:
        return out
    for key, name in GATEWAY_HISTOGRAMS.items():
        d = hist_delta(parse_histograms(after, name), parse_histograms(before, name))
        if hist_count(d):
            out[key + "_ms"] = {p: _ms(hist_quantile(q, d)) for p, q in
                                (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
            out[key + "_ms"]["count"] = hist_count(d)
    stages: dict[str, Any] = {}
    for key, name in STAGE_HISTOGRAMS.items():
        d = hist_delta(parse_histograms(after, name, "stage"),
                       parse_histograms(before, name, "stage"))
        for stage in sorted({g for g, _ in d}, key=_stage_key):
            if hist_count(d, stage):
                stages.setdefault(stage, {})[key + "_ms"] = {
                    "p50": _ms(hist_quantile(0.5, d, stage)),
                    "p95": _ms(hist_quantile(0.95, d, stage)), "count": hist_count(d, stage)}
    if stages:
        out["stages"] = stages
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _stage_key(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def metrics_urls(ws_url: str, extra: Sequence[str], redis_url: str | None) -> list[str]:
    """The gateway's /metrics (same host and port as ``ws_url``, any form ``--url``
    takes), any --metrics-url, and, with --redis-url, every live worker's /metrics from
    the worker registry."""
    urls = [gateway_url(ws_url).http + "/metrics"]
    urls += [u if u.rstrip("/").endswith("/metrics") else u.rstrip("/") + "/metrics"
             for u in extra]
    if redis_url:
        try:
            import redis

            from s2s import keys

            client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
            try:
                for member in client.zrangebyscore(keys.WORKERS, time.time() - 5, "+inf"):
                    url = member.decode().split("|", 2)[-1]
                    if url.startswith("http"):
                        urls.append(url.rstrip("/") + "/metrics")
            finally:
                client.close()
        except Exception as e:
            print(f"bench: cannot list workers from {redacted_url(redis_url)}: "
                  f"{redacted_url(str(e))}", file=sys.stderr)
    return list(dict.fromkeys(urls))


# --- speech ------------------------------------------------------------------------------
def synthesize(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` short questions spoken by the bundled Piper voice, int16 at 16 kHz."""
    from s2s.bench.eval_set import piper_speech

    sentences = SENTENCES[:]
    random.Random(seed).shuffle(sentences)
    return piper_speech([sentences[i % len(sentences)] for i in range(count)], SEND_RATE)


def session_audio(utterances: Sequence[np.ndarray], turns: int, offset: int, lead_s: float,
                  gap_s: float) -> np.ndarray:
    """The mic audio of one session: ``turns`` utterances (round robin from ``offset``),
    each after ``lead_s`` of silence and followed by ``gap_s`` of silence for the reply."""
    parts = []
    for t in range(turns):
        parts.append(np.zeros(int(lead_s * SEND_RATE), np.int16))
        parts.append(utterances[(offset + t) % len(utterances)])
        parts.append(np.zeros(int(gap_s * SEND_RATE), np.int16))
    return np.concatenate(parts)


# --- running sessions ----------------------------------------------------------------------
def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def to_session_sample(result: Any, turns_expected: int, wall_s: float) -> SessionSample:
    """A client TalkResult (or a dict of the same fields) -> SessionSample."""
    sample = SessionSample(turns_expected=turns_expected, wall_s=wall_s)
    for turn in _get(result, "turns", None) or []:
        sample.turns.append(TurnSample(
            voice_to_voice_ms=_get(turn, "voice_to_voice_ms"),
            first_transcript_ms=_get(turn, "first_transcript_ms"),
            first_reply_text_ms=_get(turn, "first_reply_text_ms"),
            server_voice_to_voice_ms=_get(turn, "server_voice_to_voice_ms"),
            interrupted=bool(_get(turn, "interrupted", False)),
            superseded=bool(_get(turn, "superseded", False)),
            transcript=_get(turn, "transcript", "") or "",
            reply=_get(turn, "reply", "") or ""))
    sample.errors = [_error_text(e) for e in (_get(result, "errors", None) or [])]
    if _get(result, "timed_out", False):
        sample.errors.append("no reply to every turn within --turn-timeout")
    return sample


def _error_text(error: Any) -> str:
    """A client error event ({"type": "error", "code", "message"}) or anything else."""
    if isinstance(error, dict):
        code, message = error.get("code", "error"), error.get("message", "")
        return f"{code}: {message}" if message else str(code)
    return str(error)


def session_timeout(audio_s: float, realtime: bool, reply_timeout_s: float) -> float:
    """Hard limit on one session: its audio (3x faster when not real time), the client's
    own wait for replies after the audio, and a margin for connecting and closing."""
    return (audio_s if realtime else audio_s / 3) + reply_timeout_s + 20.0


async def run_session(url: str, pcm: np.ndarray, turns: int, *, delay_s: float, realtime: bool,
                      out_rate: int | None, reply_timeout_s: float,
                      api_key: str | None = None, protocol: str = "native") -> SessionSample:
    """One client session through s2s.client.talk: the utterances paced like a microphone,
    then silence until every turn is answered or ``reply_timeout_s`` passed; the whole
    session is bounded by :func:`session_timeout`."""
    from s2s import client

    target = gateway_url(url, protocol)
    if api_key is None:
        api_key = target.key
    await asyncio.sleep(delay_s)
    t0 = time.monotonic()
    timeout_s = session_timeout(len(pcm) / SEND_RATE, realtime, reply_timeout_s)
    try:
        result = await asyncio.wait_for(
            client.talk(target.url, pcm.tobytes(), SEND_RATE, out_rate=out_rate,
                        realtime=realtime, reply_timeout_s=reply_timeout_s, api_key=api_key,
                        protocol=protocol),
            timeout_s)
    except asyncio.TimeoutError:
        return SessionSample(turns_expected=turns, errors=[f"session timed out after {timeout_s:.0f}s"],
                             wall_s=time.monotonic() - t0)
    except client.ProtocolError as e:  # the gateway said no (busy, session_limit…): counted
        return SessionSample(turns_expected=turns, errors=[_error_text(e.error or str(e))],
                             wall_s=time.monotonic() - t0, refused=e.code)
    except Exception as e:  # connection refused, protocol error...: counted, never fatal
        return SessionSample(turns_expected=turns, errors=[f"{type(e).__name__}: {e}"],
                             wall_s=time.monotonic() - t0)
    return to_session_sample(result, turns, time.monotonic() - t0)


def endpoint(url: str, protocol: str) -> str:
    """The gateway's WebSocket for ``protocol`` (native: ``/ws``; realtime:
    ``/v1/realtime`` on the same host) from any form ``--url`` takes; never the key of a
    ``#key=`` fragment (:func:`s2s.client.url.gateway_url` returns that apart)."""
    return gateway_url(url, protocol).url


async def run_level(args: argparse.Namespace, sessions: int, utterances: Sequence[np.ndarray],
                    rng: random.Random) -> tuple[list[SessionSample], float]:
    """``sessions`` concurrent sessions, started spread over ``--ramp`` seconds."""
    tasks = []
    for i in range(sessions):
        pcm = session_audio(utterances, args.turns, offset=i, lead_s=args.lead, gap_s=args.gap)
        delay = rng.uniform(0, args.ramp) if sessions > 1 else 0.0
        tasks.append(run_session(args.url, pcm, args.turns, delay_s=delay,
                                 realtime=args.realtime, out_rate=args.out_rate,
                                 reply_timeout_s=args.turn_timeout, api_key=args.api_key,
                                 protocol=args.protocol))
    t0 = time.monotonic()
    running = [asyncio.ensure_future(t) for t in tasks]
    done, pending = await asyncio.wait(running, timeout=args.level_timeout)
    for task in pending:  # sessions past the level's limit: cancelled, counted as errors
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    samples = [t.result() if t in done else
               SessionSample(turns_expected=args.turns,
                             errors=[f"level timed out after {args.level_timeout:.0f}s"])
               for t in running]
    return samples, time.monotonic() - t0


# --- output --------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_table(levels: Sequence[dict[str, Any]]) -> str:
    head = (f"{'sessions':>8} {'turns':>7} {'v2v p50':>8} {'p95':>6} {'max':>6} "
            f"{'transcr p50':>11} {'p95':>6} {'reply p50':>9} {'p95':>6} {'errors':>6} {'intr':>4}")
    lines = ["voice-to-voice and steps of a turn, ms (client-side)", head, "-" * len(head)]
    for lv in levels:
        v, tr, rt = lv["voice_to_voice_ms"], lv["first_transcript_ms"], lv["first_reply_text_ms"]
        lines.append(
            f"{lv['sessions']:>8} {lv['turns_answered']:>3}/{lv['turns_expected']:<3} "
            f"{_fmt(v['p50']):>8} {_fmt(v['p95']):>6} {_fmt(v['max']):>6} "
            f"{_fmt(tr['p50']):>11} {_fmt(tr['p95']):>6} {_fmt(rt['p50']):>9} {_fmt(rt['p95']):>6} "
            f"{lv['errors']:>6} {lv['turns_interrupted']:>4}")
    stage_rows = []
    for lv in levels:
        for stage, m in (lv.get("server", {}).get("stages") or {}).items():
            p, w, f = (m.get("processing_ms", {}), m.get("queue_wait_ms", {}),
                       m.get("first_output_ms", {}))
            stage_rows.append(
                f"{lv['sessions']:>8} {stage:>6} {_fmt(p.get('p50')):>9} {_fmt(p.get('p95')):>6} "
                f"{_fmt(w.get('p50')):>10} {_fmt(w.get('p95')):>6} {_fmt(f.get('p95')):>10} "
                f"{p.get('count', 0):>6}")
    gw_rows = []
    for lv in levels:
        server = lv.get("server", {})
        g, tr, rt = (server.get("voice_to_voice_ms") or {}, server.get("first_transcript_ms") or {},
                     server.get("first_reply_text_ms") or {})
        if g or tr or rt:
            gw_rows.append(f"{lv['sessions']:>8} {_fmt(g.get('p50')):>8} {_fmt(g.get('p95')):>6} "
                           f"{_fmt(g.get('p99')):>6} {_fmt(tr.get('p50')):>11} "
                           f"{_fmt(tr.get('p95')):>6} {_fmt(rt.get('p50')):>9} "
                           f"{_fmt(rt.get('p95')):>6} {g.get('count', 0):>6}")
    if gw_rows:
        lines += ["", "the same from the gateway's histograms, ms (bucket-interpolated)",
                  f"{'sessions':>8} {'v2v p50':>8} {'p95':>6} {'p99':>6} {'transcr p50':>11} "
                  f"{'p95':>6} {'reply p50':>9} {'p95':>6} {'turns':>6}"] + gw_rows
    if stage_rows:
        lines += ["", "per stage, ms (worker histograms)",
                  f"{'sessions':>8} {'stage':>6} {'proc p50':>9} {'p95':>6} {'queue p50':>10} "
                  f"{'p95':>6} {'1st out p95':>10} {'items':>6}"] + stage_rows
    errs = sorted({m for lv in levels for m in lv.get("error_messages", [])})
    if errs:
        lines += ["", "errors:"] + [f"  {m}" for m in errs[:10]]
    return "\n".join(lines)


def plot(levels: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG of voice-to-voice p50/p95/max and the p50 steps of a turn against sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = [lv["sessions"] for lv in levels]

    def series(key: str, q: str) -> list[float]:
        return [np.nan if lv[key][q] is None else lv[key][q] for lv in levels]

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    ax.plot(xs, series("voice_to_voice_ms", "p50"), "o-", color="C0", lw=2,
            label="voice-to-voice p50")
    ax.plot(xs, series("voice_to_voice_ms", "p95"), "s-", color="C3", lw=2,
            label="voice-to-voice p95")
    ax.plot(xs, series("voice_to_voice_ms", "max"), "^:", color="C3", lw=1, alpha=0.6,
            label="voice-to-voice max")
    ax.plot(xs, series("first_transcript_ms", "p50"), "--", color="C2", lw=1,
            label="first transcript p50")
    ax.plot(xs, series("first_reply_text_ms", "p50"), "--", color="C1", lw=1,
            label="first reply text p50")
    for lv in levels:
        if lv["errors"] or lv["turns_missing"]:
            y = lv["voice_to_voice_ms"]["p95"] or 0
            ax.annotate(f"{lv['errors']} err, {lv['turns_missing']} missing",
                        (lv["sessions"], y), textcoords="offset points", xytext=(-6, 8),
                        ha="right", fontsize=7, color="C3")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("latency after end of speech (ms)")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "s2s: voice-to-voice latency vs concurrent sessions", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- command -------------------------------------------------------------------------------
def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not levels or any(n < 1 or n > 1000 for n in levels):
        raise argparse.ArgumentTypeError("session counts must be 1..1000")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws",
                        help="the gateway: the URL `s2s up` printed (http://host:port/#key=…, "
                             "whose key is then used) or its WebSocket, ws://host:port/ws")
    parser.add_argument("--sessions", type=parse_levels, default=[1, 2, 4, 8],
                        help="concurrency levels to sweep, e.g. 1,2,4,8")
    parser.add_argument("--turns", type=int, default=3, help="turns (utterances) per session")
    parser.add_argument("--wav", action="append", type=Path, default=None,
                        help=f"speech file(s) to speak, used round robin (repeatable; default "
                             f"{DEFAULT_WAV.relative_to(ROOT)} unless --synth is given)")
    parser.add_argument("--synth", type=int, default=0, metavar="N",
                        help="also speak N short questions synthesized with the bundled Piper voice")
    parser.add_argument("--gap", type=float, default=8.0,
                        help="seconds of silence after each utterance, for the reply to play "
                             "(shorter: the next utterance may barge in)")
    parser.add_argument("--lead", type=float, default=0.5,
                        help="seconds of silence before each utterance")
    parser.add_argument("--ramp", type=float, default=2.0,
                        help="sessions of a level start at random times within this many seconds")
    parser.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True,
                        help="pace the audio in real time, like a microphone")
    parser.add_argument("--out-rate", type=int, default=None,
                        help="reply audio sample rate to ask for (default: the voice's own)")
    parser.add_argument("--turn-timeout", type=float, default=30.0,
                        help="after its audio, seconds a session waits for the replies it is "
                             "still owed (then it counts an error)")
    parser.add_argument("--level-timeout", type=float, default=600.0,
                        help="hard limit on one concurrency level, seconds")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="run one unmeasured single-turn session first")
    parser.add_argument("--metrics-url", action="append", default=[],
                        help="extra /metrics endpoint(s) to scrape (the gateway's is always tried)")
    parser.add_argument("--redis-url", default=None,
                        help="Redis of the stack: find every worker's /metrics for the per-stage "
                             "breakdown (default: $S2S_REDIS_URL if set)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="write latency vs concurrent sessions to this PNG")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the table goes to stderr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of start times and sentences")
    parser.add_argument("--api-key", default=None,
                        help="API key or signed token for the gateway [default: the #key= of "
                             "--url, else env S2S_API_KEY]")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="burst mode: measure one session unloaded, then start N new "
                             "sessions within --burst-window seconds; report the admitted "
                             "ones' latency against the unloaded one and the refused ones")
    parser.add_argument("--burst-window", type=float, default=5.0, metavar="S",
                        help="seconds over which the --burst sessions arrive")
    parser.add_argument("--protocol", choices=("native", "realtime", "webrtc"), default="native",
                        help="native: the gateway's /ws protocol; realtime: the OpenAI Realtime "
                             "endpoint /v1/realtime on the same host (same sessions and workers); "
                             "webrtc: Realtime WebRTC calls (POST /v1/realtime/calls, Opus)")
    # voice-to-voice from the known end of speech of each file (bench/sweep.py)
    parser.add_argument("--from-file-end", action="store_true",
                        help="measure voice-to-voice from the frame holding each input's last "
                             "speech sample (found offline) instead of the VAD's end_s (kept as "
                             "a second column); each client has --conversations fresh sessions "
                             "speaking the input once; inputs: --wav and --say")
    parser.add_argument("--sweep", choices=("readme",), default=None,
                        help="readme: the README table (the France question at 1,2,4,8 "
                             "sessions, jfk.wav at 1, 5 conversations each; implies "
                             "--from-file-end)")
    parser.add_argument("--say", action="append", default=None, metavar="TEXT",
                        help="--from-file-end input: TEXT spoken by espeak-ng (repeatable)")
    parser.add_argument("--expect", default=None, metavar="WORD",
                        help="--from-file-end: the reply to every --say input must name WORD "
                             "(counted in the table)")
    parser.add_argument("--conversations", type=int, default=5, metavar="N",
                        help="--from-file-end: fresh conversations per client and row")
    parser.add_argument("--markdown", action="store_true",
                        help="--from-file-end: also print the table as Markdown (README)")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="--from-file-end: write the whole report to this JSON file "
                             "(--sweep readme: bench-sweep.json unless given)")


def _utterances(args: argparse.Namespace) -> list[np.ndarray]:
    wavs = list(args.wav or [])
    if not wavs and not args.synth:
        wavs = [DEFAULT_WAV]
    from s2s.audio import read_audio

    utterances = [read_audio(p, SEND_RATE) for p in wavs]
    if args.synth:
        utterances += synthesize(args.synth, args.seed)
    return utterances


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import os

    utterances = _utterances(args)
    redis_url = args.redis_url or os.environ.get("S2S_REDIS_URL") or None
    rng = random.Random(args.seed)
    log = sys.stderr if args.json else sys.stdout
    if args.warmup:
        print("bench: warm-up session…", file=log, flush=True)
        warm = await run_session(args.url, session_audio(utterances, 1, 0, args.lead, args.gap),
                                 1, delay_s=0, realtime=args.realtime, out_rate=args.out_rate,
                                 reply_timeout_s=args.turn_timeout, api_key=args.api_key,
                                 protocol=args.protocol)
        if warm.errors and not warm.turns:
            print(f"bench: warm-up failed: {'; '.join(warm.errors)}", file=sys.stderr)
    levels = []
    for n in args.sessions:
        urls = metrics_urls(args.url, args.metrics_url, redis_url)
        before = await asyncio.to_thread(scrape, urls)
        print(f"bench: {n} concurrent session(s) × {args.turns} turn(s)…", file=log, flush=True)
        samples, wall = await run_level(args, n, utterances, rng)
        await asyncio.sleep(1.0)  # let the last observations land before scraping
        after = await asyncio.to_thread(scrape, urls)
        levels.append(summarize(n, samples, wall, server_breakdown(before, after)))
    return {
        "url": endpoint(args.url, args.protocol), "protocol": args.protocol,
        "turns_per_session": args.turns, "realtime": args.realtime,
        "utterances": len(utterances),
        "utterance_s": [round(len(u) / SEND_RATE, 2) for u in utterances],
        "levels": levels,
    }


def main(args: argparse.Namespace) -> int:
    if args.turns < 1:
        print("bench: --turns must be at least 1", file=sys.stderr)
        return 2
    # the sweep and burst modes and every report see the plain /ws URL and the key apart
    if not resolve_url_arg(args, "bench"):
        return 2
    if args.burst:
        from .burst import main as burst_main

        return burst_main(args)
    if args.sweep or args.from_file_end:
        from .sweep import main as sweep_main

        return sweep_main(args)
    report = asyncio.run(run(args))
    table = format_table(report["levels"])
    if args.plot:
        path = plot(report["levels"], args.plot)
        report["plot"] = str(path)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(table)
        if args.plot:
            print(f"plot: {args.plot}")
    answered = all(lv["turns_answered"] > 0 for lv in report["levels"])
    return 0 if answered else 1
