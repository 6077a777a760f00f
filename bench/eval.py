"""``s2s eval`` / ``python -m s2s.bench.eval``: conversation quality against a running
stack (``s2s up``), on the spoken set of ``bench/eval_set.py``.

Each conversation is one session: every user turn is streamed in real time (its pauses
included), then silence until the turn is answered (or ``--turn-timeout``).  Scores:

- transcript WER: what the stack heard against what was said (numbers normalised);
- keyword accuracy: replies containing every expected keyword (factual, multi-turn);
- early answers: turns whose reply audio was heard before the user's last piece started
  (dictation: the assistant talked over a user who had only paused);
- degenerate replies: a repeated sentence or a phrase loop, or a fragment (a reply
  ending mid-sentence on a word like "and");
- round-trip WER: the reply audio transcribed again (bundled whisper) against the
  reply text: does the voice say what the model wrote;
- voice-to-voice p50/p90/p95: end of the user's speech to the first reply audio;
- turn-taking, as heard through the client's playback queue (bench/eval_play.py,
  bench/eval_score.py): early audio heard, recovery time when the user resumes over a
  reply, one answer per thought, backchannel cancels and interruption stop times (said
  over a reply while it is heard), digit error rate, echo and repeat rates.

It prints two tables (quality, turn-taking), writes JSON (``--out``) and, with
``--plot``, a figure of the turn-taking numbers (docs/turn-taking.md).  Numbers on a
busy machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from s2s import config

from . import eval_score, eval_tools
from .eval_play import play_conversation
from .eval_score import (degenerate, format_table, format_turn_taking, has_keywords,  # noqa: F401
                         norm_words, score, wer)
from .eval_set import CONVERSATIONS, DEFAULT_GROUPS, SR, Conversation, Voices, groups



async def run_conversation(url: str, conv: Conversation, voices: Voices, *, api_key: str,
                           turn_timeout: float, tail_s: float,
                           redis_url: str = "") -> dict[str, Any]:
    from s2s.client.protocol import Connection

    async def open_connection() -> Connection:
        kwargs: dict[str, Any] = {}
        if api_key and "api_key" in inspect.signature(Connection.open).parameters:
            kwargs["api_key"] = api_key
        return await Connection.open(url, SR, **kwargs)

    played = await play_conversation(open_connection, conv, voices,
                                     turn_timeout=turn_timeout, tail_s=tail_s)
    result = score(conv, played)
    if conv.group == "tools":  # the calls, from the conversation the LLM kept
        entries = eval_tools.history(redis_url, played.session_id)
        for turn, scored in zip(conv.turns, result["turns"]):
            scored.update(eval_tools.score_turn(turn, scored["reply"], entries))
    return result


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


def summarize(results: list[dict]) -> dict[str, dict]:
    return eval_score.summarize(results, groups())


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
    parser.add_argument("--plot", default="", help="write the turn-taking figure here (PNG)")
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
    pool = list(CONVERSATIONS)
    if "long" in wanted:  # the replies bench's sessions, spoken too
        from .eval_turns import reply_sessions

        pool += reply_sessions()
    for c in pool:
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
            r = {"id": c.id, "group": c.group, "subset": c.subset, "voice": c.voice, "turns": [],
                 "errors": [{"message": f"{type(e).__name__}: {e}"}]}
        results.append(r)
        print(f"eval: {c.id}: " + " | ".join(
            f"heard {t['heard']!r} -> {t['reply']!r}{' EARLY' if t['early'] else ''}"
            f"{' RECOVERY ' + str(t['recovery_s']) if t['recovery_s'] else ''}"
            f"{' CUE ' + str(t['cue']) if t['cue'] else ''}"
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
    print()
    print(format_turn_taking(report["summary"], args.label))
    if args.plot:
        from .eval_plot import plot

        plot(report, args.plot)
        print(f"eval: figure in {args.plot}", file=sys.stderr)
    if report.get("tools"):
        print(eval_tools.format_summary(report["tools"]))
    print(f"eval: JSON in {args.out}", file=sys.stderr)
    return 0 if any(c["turns"] for c in report["conversations"]) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
