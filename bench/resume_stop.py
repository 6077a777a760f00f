"""False-interruption recovery, measured at the client: the user says a thought, pauses,
the assistant starts its reply, and the user goes on with the same thought while it plays.

``resume_over_reply`` streams the first part in real time, then silence until the reply's
audio starts (plus ``after_s`` of it), then the rest, and records every event with the
wall time it arrived: how soon after the resumed speech the reply stopped (``interrupt``,
and the last audio of the old turn), the ``turn_resumed`` event, and the one reply to the
whole thought.

    .venv/bin/python -m s2s.bench.resume_stop --url ws://127.0.0.1:PORT/ws [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from s2s.client.protocol import Connection

SR = 16000
FRAME = SR // 50  # 20 ms frames, as a live client sends them


@dataclass
class Resumed:
    first_turn: int | None = None       # the turn whose reply started early
    resumed_at: float | None = None     # wall time the first frame of the rest was sent
    speech_end_at: float | None = None  # ... the last frame of the rest
    interrupt_at: float | None = None
    events: list[tuple[float, dict]] = field(default_factory=list)
    old_audio_after_interrupt: int = 0  # bytes of the early reply received after interrupt
    timed_out: bool = False

    def of_type(self, kind: str) -> list[dict]:
        return [e for _, e in self.events if e.get("type") == kind]

    @property
    def stop_ms(self) -> float | None:
        """From the resumed speech's first frame sent to the interrupt received."""
        if self.interrupt_at is None or self.resumed_at is None:
            return None
        return (self.interrupt_at - self.resumed_at) * 1000

    @property
    def final_turns(self) -> list[int]:
        """Turns after the early one whose reply was completed."""
        return [e["turn"] for e in self.of_type("reply_done")
                if self.first_turn is not None and e["turn"] > self.first_turn]


async def resume_over_reply(url: str, first: np.ndarray, rest: np.ndarray,
                            after_s: float = 0.3, timeout_s: float = 90.0) -> Resumed:
    out = Resumed()
    conn = await Connection.open(url, SR)
    started = asyncio.Event()
    done = asyncio.Event()

    async def receive() -> None:
        audio_turn = None  # the turn whose audio the bytes now arriving belong to
        while (msg := await conn.recv()) is not None:
            now = time.time()
            if isinstance(msg, bytes):
                if out.interrupt_at is not None and audio_turn == out.first_turn:
                    out.old_audio_after_interrupt += len(msg)
                continue
            out.events.append((now, msg))
            kind, turn = msg.get("type"), msg.get("turn")
            if kind == "audio_start":
                audio_turn = turn
                if out.first_turn is None:
                    out.first_turn = turn
                    started.set()
            elif kind == "interrupt" and out.interrupt_at is None and out.resumed_at:
                out.interrupt_at = now
            elif kind == "reply_done" and out.first_turn is not None \
                    and turn > out.first_turn and out.speech_end_at is not None:
                done.set()

    async def send(pcm: np.ndarray, resumed: bool = False) -> None:
        t0 = time.monotonic()
        if resumed:  # before the first frame: the interrupt may come while it is sent
            out.resumed_at = time.time()
        for i, at in enumerate(range(0, len(pcm), FRAME)):
            await conn.send_audio(pcm[at:at + FRAME])
            await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME / SR - time.monotonic()))

    async def silence_until(event: asyncio.Event, limit: float) -> bool:
        quiet = np.zeros(FRAME, np.int16)
        deadline = time.monotonic() + limit
        while not event.is_set() and time.monotonic() < deadline:
            await conn.send_audio(quiet)
            await asyncio.sleep(FRAME / SR)
        return event.is_set()

    reader = asyncio.create_task(receive())
    try:
        await send(first)
        if not await silence_until(started, timeout_s):
            out.timed_out = True
            return out
        await silence_until(asyncio.Event(), after_s)  # some of the reply is heard
        await send(rest, resumed=True)
        out.speech_end_at = time.time()
        out.timed_out = not await silence_until(done, timeout_s)
        return out
    finally:
        await conn.close()
        reader.cancel()


def main() -> None:
    from s2s.bench.eval_set import Voices
    from s2s.bench.eval_turns import RESUMED
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--runs", type=int, default=1, help="times each thought is said")
    ap.add_argument("--after", type=float, default=0.3, help="reply heard before going on (s)")
    args = ap.parse_args()
    voices = Voices(Path("~/.cache/s2s/eval-audio"))
    stops, ok = [], 0
    n = 0
    for _ in range(args.runs):
        for voice, first, _pause, rest in RESUMED:
            n += 1
            pad = np.zeros(SR // 5, np.int16)
            r = asyncio.run(resume_over_reply(
                args.url, np.concatenate([pad, voices.say(voice, first)]),
                voices.say(voice, rest), args.after))
            resumed = r.of_type("turn_resumed")
            one = len(r.final_turns) == 1
            ok += bool(resumed) and one
            if r.stop_ms is not None:
                stops.append(r.stop_ms)
            print(f"{first!r} + {rest!r}: stop {r.stop_ms and round(r.stop_ms)} ms, "
                  f"turn_resumed {resumed}, replies after it {len(r.final_turns)}"
                  f"{' TIMED OUT' if r.timed_out else ''}", flush=True)
    if stops:
        stops.sort()
        print(f"\nreply stopped after the resumed speech began: p50 "
              f"{statistics.median(stops):.0f} ms, p95 "
              f"{stops[min(len(stops) - 1, int(0.95 * len(stops)))]:.0f} ms, max "
              f"{stops[-1]:.0f} ms (n={len(stops)}); resumed and answered once: {ok}/{n}")


if __name__ == "__main__":
    main()
