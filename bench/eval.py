"""``s2s eval`` / ``python -m s2s.bench.eval``: conversation quality against a running
stack (``s2s up``), on the spoken set of ``bench/eval_set.py``.

Each conversation is one session: every user turn is streamed in real time (its pauses
included), then silence until the turn is answered (or ``--turn-timeout``).  Scores:

- transcript WER: what the stack heard against what was said (numbers normalised);
- keyword accuracy: replies containing every expected keyword (factual, multi-turn);
- early answers: turns whose reply audio started before the user's last piece did
  (dictation: the assistant talked over a user who had only paused);
- degenerate replies: a repeated sentence or a phrase loop, or a fragment (a reply
  ending mid-sentence on a word like "and");
- round-trip WER: the reply audio transcribed again (bundled whisper) against the
  reply text: does the voice say what the model wrote;
- voice-to-voice p50/p90: end of the user's speech to the first reply audio.

It prints a table and writes JSON (``--out``).  Numbers on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from s2s import config

from . import eval_tools
from .eval_set import CONVERSATIONS, DEFAULT_GROUPS, JFK_TEXT, SR, Conversation, Voices, groups
from .wer import wer as _wer

FRAME_MS = 20
NUMBERS = {"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
           "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20", "thirty": "30",
           "forty": "40", "hundred": "100"}
DANGLING = {"and", "but", "or", "the", "a", "an", "of", "to", "for", "with", "in", "on", "at",
            "by", "from", "is", "are", "my", "your", "their", "that", "which", "because"}


# --- text scores ---------------------------------------------------------------------------
def norm_words(text: str) -> list[str]:
    """Lower case, no punctuation; number words and digit runs as single digits, so
    "one zero zero" and "100" and "1,0,0" compare equal."""
    out: list[str] = []
    for w in re.findall(r"[a-z0-9']+", text.lower().replace(",", " ").replace("-", " ")):
        w = NUMBERS.get(w, w)
        out += list(w) if w.isdigit() else [w]
    return out


def wer(reference: str, hypothesis: str) -> float:
    """WER over normalized words (digits and number words alike)."""
    return _wer(reference, hypothesis, norm_words)


def has_keywords(reply: str, keywords: list[tuple[str, ...]]) -> bool:
    text = " ".join(norm_words(reply))
    joined = "".join(norm_words(reply))
    return all(any(" ".join(norm_words(k)) in text or
                   ("".join(norm_words(k)).isdigit() and "".join(norm_words(k)) in joined)
                   for k in group) for group in keywords)


def degenerate(reply: str) -> str:
    """'' for a sensible reply, else why not (repeated, fragment)."""
    from s2s.services.llm.replies import Repeats, ends_sentence

    if not reply.strip():
        return ""
    _, looped = Repeats().check(reply)
    if looped:
        return "repeated"
    words = norm_words(reply)
    if not ends_sentence(reply) and words and words[-1] in DANGLING:
        return "fragment"
    return ""


# --- one conversation -------------------------------------------------------------------------
async def run_conversation(url: str, conv: Conversation, voices: Voices, *, api_key: str,
                           turn_timeout: float, tail_s: float,
                           redis_url: str = "") -> dict[str, Any]:
    from s2s.client.protocol import Connection, Tracker

    kwargs: dict[str, Any] = {}
    if api_key and "api_key" in inspect.signature(Connection.open).parameters:
        kwargs["api_key"] = api_key
    # TODO(lead): once the client sends S2S_API_KEY itself (helper auth), drop this check
    conn = await Connection.open(url, SR, **kwargs)
    tracker = Tracker()
    step = SR * FRAME_MS // 1000
    spans, pos, t_start = [], 0, time.monotonic()

    # early answers are judged on the monotonic clock: the wall clock may be stepped
    audio_mono: dict[int, float] = {}   # turn -> when its reply audio began
    piece_mono: dict[float, float] = {}  # session position of a piece -> when it was sent

    async def receive() -> None:
        while (msg := await conn.recv()) is not None:
            if isinstance(msg, dict) and msg.get("type") == "audio_start":
                audio_mono.setdefault(msg.get("turn"), time.monotonic())
            tracker.handle(msg)

    async def send(samples: np.ndarray, pieces: tuple = ()) -> None:
        nonlocal pos
        todo = list(pieces)
        for i in range(0, len(samples), step):
            while todo and todo[0] * SR <= pos + 1:
                piece_mono[todo.pop(0)] = time.monotonic()
            frame = samples[i:i + step]
            delay = t_start + pos / SR - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.send_audio(frame)
            pos += len(frame)
            tracker.sent(pos / SR)

    receiver = asyncio.create_task(receive())
    silence = np.zeros(step, np.int16)
    try:
        for turn in conv.turns:
            audio, starts = voices.turn_audio(conv.voice, turn)
            begin = pos / SR
            pieces = tuple(begin + s for s in starts)
            await send(audio, pieces)
            spans.append((begin, pos / SR, list(pieces)))
            waited = time.monotonic()
            while True:  # silence until answered and heard out (plus a pause), or timeout
                await send(silence)
                quiet = time.monotonic() - waited
                if not tracker.outstanding() and tracker.turns and \
                        time.time() >= playback_end(tracker) + tail_s:
                    break
                if quiet >= turn_timeout:
                    break
    finally:
        await conn.close()
        try:
            await asyncio.wait_for(receiver, 5)
        except (asyncio.TimeoutError, Exception):
            receiver.cancel()
    result = score(conv, tracker, spans, audio_mono, piece_mono)
    if conv.group == "tools":  # the calls, from the conversation the LLM kept
        entries = eval_tools.history(redis_url, conn.session_id)
        for turn, scored in zip(conv.turns, result["turns"]):
            scored.update(eval_tools.score_turn(turn, scored["reply"], entries))
    return result


def playback_end(tracker) -> float:
    """Wall time at which the reply audio received so far has finished playing (a user
    waits for the answer before speaking again)."""
    end = 0.0
    for e in tracker.events:
        if e.get("type") == "audio_start" and e.get("turn") in tracker.turns:
            t = tracker.turns[e["turn"]]
            seconds = len(t.audio) / 2 / t.sample_rate if t.sample_rate else 0.0
            end = max(end, tracker.t0 + e["t"] + seconds)
    return end


def score(conv: Conversation, tracker, spans, audio_mono: dict, piece_mono: dict
          ) -> dict[str, Any]:
    server = [tracker.turns[n] for n in sorted(tracker.turns)]
    out_turns = []
    for i, (turn, (begin, end, starts)) in enumerate(zip(conv.turns, spans)):
        # the VAD may place a speech start a chunk or two before the audio's first sample
        limit = spans[i + 1][0] - 0.5 if i + 1 < len(spans) else float("inf")
        mine = [t for t in server if t.start_s is not None and begin - 0.5 <= t.start_s < limit]
        heard: list = []
        for t in mine:  # a continuation re-hears the pieces before it: keep the later one
            if not t.transcript.strip():
                continue
            while heard and heard[-1].end_s is not None and t.start_s < heard[-1].end_s - 0.05:
                heard.pop()
            heard.append(t)
        # done: the whole reply was sent (the client marks it "interrupted" once the user
        # speaks again, even after it ended)
        answered = [t for t in mine if t.done and t.reply.strip()]
        final = answered[-1] if answered else None
        # reply audio the user heard before starting the last piece: answered too early
        last_piece = piece_mono.get(starts[-1]) if len(starts) > 1 else None
        audio_at = [audio_mono[t.turn] for t in mine if t.turn in audio_mono]
        early = last_piece is not None and any(at < last_piece for at in audio_at)
        reference = JFK_TEXT if turn.recording == "jfk.wav" else turn.text
        transcript = " ".join(t.transcript.strip() for t in heard)
        reply = final.reply if final else ""
        out_turns.append({
            "said": reference, "heard": transcript, "wer": round(wer(reference, transcript), 3),
            "reply": reply, "answered": final is not None, "early": early,
            "keywords": [list(k) for k in turn.keywords],
            "keyword_ok": has_keywords(reply, turn.keywords) if turn.keywords else None,
            "degenerate": degenerate(reply),
            "voice_to_voice_ms": final.voice_to_voice_ms if final else None,
            "audio": (final.audio, final.sample_rate) if final and final.audio else None,
            "pauses": len(starts) - 1,
            # seconds since the session opened: the last piece began, reply audio began
            "audio_after_last_piece_s": [round(at - last_piece, 3) for at in audio_at]
            if last_piece else None})
    events = [{k: v for k, v in e.items() if k in ("type", "turn", "t", "text", "start_s",
                                                    "end_s")} for e in tracker.events
              if e.get("type") not in ("audio_end",)]
    return {"id": conv.id, "group": conv.group, "voice": conv.voice, "turns": out_turns,
            "errors": tracker.errors, "events": events}


def round_trip(results: list[dict]) -> None:
    """Transcribe every reply's audio again; its WER against the reply text."""
    from s2s.audio import resample
    from s2s.services.stt.worker import Whisper

    whisper = Whisper("", "cpu", "auto", 1, "en")
    for conv in results:
        for t in conv["turns"]:
            audio = t.pop("audio", None)
            t["round_trip_wer"] = None
            if audio and t["reply"]:
                pcm, rate = audio
                x = resample(np.frombuffer(pcm, np.int16).astype(np.float32) / 32768, rate, SR)
                heard = " ".join(h.text for h in whisper.transcribe([x[i:i + 30 * SR] for i in
                                                                     range(0, len(x), 30 * SR)]))
                t["round_trip_heard"] = heard
                t["round_trip_wer"] = round(wer(t["reply"], heard), 3)


# --- the table --------------------------------------------------------------------------------
def summarize(results: list[dict]) -> dict[str, dict]:
    summary = {}
    for group in groups() + ["all"]:
        convs = [c for c in results if group in ("all", c["group"])]
        turns = [t for c in convs for t in c["turns"]]
        if not turns:
            continue
        kw = [t["keyword_ok"] for t in turns if t["keyword_ok"] is not None]
        paused = [t for t in turns if t["pauses"]]
        v2v = sorted(t["voice_to_voice_ms"] for t in turns if t["voice_to_voice_ms"] is not None)
        rt = [t["round_trip_wer"] for t in turns if t.get("round_trip_wer") is not None]
        summary[group] = {
            "conversations": len(convs), "turns": len(turns),
            "answered": sum(t["answered"] for t in turns),
            "wer": round(statistics.mean(t["wer"] for t in turns), 3),
            "keyword_accuracy": round(sum(kw) / len(kw), 3) if kw else None,
            "early_rate": round(sum(t["early"] for t in paused) / len(paused), 3)
            if paused else None,
            "degenerate": sum(bool(t["degenerate"]) for t in turns),
            "round_trip_wer": round(statistics.mean(rt), 3) if rt else None,
            "v2v_p50_ms": round(v2v[len(v2v) // 2]) if v2v else None,
            "v2v_p90_ms": round(v2v[min(len(v2v) - 1, int(len(v2v) * 0.9))]) if v2v else None}
    return summary


def format_table(summary: dict[str, dict], label: str = "") -> str:
    def f(v, pct=False):
        if v is None:
            return "-"
        return f"{v * 100:.0f}%" if pct else str(v)

    rows = [f"| {label or 'group'} | convs | answered | transcript WER | keyword acc | "
            f"early answers | degenerate | round-trip WER | v2v p50 / p90 ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for group, s in summary.items():
        rows.append(f"| {group} | {s['conversations']} | {s['answered']}/{s['turns']} | "
                    f"{f(s['wer'], True)} | {f(s['keyword_accuracy'], True)} | "
                    f"{f(s['early_rate'], True)} | {s['degenerate']} | "
                    f"{f(s['round_trip_wer'], True)} | {f(s['v2v_p50_ms'])} / "
                    f"{f(s['v2v_p90_ms'])} |")
    return "\n".join(rows)


# --- command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the gateway's WebSocket")
    parser.add_argument("--groups", default=",".join(DEFAULT_GROUPS),
                        help=f"comma-separated groups to run, of {','.join(groups())} (tools: "
                             "a stack with the example tools attached, docs/tools.md)")
    parser.add_argument("--redis-url", default=os.environ.get("S2S_REDIS_URL", ""),
                        help="the stack's Redis, where the tools group reads the calls made "
                             "(default: $S2S_REDIS_URL)")
    parser.add_argument("--ids", default="", help="comma-separated conversation ids only")
    parser.add_argument("--limit", type=int, default=0, help="at most this many per group")
    parser.add_argument("--out", default="eval.json", help="where the JSON report goes")
    parser.add_argument("--label", default="", help="name of this run in the table (the model)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "s2s" / "eval-audio"),
                        help="synthesized speech is cached here")
    parser.add_argument("--turn-timeout", type=float, default=30.0,
                        help="seconds of silence to wait for an answer")
    parser.add_argument("--tail", type=float, default=1.5,
                        help="silence kept after each answer (the reply's own audio time)")
    parser.add_argument("--no-round-trip", action="store_true",
                        help="skip transcribing the reply audio again")
    parser.add_argument("--api-key", default=os.environ.get("S2S_API_KEY", ""),
                        help="API key for the gateway (default: $S2S_API_KEY)")


def select(args: argparse.Namespace) -> list[Conversation]:
    wanted = set(args.groups.split(","))
    ids = set(filter(None, args.ids.split(",")))
    chosen, per_group = [], {}
    for c in CONVERSATIONS:
        if c.group not in wanted or (ids and c.id not in ids):
            continue
        if args.limit and per_group.get(c.group, 0) >= args.limit:
            continue
        per_group[c.group] = per_group.get(c.group, 0) + 1
        chosen.append(c)
    return chosen


async def run(args: argparse.Namespace) -> dict[str, Any]:
    voices = Voices(Path(args.cache_dir))
    convs = select(args)
    for c in convs:  # synthesize everything first: no TTS load while the stack is timed
        for t in c.turns:
            voices.turn_audio(c.voice, t)
    results = []
    for c in convs:
        try:
            r = await run_conversation(args.url, c, voices, api_key=args.api_key,
                                       turn_timeout=args.turn_timeout, tail_s=args.tail,
                                       redis_url=args.redis_url)
        except Exception as e:  # a refused or broken session is a result, not a crash
            r = {"id": c.id, "group": c.group, "voice": c.voice, "turns": [],
                 "errors": [{"message": f"{type(e).__name__}: {e}"}]}
        results.append(r)
        print(f"eval: {c.id}: " + " | ".join(
            f"heard {t['heard']!r} -> {t['reply']!r}{' EARLY' if t['early'] else ''}"
            f"{' ' + t['degenerate'].upper() if t['degenerate'] else ''}" for t in r["turns"])
            + (f" errors {r['errors']}" if r["errors"] else ""), file=sys.stderr)
    if not args.no_round_trip:
        round_trip(results)
    for r in results:
        for t in r["turns"]:
            t.pop("audio", None)
    return {"label": args.label, "url": config.redacted_url(args.url), "summary": summarize(results),
            "tools": eval_tools.summarize(results), "conversations": results}


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_table(report["summary"], args.label))
    if report.get("tools"):
        print(eval_tools.format_summary(report["tools"]))
    print(f"eval: JSON in {args.out}", file=sys.stderr)
    return 0 if any(c["turns"] for c in report["conversations"]) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
