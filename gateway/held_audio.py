"""Microphone audio kept at the gateway while Redis is unreachable.

Without it, what the user said during a Redis restart was lost and the utterance reached
the STT with a hole ("How many likes?" for "How many legs does a spider have?").  The
pieces wait here, in order, bounded in bytes (``gateway_outage_audio_s`` of audio at the
session's rate: past it the oldest go) and in time (pieces held twice that long go: the
user has moved on), and are written before any newer audio once Redis answers again.
The VAD places speech by its sample position, not by when it arrives, so late audio
still ends its utterance where the user stopped."""

from __future__ import annotations

import time
from collections import deque

from .faults import HELD_AUDIO

MERGE_S = 0.5  # held pieces go back as frames at most this long (fewer commands)


class HeldAudio:
    def __init__(self, max_s: float, sample_rate: int):
        self.sample_rate = sample_rate
        self.max_bytes = int(max_s * sample_rate) * 2
        self.max_age_s = 2 * max_s
        self.bytes_per_s = 2 * sample_rate
        self.pieces: deque[tuple[float, float, bytes]] = deque()  # (monotonic, wall, pcm)
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.pieces)

    def hold(self, pcm: bytes, wall: float) -> float:
        """Keep ``pcm``; returns the seconds of audio dropped to stay within the bounds."""
        if self.max_bytes <= 0:
            self._count(len(pcm), "dropped")
            return len(pcm) / self.bytes_per_s
        self.pieces.append((time.monotonic(), wall, pcm))
        self.size += len(pcm)
        self._count(len(pcm), "held")
        return self.expire(len(pcm))

    def expire(self, incoming: int = 0) -> float:
        dropped = 0
        now = time.monotonic()
        while self.pieces and (self.size > self.max_bytes
                               or now - self.pieces[0][0] > self.max_age_s):
            _, _, pcm = self.pieces.popleft()
            self.size -= len(pcm)
            dropped += len(pcm)
        if dropped:
            self._count(dropped, "dropped")
        return dropped / self.bytes_per_s

    def frames(self) -> list[tuple[float, bytes]]:
        """The held audio in order, merged into pieces of at most ``MERGE_S``, each with
        the wall time its first part arrived; not removed until ``delivered``."""
        out: list[tuple[float, bytes]] = []
        limit = int(MERGE_S * self.bytes_per_s)
        for _, wall, pcm in self.pieces:
            if out and len(out[-1][1]) + len(pcm) <= limit:
                out[-1] = (out[-1][0], out[-1][1] + pcm)
            else:
                out.append((wall, pcm))
        return out

    def delivered(self, nbytes: int) -> None:
        """The first ``nbytes`` of the held audio are in Redis now: always whole pieces,
        since ``frames`` merges whole pieces only."""
        self._count(nbytes, "delivered")
        while nbytes > 0 and self.pieces:
            pcm = self.pieces.popleft()[2]
            self.size -= len(pcm)
            nbytes -= len(pcm)

    def _count(self, nbytes: int, outcome: str) -> None:
        HELD_AUDIO.labels(outcome).inc(nbytes / self.bytes_per_s)
