"""One eval conversation as a user on headphones lives it: speech streamed in real time,
the reply audio played back to back as it arrives, and, where the set says so, something
said over the reply while it is heard.

The gateway sends reply audio faster than real time, so what the user hears is a
playback queue on the client (docs/protocol.md, barge-in): ``Playback`` keeps it, on
the monotonic clock, and flushes it on ``interrupt`` (or ``turn_resumed``) the way a
client must.  What was heard when, and when it stopped, is then measured here, at the
client, where the user is.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .eval_set import SR, Conversation, Voices

FRAME_MS = 20
STOPS = ("interrupt", "turn_resumed")  # events after which older replies must fall silent


@dataclass
class Segment:
    turn: int
    start: float   # monotonic seconds: this audio is heard from start to end
    end: float


@dataclass
class Playback:
    """The client's playback queue: reply audio heard back to back, flushed on a stop."""
    segments: list[Segment] = field(default_factory=list)
    cut: dict[int, float] = field(default_factory=dict)   # turn -> when its audio was cut
    stop_below: int = -1    # audio of turns below this one is no longer played
    stopped_at: float = 0.0

    def add(self, turn: int, seconds: float, now: float) -> None:
        if turn < self.stop_below:  # still under way when the stop came: dropped
            self.cut.setdefault(turn, self.stopped_at)
            return
        start = max(now, self.end())
        if self.segments and self.segments[-1].turn == turn and \
                self.segments[-1].end >= start - 1e-6:
            self.segments[-1].end = start + seconds
        else:
            self.segments.append(Segment(turn, start, start + seconds))

    def stop(self, below: int, now: float, unfinished: set[int] = frozenset()) -> None:
        """Drop the queued audio of every turn below ``below`` (an ``interrupt``).
        ``unfinished``: turns whose reply was still under way (no ``reply_done``): one
        heard in part is cut now even when its audio had run dry (synthesis slower than
        real time): the rest of it never comes."""
        self.stop_below, self.stopped_at = max(self.stop_below, below), now
        for s in self.segments:
            if s.turn < below and s.turn in unfinished:
                self.cut.setdefault(s.turn, now)
        kept = []
        for s in self.segments:
            if s.turn < below and s.end > now:
                self.cut.setdefault(s.turn, now)
                if s.start >= now:
                    continue
                s.end = now
            kept.append(s)
        self.segments = kept

    def end(self) -> float:
        """When the audio queued so far has been heard out."""
        return self.segments[-1].end if self.segments else 0.0

    def playing(self, now: float) -> int | None:
        """The turn heard at ``now``, else None."""
        for s in reversed(self.segments):
            if s.start <= now < s.end:
                return s.turn
        return None

    def heard(self, start: float, end: float, since_turn: int = -1) -> float:
        """Seconds of reply audio heard between two moments (of turns >= since_turn)."""
        return sum(max(0.0, min(s.end, end) - max(s.start, start)) for s in self.segments
                   if s.turn >= since_turn)

    def turn_end(self, turn: int) -> float | None:
        ends = [s.end for s in self.segments if s.turn == turn]
        return max(ends) if ends else None

    def turns_between(self, start: float, end: float) -> set[int]:
        """Turns whose audio was heard at some moment in [start, end]."""
        return {s.turn for s in self.segments if s.start <= end and s.end > start}


@dataclass
class Cue:
    """Something said over a reply (a backchannel, an interruption)."""
    kind: str
    text: str
    sent_at: float | None = None   # monotonic: its first frame was sent
    at_s: float | None = None      # ... and its session position (s)
    over_turn: int | None = None   # the reply being heard then


@dataclass
class Played:
    """What one conversation left behind for scoring."""
    tracker: Any
    playback: Playback
    spans: list = field(default_factory=list)   # per user turn: (begin_s, end_s, piece starts)
    piece_mono: dict = field(default_factory=dict)  # piece position (s) -> when sent
    end_mono: dict = field(default_factory=dict)    # user turn index -> its speech sent out
    cues: dict = field(default_factory=dict)        # user turn index -> Cue
    session_id: str = ""


async def play_conversation(open_connection: Callable, conv: Conversation, voices: Voices, *,
                            turn_timeout: float, tail_s: float) -> Played:
    """Stream every user turn in real time, then silence until it is answered and heard
    out (or ``turn_timeout``); say a turn's cue once ``cue_after_s`` of its reply was
    heard."""
    from s2s.client.protocol import Tracker

    conn = await open_connection()
    tracker, playback = Tracker(), Playback()
    played = Played(tracker, playback, session_id=conn.session_id)
    step = SR * FRAME_MS // 1000
    pos, t_start = 0, time.monotonic()

    async def receive() -> None:
        while (msg := await conn.recv()) is not None:
            now = time.monotonic()
            if isinstance(msg, (bytes, bytearray)):
                turn = tracker.audio_turn
                rate = tracker.turns[turn].sample_rate if turn in tracker.turns else 0
                if turn is not None and rate:
                    playback.add(turn, len(msg) / 2 / rate, now)
            elif msg.get("type") in STOPS and isinstance(msg.get("turn"), int):
                playback.stop(msg["turn"], now,
                              {n for n, t in tracker.turns.items() if not t.done})
                if msg["type"] == "turn_resumed":  # as an interrupt: older replies are over
                    for old in tracker.turns.values():
                        if old.turn < msg["turn"] and (old.reply or old.audio):
                            old.interrupted = True
            tracker.handle(msg)

    async def send(samples: np.ndarray, pieces: tuple = ()) -> None:
        nonlocal pos
        todo = list(pieces)
        for i in range(0, len(samples), step):
            while todo and todo[0] * SR <= pos + 1:
                played.piece_mono[todo.pop(0)] = time.monotonic()
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
        for index, turn in enumerate(conv.turns):
            audio, starts = voices.turn_audio(conv.voice, turn)
            begin = pos / SR
            pieces = tuple(begin + s for s in starts)
            first_turn = max(tracker.turns, default=-1) + 1
            await send(audio, pieces)
            played.spans.append((begin, pos / SR, list(pieces)))
            played.end_mono[index] = time.monotonic()
            cue = Cue(turn.cue_kind, turn.cue) if turn.cue else None
            if cue:
                played.cues[index] = cue
            waited = time.monotonic()
            while True:  # silence until answered and heard out (plus a pause), or timeout
                await send(silence)
                now = time.monotonic()
                if cue and cue.sent_at is None and playback.playing(now) is not None and \
                        playback.heard(waited, now, first_turn) >= turn.cue_after_s:
                    cue.sent_at, cue.over_turn, cue.at_s = now, playback.playing(now), pos / SR
                    await send(voices.say(turn.cue_voice or conv.voice, turn.cue))
                if not tracker.outstanding() and tracker.turns and \
                        now >= max(playback.end(), waited) + tail_s:
                    break
                if now - waited >= turn_timeout:
                    break
    finally:
        await conn.close()
        try:
            await asyncio.wait_for(receiver, 5)
        except (asyncio.TimeoutError, Exception):
            receiver.cancel()
    return played
