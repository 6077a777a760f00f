"""``s2s dead``: read, replay and purge the dead letters in ``s2s:dead``.

A dead letter is an entry that kept killing the workers that took it (see
``Runtime._drop_poison``).  Once the cause is fixed (a new model, a bug fix) it can be
replayed: its frame goes back to the stream it came from, as a new entry.

    s2s dead list                  # id, age, stream, deliveries, sid/turn, reason
    s2s dead show ID               # one dead letter, its frame decoded
    s2s dead replay ID             # back to its stream; the dead letter is deleted
    s2s dead purge [--older-than 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

from . import config
from .bus import FIELD, Bus, entry_ms
from .frames import FrameError, decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="List dead letters, newest first.")
    p.add_argument("--count", type=int, default=50, help="most dead letters listed")
    p = sub.add_parser("show", help="Show one dead letter with its frame decoded.")
    p.add_argument("id", help="the dead letter's id (from `s2s dead list`)")
    p = sub.add_parser("replay", help="XADD the frame to its original stream again and "
                                      "delete the dead letter.")
    p.add_argument("id", help="the dead letter's id (from `s2s dead list`)")
    p = sub.add_parser("purge", help="Delete dead letters (all, or the older ones).")
    p.add_argument("--older-than", type=float, default=None, metavar="SECONDS",
                   help="only those older than this many seconds")
    for p in sub.choices.values():
        config.add_flags(p, ["core"])


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace")


def _frame_summary(data: bytes, max_bytes: int) -> dict:
    try:
        frame = decode(data, max_bytes)
    except FrameError as e:
        return {"kind": "?", "error": str(e)}
    out = {"kind": type(frame).__name__, "sid": frame.sid, "turn": frame.turn}
    for name in ("text", "start_s", "end_s", "sr", "in_sr"):
        if hasattr(frame, name):
            out[name] = getattr(frame, name)
    if hasattr(frame, "pcm"):
        out["pcm_bytes"] = len(frame.pcm)
    return out


def _age(dead_id: bytes, now: float) -> str:
    s = max(now - entry_ms(dead_id) / 1000, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


async def _run(args: argparse.Namespace, settings: config.Settings) -> int:
    bus = Bus(settings)
    try:
        if args.action == "list":
            rows = await bus.dead_letters(count=args.count)
            if not rows:
                print("no dead letters")
                return 0
            now = time.time()
            print(f"{'id':<20} {'age':>6} {'stream':<18} {'deliv':>5} {'sid/turn':<24} reason")
            for dead_id, f in rows:
                frame = _frame_summary(f.get(FIELD, b""), settings.max_frame_bytes)
                who = f"{frame.get('sid', '?')}/{frame.get('turn', '?')}"
                print(f"{dead_id.decode():<20} {_age(dead_id, now):>6} "
                      f"{_text(f.get(b'stream')):<18} {_text(f.get(b'deliveries')):>5} "
                      f"{who:<24.24} {_text(f.get(b'reason'))}")
            return 0
        if args.action == "show":
            fields = await bus.dead_letter_get(args.id)
            if fields is None:
                print(f"no dead letter {args.id}", file=sys.stderr)
                return 1
            print(json.dumps({
                "id": args.id, "age": _age(args.id.encode(), time.time()),
                **{k.decode(): _text(v) for k, v in fields.items() if k != FIELD},
                "frame": _frame_summary(fields.get(FIELD, b""), settings.max_frame_bytes)},
                indent=2, default=str))
            return 0
        if args.action == "replay":
            try:
                new_id = await bus.dead_letter_replay(args.id)
            except ValueError as e:
                print(str(e), file=sys.stderr)
                return 1
            if new_id is None:
                print(f"no dead letter {args.id}", file=sys.stderr)
                return 1
            print(f"replayed {args.id} as {new_id.decode()}")
            return 0
        n = await bus.dead_letter_purge(args.older_than)
        print(f"purged {n} dead letter{'s' if n != 1 else ''}")
        return 0
    finally:
        await bus.close()


def main(args: argparse.Namespace) -> int:
    settings = config.from_args(args)
    settings.redis()  # exits with a clear message when no Redis is configured
    if getattr(args, "id", None) is not None:
        if not re.fullmatch(r"\d{1,20}-\d{1,20}", args.id):
            print(f"not a dead letter id: {args.id!r} (like 1700000000000-0)", file=sys.stderr)
            return 2
    return asyncio.run(_run(args, settings))
