"""``s2s bench --from-file-end`` / ``--sweep readme``: voice-to-voice from the known end of
speech of each input file, the measurement of the latency table in docs/performance.md.

Each input (a WAV, or a sentence spoken by espeak-ng with ``--say``) has its end of
speech found once, offline (:func:`speech_end`).  A row runs N concurrent clients; each
has ``--conversations`` fresh sessions one after the other, every one speaking the file
once (after ``--lead`` s of silence) in 20 ms frames paced in real time.  Voice-to-voice
of a conversation = arrival of the first reply audio of its answer (the last turn that got
audio) - the moment the client sent the frame holding the file's last speech sample.  The
old figure, from the VAD's own ``end_s``, is kept next to it.  A row also reads, from
every worker's ``/metrics`` (``--redis-url``), the per-stage breakdown and the
speculation outcomes (``s2s_speculations_total{outcome}``), and checks the reply names
what it must (``--expect``: "Paris" for the France question).

``--sweep readme`` is the README table: the France question at 1, 2, 4 and 8 sessions
and tests/data/jfk.wav at 1, five conversations each, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import loadgen

SR = 16000
FRANCE = "What is the capital of France? Answer in one sentence."
SPECULATIONS = "s2s_speculations_total"
WINDOW = SR // 100  # 10 ms energy windows


# --- inputs and their known end of speech ----------------------------------------------------
@dataclass
class Input:
    name: str                 # short label of the table
    pcm: np.ndarray           # int16, 16 kHz
    end_sample: int           # index of the last speech sample
    expect: str | None = None  # a word the reply must contain (case-insensitive)
    source: str = ""

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SR

    @property
    def end_s(self) -> float:
        """Position (s) where the last speech sample ends."""
        return (self.end_sample + 1) / SR


def speech_end(pcm: np.ndarray, vad: Any = None) -> int:
    """Index of the last speech sample of ``pcm`` (int16, 16 kHz).

    Silero VAD (the VAD stage's model, threshold 0.5, its hysteresis of 0.15, runs of at
    least 250 ms) finds the last stretch of speech, so noise after it (jfk.wav ends with
    the crowd) does not count.  Silero's own end lags the sound by 50-300 ms (it still
    hears the reverberation), so inside that stretch the end is the last 10 ms window
    whose level is above the midpoint (in dB) between the file's noise floor (10th
    percentile of the windows) and its loudest window.  Raises ValueError when the file
    holds no speech."""
    from s2s.services.vad.worker import CHUNK, SileroVad

    x = np.asarray(pcm, np.int16)
    vad = vad or SileroVad()
    n = len(x) // CHUNK * CHUNK
    probs, _ = vad.probs(x[:n].astype(np.float32) / 32768, vad.new_state())
    segments, start, last = [], None, None
    for i, p in enumerate(probs):
        if p >= 0.5:
            start = i if start is None else start
            last = i
        elif start is not None and p < 0.35:
            segments.append((start, last))
            start = None
    if start is not None:
        segments.append((start, last))
    segments = [(a, b) for a, b in segments if (b - a + 1) * CHUNK >= SR // 4]
    if not segments:
        raise ValueError("no speech found in the input")
    a, b = segments[-1][0] * CHUNK, (segments[-1][1] + 1) * CHUNK
    windows = x[:len(x) // WINDOW * WINDOW].astype(np.float64).reshape(-1, WINDOW)
    db = 20 * np.log10(np.sqrt((windows ** 2).mean(axis=1)) + 1.0)
    threshold = (np.percentile(db, 10) + db.max()) / 2
    loud = [w for w in range(a // WINDOW, min(b // WINDOW, len(db))) if db[w] >= threshold]
    if not loud:
        return b - 1
    w = loud[-1]
    # the last sample of that window above the threshold's amplitude
    seg = np.abs(x[w * WINDOW:(w + 1) * WINDOW].astype(np.float64))
    above = np.flatnonzero(seg >= 10 ** (threshold / 20))
    return w * WINDOW + (int(above[-1]) if above.size else WINDOW - 1)


def espeak_say(text: str, voice: str = "en-us") -> np.ndarray:
    """``text`` spoken by espeak-ng at its default 175 words a minute (the France question:
    3.1 s), 16 kHz int16, silence around it trimmed."""
    from .eval_set import espeak, trim_silence

    return trim_silence(espeak(voice, text, speed=175))


def load_inputs(wavs: Sequence[Path] = (), says: Sequence[str] = (),
                expect: str | None = None) -> list[Input]:
    """``--say`` sentences (``--expect`` applies to them) and ``--wav`` files."""
    from s2s.audio import read_audio
    from s2s.services.vad.worker import SileroVad

    vad = SileroVad()
    out = []
    for text in says:
        pcm = espeak_say(text)
        out.append(Input(f'"{text}"', pcm, speech_end(pcm, vad), expect, f"espeak-ng: {text}"))
    for path in wavs:
        pcm = read_audio(path, SR)
        out.append(Input(Path(path).name, pcm, speech_end(pcm, vad), None, str(path)))
    return out


# --- one conversation, one row -----------------------------------------------------------
@dataclass
class Conversation:
    v2v_ms: float | None = None        # from the known end of speech
    v2v_end_s_ms: float | None = None  # from the VAD's end_s (the older figure)
    vad_end_s: float | None = None     # the answer's end_s, in the file (s)
    answered: bool = False
    early: bool = False                # reply audio began before the speech ended
    named: bool | None = None          # the reply names --expect (None: nothing expected)
    transcript: str = ""
    reply: str = ""
    turns: int = 0
    errors: list[str] = field(default_factory=list)


def judge(result: Any, mark_at: float | None, expect: str | None) -> Conversation:
    """A client TalkResult -> one Conversation: the answer is the last turn that got
    reply audio (earlier ones were superseded or cut off when the user went on)."""
    conv = Conversation(turns=len(result.turns))
    conv.errors = [loadgen._error_text(e) for e in result.errors]
    if result.timed_out:
        conv.errors.append("no reply within the turn timeout")
    heard = [t for t in result.turns if t.first_audio_at is not None]
    conv.transcript = result.transcript
    if not heard:
        return conv
    answer = heard[-1]
    conv.reply = answer.reply
    conv.answered = True
    conv.v2v_end_s_ms = answer.voice_to_voice_ms
    conv.vad_end_s = answer.end_s
    if mark_at is not None:
        conv.v2v_ms = round((answer.first_audio_at - mark_at) * 1000, 1)
        conv.early = conv.v2v_ms < 0
    if expect:
        conv.named = re.search(rf"\b{re.escape(expect)}\b", answer.reply, re.I) is not None
    return conv


async def converse(url: str, item: Input, *, lead_s: float, turn_timeout: float,
                   api_key: str | None, protocol: str) -> Conversation:
    """One fresh session speaking ``item`` once."""
    from s2s import client

    pcm = np.concatenate([np.zeros(int(lead_s * SR), np.int16), item.pcm])
    mark = lead_s + item.end_s
    limit = loadgen.session_timeout(len(pcm) / SR, True, turn_timeout)
    try:
        result = await asyncio.wait_for(client.talk(
            loadgen.endpoint(url, protocol), pcm, SR, realtime=True, tail_silence_s=1.0,
            reply_timeout_s=turn_timeout, api_key=api_key, protocol=protocol,
            marks=[mark]), limit)
    except asyncio.TimeoutError:
        return Conversation(errors=[f"conversation timed out after {limit:.0f}s"])
    except Exception as e:  # refused, connection lost: counted, never fatal
        err = getattr(e, "error", None)
        return Conversation(errors=[loadgen._error_text(err) if err else
                                    f"{type(e).__name__}: {e}"])
    conv = judge(result, result.marks_at[0] if result.marks_at else None, item.expect)
    if conv.vad_end_s is not None:  # on the file's timeline, like Input.end_s
        conv.vad_end_s = round(conv.vad_end_s - lead_s, 3)
    return conv


async def run_row(url: str, item: Input, sessions: int, conversations: int, *,
                  lead_s: float = 0.5, ramp_s: float = 2.0, turn_timeout: float = 30.0,
                  api_key: str | None = None, protocol: str = "native",
                  rng: random.Random | None = None, progress=None) -> list[Conversation]:
    """``sessions`` concurrent clients, each ``conversations`` fresh sessions in a row;
    the clients start at random moments within ``ramp_s``."""
    rng = rng or random.Random(0)
    done = [0]

    async def client_loop(delay: float) -> list[Conversation]:
        await asyncio.sleep(delay)
        out = []
        for _ in range(conversations):
            out.append(await converse(url, item, lead_s=lead_s, turn_timeout=turn_timeout,
                                      api_key=api_key, protocol=protocol))
            done[0] += 1
            if progress:
                progress(done[0], sessions * conversations, out[-1])
        return out

    delays = [rng.uniform(0, ramp_s) if sessions > 1 else 0.0 for _ in range(sessions)]
    results = await asyncio.gather(*(client_loop(d) for d in delays))
    return [c for r in results for c in r]


# --- statistics ------------------------------------------------------------------------------
def speculations(text: str) -> dict[str, float]:
    """``s2s_speculations_total`` summed over workers, by outcome."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == SPECULATIONS:
                outcome = s.labels.get("outcome", "")
                out[outcome] = out.get(outcome, 0.0) + s.value
    return out


def spec_delta(before: str, after: str) -> dict[str, int] | None:
    """Speculations used / wasted during a row; None when no worker exports the counter."""
    b, a = speculations(before), speculations(after)
    if not a:
        return None
    return {k: int(round(v - b.get(k, 0.0))) for k, v in sorted(a.items())}


def summarize_row(item: Input, sessions: int, convs: Sequence[Conversation], wall_s: float,
                  server: dict | None = None, spec: dict | None = None) -> dict[str, Any]:
    v2v = [c.v2v_ms for c in convs if c.v2v_ms is not None]
    old = [c.v2v_end_s_ms for c in convs if c.v2v_end_s_ms is not None]
    named = [c.named for c in convs if c.named is not None]
    errors = [e for c in convs for e in c.errors]
    q = loadgen.percentile
    return {
        "input": item.name, "source": item.source, "input_s": round(item.seconds, 2),
        "speech_end_s": round(item.end_s, 3), "sessions": sessions,
        "conversations": len(convs), "answered": sum(c.answered for c in convs),
        "early": sum(c.early for c in convs),
        "median_ms": q(v2v, 50), "p95_ms": q(v2v, 95), "max_ms": q(v2v, 100),
        "end_s_median_ms": q(old, 50), "end_s_p95_ms": q(old, 95),
        "expect": item.expect, "named": sum(named) if item.expect else None,
        "errors": len(errors), "error_messages": sorted(set(errors))[:10],
        "speculations": spec, "wall_s": round(wall_s, 1), "server": server or {},
        "samples": [{"v2v_ms": c.v2v_ms, "v2v_end_s_ms": c.v2v_end_s_ms, "turns": c.turns,
                     "vad_end_s": c.vad_end_s,
                     "transcript": c.transcript, "reply": c.reply} for c in convs],
    }


# --- output ----------------------------------------------------------------------------------
def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def _named(row: dict) -> str:
    return "-" if row["named"] is None else f"{row['named']}/{row['conversations']}"


def _spec(row: dict) -> str:
    s = row.get("speculations")
    if not s:
        return "-"
    return f"{s.get('used', 0)} used / {s.get('wasted', 0)} wasted"


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'input':<44} {'sess':>4} {'median':>8} {'p95':>8} {'answered':>8} "
            f"{'named?':>6} {'end_s med':>9} {'p95':>8}  speculations")
    lines = ["voice-to-voice from the file's known end of speech (client-side); "
             "end_s: from the VAD's own end_s (the older figure)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['input'][:44]:<44} {r['sessions']:>4} {_s(r['median_ms']):>8} "
                     f"{_s(r['p95_ms']):>8} {r['answered']:>4}/{r['conversations']:<3} "
                     f"{_named(r):>6} {_s(r['end_s_median_ms']):>9} {_s(r['end_s_p95_ms']):>8}"
                     f"  {_spec(r)}")
    stage_rows = []
    for r in rows:
        for stage, m in (r["server"].get("stages") or {}).items():
            p, w = m.get("processing_ms", {}), m.get("queue_wait_ms", {})
            f = m.get("first_output_ms", {})
            stage_rows.append(
                f"{r['input'][:24]:<24} {r['sessions']:>4} {stage:>6} "
                f"{loadgen._fmt(p.get('p50')):>9} {loadgen._fmt(p.get('p95')):>6} "
                f"{loadgen._fmt(w.get('p50')):>10} {loadgen._fmt(w.get('p95')):>6} "
                f"{loadgen._fmt(f.get('p50')):>11} {p.get('count', 0):>6}")
    if stage_rows:
        lines += ["", "per stage, ms (worker histograms over the row)",
                  f"{'input':<24} {'sess':>4} {'stage':>6} {'proc p50':>9} {'p95':>6} "
                  f"{'queue p50':>10} {'p95':>6} {'1st out p50':>11} {'items':>6}"] + stage_rows
    ends = {r["input"]: (r["speech_end_s"], r["input_s"]) for r in rows}
    lines += ["", "end of speech found in each input: " + "; ".join(
        f"{k} {e:.2f} s of {n:.2f} s" for k, (e, n) in ends.items())]
    errs = sorted({m for r in rows for m in r["error_messages"]})
    if errs:
        lines += ["", "errors:"] + [f"  {m}" for m in errs]
    return "\n".join(lines)


def markdown(rows: Sequence[dict]) -> str:
    """The README table."""
    out = ["| input | sessions | median | p95 | answered | names Paris | "
           "from the VAD's end_s: median | p95 | speculations used / wasted |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec = r.get("speculations")
        out.append(f"| {r['input']} ({r['input_s']:.1f} s) | {r['sessions']} | "
                   f"{_s(r['median_ms'])} | {_s(r['p95_ms'])} | "
                   f"{r['answered']}/{r['conversations']} | {_named(r)} | "
                   f"{_s(r['end_s_median_ms'])} | {_s(r['end_s_p95_ms'])} | "
                   f"{'-' if not spec else str(spec.get('used', 0)) + ' / ' + str(spec.get('wasted', 0))} |")
    return "\n".join(out)


def plot(rows: Sequence[dict], path: str | Path) -> Path:
    """Median and p95 against sessions, one line per input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, name in enumerate(dict.fromkeys(r["input"] for r in rows)):
        rs = sorted((r for r in rows if r["input"] == name), key=lambda r: r["sessions"])
        xs = [r["sessions"] for r in rs]
        for key, style in (("median_ms", "o-"), ("p95_ms", "s--")):
            ys = [np.nan if r[key] is None else r[key] for r in rs]
            ax.plot(xs, ys, style, color=f"C{i}", label=f"{name[:30]} {key[:-3]}")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("voice-to-voice from the end of speech (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- command ---------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> tuple[list[Input], list[tuple[int, int]]]:
    """The inputs and the rows (input index, sessions) to run."""
    if args.sweep == "readme":
        inputs = load_inputs([loadgen.DEFAULT_WAV], [FRANCE], expect="paris")
        return inputs, [(0, 1), (1, 1), (0, 2), (0, 4), (0, 8)]
    says = list(args.say or [])
    wavs = list(args.wav or ([] if says else [loadgen.DEFAULT_WAV]))
    inputs = load_inputs(wavs, says, expect=args.expect)
    return inputs, [(i, n) for n in args.sessions for i in range(len(inputs))]


async def run(args: argparse.Namespace, inputs: Sequence[Input],
              rows_plan: Sequence[tuple[int, int]]) -> dict[str, Any]:
    import os

    log = sys.stderr if args.json else sys.stdout
    for item in inputs:
        print(f"bench: {item.name}: {item.seconds:.2f} s, speech ends at {item.end_s:.3f} s",
              file=log, flush=True)
    redis_url = args.redis_url or os.environ.get("S2S_REDIS_URL") or None
    kw = dict(lead_s=args.lead, turn_timeout=args.turn_timeout, api_key=args.api_key,
              protocol=args.protocol)
    if args.warmup:
        print("bench: warm-up (one conversation per input, not counted)…", file=log, flush=True)
        for item in inputs:
            await converse(args.url, item, **kw)
    rng = random.Random(args.seed)
    rows = []
    for i, (k, n) in enumerate(rows_plan, 1):
        item = inputs[k]
        urls = loadgen.metrics_urls(args.url, args.metrics_url, redis_url)
        before = await asyncio.to_thread(loadgen.scrape, urls)
        print(f"bench: row {i}/{len(rows_plan)}: {item.name} × {n} session(s), "
              f"{args.conversations} conversation(s) each…", file=log, flush=True)

        def progress(done: int, total: int, c: Conversation) -> None:
            v = "no reply" if c.v2v_ms is None else f"{c.v2v_ms:.0f} ms"
            print(f"bench:   {done}/{total} {v}  {c.reply[:60]!r}", file=log, flush=True)

        t0 = time.monotonic()
        # every conversation is bounded (loadgen.session_timeout), so is the row
        convs = await run_row(args.url, item, n, args.conversations, ramp_s=args.ramp,
                              rng=rng, progress=progress, **kw)
        wall = time.monotonic() - t0
        await asyncio.sleep(1.0)  # the last observations land before the scrape
        after = await asyncio.to_thread(loadgen.scrape, urls)
        rows.append(summarize_row(item, n, convs, wall, loadgen.server_breakdown(before, after),
                                  spec_delta(before, after)))
        r = rows[-1]
        print(f"bench: row {i} done in {wall:.0f} s: median {_s(r['median_ms'])}, p95 "
              f"{_s(r['p95_ms'])}, answered {r['answered']}/{r['conversations']}, "
              f"named {_named(r)}", file=log, flush=True)
    return {"method": "voice-to-voice from the frame holding the input's last speech sample "
                      "to the first reply audio", "url": args.url, "protocol": args.protocol,
            "conversations_per_client": args.conversations, "lead_s": args.lead,
            "rows": rows}


def main(args: argparse.Namespace) -> int:
    if args.conversations < 1:
        print("bench: --conversations must be at least 1", file=sys.stderr)
        return 2
    try:
        inputs, rows_plan = plan(args)
    except (ValueError, OSError, RuntimeError) as e:  # no speech, no file, no espeak-ng
        print(f"bench: cannot use the inputs: {e}", file=sys.stderr)
        return 2
    report = asyncio.run(run(args, inputs, rows_plan))
    out = sys.stderr if args.json else sys.stdout
    print(format_table(report["rows"]), file=out)
    if args.markdown:
        print("\n" + markdown(report["rows"]), file=out)
    path = args.out or ("bench-sweep.json" if args.sweep else None)
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
        print(f"json: {path}", file=out)
    if args.plot:
        report["plot"] = str(plot(report["rows"], args.plot))
        print(f"plot: {args.plot}", file=out)
    if args.json:
        print(json.dumps(report))
    ok = all(r["answered"] == r["conversations"] for r in report["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m s2s.bench.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    loadgen.add_arguments(parser)
    parsed = parser.parse_args()
    if not parsed.sweep and not parsed.from_file_end:
        parsed.sweep = "readme"
    sys.exit(main(parsed))
