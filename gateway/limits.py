"""Per-session limits of the gateway: token buckets for audio seconds and for typed
messages, the strike count that ends a session sending refused messages in a row, and
the time an exchange with a client may take (``within``).

Both transports (``/ws`` and ``/v1/realtime``) use these with the same settings, so a
client gets the same limits whichever face of the session it talks to."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Awaitable, Callable, TypeVar

from s2s.config import Settings

MAX_AUDIO_S = 120.0         # most audio one message, buffer or queue of a session may hold
RATE_WINDOW_S = 2.0         # max_audio_rate is averaged over this long
TYPED_WINDOW_S = 10.0       # max_typed_rate is averaged over this long
STRIKES = 10                # refused messages within STRIKE_WINDOW_S that end a session
STRIKE_WINDOW_S = 10.0

T = TypeVar("T")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


class TokenBucket:
    """``rate`` per second, at most ``burst`` saved up; ``rate`` 0 means no limit."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = burst
        self.at = clock()

    def take(self, amount: float = 1.0) -> bool:
        """Spend ``amount`` if that many are there now; False (nothing spent) otherwise."""
        if self.rate <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


def audio_bucket(settings: Settings) -> TokenBucket:
    """Seconds of audio: ``max_audio_rate`` per second, averaged over RATE_WINDOW_S."""
    rate = settings.max_audio_rate
    return TokenBucket(rate, rate * RATE_WINDOW_S)


def typed_bucket(settings: Settings) -> TokenBucket:
    """Typed messages (text, cancel): each advances the turn and writes to the shared LLM
    stream, so a client typing faster than ``max_typed_rate`` is refused, not queued."""
    rate = settings.max_typed_rate
    return TokenBucket(rate, max(1.0, rate * TYPED_WINDOW_S))


class Strikes:
    """Refused messages of one session in the last STRIKE_WINDOW_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.times: collections.deque[float] = collections.deque(maxlen=STRIKES)

    def add(self) -> bool:
        """Count one; True when that makes STRIKES within the window."""
        now = self.clock()
        self.times.append(now)
        while self.times and self.times[0] < now - STRIKE_WINDOW_S:
            self.times.popleft()
        return len(self.times) >= STRIKES


async def within(seconds: float | None, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, or asyncio.TimeoutError after ``seconds`` (None: no limit).
    On Python 3.11+ without a task per call (this bounds every message sent)."""
    if seconds is None:
        return await awaitable
    if _timeout is not None:
        async with _timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)
