"""Which piece the TTS worker renders next: earliest deadline first.

A worker renders one piece at a time (one onnxruntime thread) but holds several
replies in flight (``TtsStage.concurrency``), so between two pieces it can choose.
A piece's deadline is when the client would run out of audio without it:

- the first piece of a reply (nothing played yet): now, i.e. at once, in arrival order;
- a later piece: when the audio already sent for this reply runs out (time of its
  first audio + seconds of audio sent), less ``SLACK_S`` of safety;
- a later seq whose reply this worker has not seen (its first audio came from another
  worker, or the record was evicted): now + ``UNKNOWN_SLACK_S``.

So across sessions first pieces go before later ones, and a later piece becomes
urgent exactly when its session would otherwise hear a gap.  Deadlines are fixed
points in time, so nothing waits forever: newer pieces always get later deadlines.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict

SLACK_S = 1.5           # a later piece is due this long before the client's audio runs
                        # out: margin for a few first pieces and a busy CPU
UNKNOWN_SLACK_S = 0.8   # a later seq of a reply this worker has no record of
MAX_REPLIES = 256       # per-reply records kept (LRU): bounded memory whatever happens


class Replies:
    """Per reply (sid, turn): wall time of its first audio and seconds of audio sent."""

    def __init__(self, limit: int = MAX_REPLIES):
        self.limit = limit
        self._r: OrderedDict[tuple[str, int], list[float]] = OrderedDict()

    def deadline(self, sid: str, turn: int, seq: int, now: float | None = None) -> float:
        now = time.time() if now is None else now
        rec = self._r.get((sid, turn))
        if rec is None:
            return now if seq == 0 else now + UNKNOWN_SLACK_S
        return rec[0] + rec[1] - SLACK_S

    def sent(self, sid: str, turn: int, seconds: float, now: float | None = None) -> None:
        key = (sid, turn)
        rec = self._r.get(key)
        if rec is None:
            rec = self._r[key] = [time.time() if now is None else now, 0.0]
            while len(self._r) > self.limit:
                self._r.popitem(last=False)
        else:
            self._r.move_to_end(key)
        rec[1] += seconds

    def done(self, sid: str, turn: int) -> None:
        self._r.pop((sid, turn), None)

    def __len__(self) -> int:
        return len(self._r)


class RenderQueue:
    """A lock that one render holds at a time; waiters get it by deadline, then by
    ``order`` (a reply's (seq, piece): its pieces share a deadline and must come out in
    order), then arrival.  A waiter that is cancelled (turn superseded) leaves the queue."""

    def __init__(self) -> None:
        self.busy = False
        self._heap: list[tuple[float, tuple, int, asyncio.Future]] = []
        self._n = itertools.count()

    def waiting(self) -> int:
        return sum(1 for *_, f in self._heap if not f.done())

    async def acquire(self, deadline: float, order: tuple = ()) -> None:
        if not self.busy and not self.waiting():
            self.busy = True
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (deadline, order, next(self._n), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled before it ran: pass it on
            else:
                fut.cancel()
            raise

    def release(self) -> None:
        while self._heap:
            *_, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # stays busy: handed to the next waiter
                return
        self.busy = False
