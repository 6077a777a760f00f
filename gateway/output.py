"""The output pump of one session: it XREADs ``s2s:out:{sid}``, lets ``Playback`` decide
what the client gets in which order, and sends it.  A stage's error reaches the client as
a code and a correlation id only: its text (an exception, a path, a model's complaint)
is for the operators, and is logged here under that id (the worker logs it too, with the
session and turn)."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Awaitable, Callable

from prometheus_client import Counter
from redis.exceptions import ResponseError

from s2s import metrics
from s2s.bus import REDIS_DOWN, Bus
from s2s.frames import FrameError, decode

from .faults import REDIS_REFUSED, redis_error_kind
from .playback import Playback

log = logging.getLogger("s2s.gateway")

READ_COUNT, READ_BLOCK_MS = 200, 1000
STAGE_ERRORS = Counter("s2s_gateway_stage_errors", "Stage failures reported to clients (an "
                       "error code and a correlation id; the text is in the gateway's log).")
STAGE_ERROR_MESSAGE = "a stage of the pipeline failed on this turn; quote correlation_id {} " \
                      "to the operators"


def _redis_down(e: Exception) -> None:
    """The output reader's Redis failure (every session of the gateway waits it out)."""
    kind = redis_error_kind(e)
    if kind:
        REDIS_REFUSED.labels(kind).inc()
    metrics.REDIS_ERRORS.labels("gateway").inc()
    log.warning("Redis unavailable for the output streams (%s); retrying", e)


def new_correlation_id() -> str:
    return "err_" + secrets.token_hex(8)


class OutputPump:
    def __init__(self, bus: Bus, sid: str, playback: Playback, max_frame_bytes: int,
                 send: Callable[[Any], Awaitable[None]], alive: Callable[[], bool]):
        self.bus, self.sid, self.playback = bus, sid, playback
        self.max_frame_bytes = max_frame_bytes
        self.send, self.alive = send, alive
        self.turn_start: bytes | None = None  # output entry that opened the current turn

    async def run(self, last: bytes) -> None:
        # read with every other session's output on one connection (s2s.bus_reader),
        # which retries Redis trouble itself (counted and logged by _redis_down)
        follow = self.bus.follow_out(self.sid, last, READ_COUNT, READ_BLOCK_MS, _redis_down)
        try:
            await self._pump(follow)
        finally:
            follow.close()

    async def _pump(self, follow) -> None:
        while self.alive():
            entries = await follow.get(READ_BLOCK_MS / 1000)
            turn = self.playback.turn
            for entry_id, data in entries:
                try:
                    frame = decode(data, self.max_frame_bytes)
                    if frame.sid != self.sid:
                        raise FrameError(f"frame of session {frame.sid!r}", "wrong_session")
                except FrameError as e:
                    metrics.BAD_FRAMES.labels("gateway", e.reason).inc()
                    log.warning("skipped a bad output frame: %s", e, extra={"sid": self.sid})
                    continue
                if frame.turn > self.playback.turn:
                    self.turn_start = entry_id
                for message in self.playback.feed(frame):
                    await self.send(self._for_client(message))
            if self.playback.turn > turn and self.turn_start is not None:
                await self._trim_played()
            for message in self.playback.check_gaps():
                await self.send(message)

    def _for_client(self, message: Any) -> Any:
        if not (isinstance(message, dict) and message.get("type") == "error"
                and message.get("code") == "stage_error"):
            return message
        ref = new_correlation_id()
        STAGE_ERRORS.inc()
        log.error("stage error, told the client as %s: %s", ref, message.get("message", ""),
                  extra={"sid": self.sid, "turn": message.get("turn"), "correlation_id": ref})
        return {**message, "message": STAGE_ERROR_MESSAGE.format(ref), "correlation_id": ref}

    async def _trim_played(self) -> None:
        """Older turns are played (or superseded): drop them from the output stream.  A
        resume replays the current turn from its first entry, which stays."""
        try:
            await self.bus.trim_out(self.sid, self.turn_start)
        except REDIS_DOWN + (ResponseError,) as e:  # the next turn trims again
            log.debug("output trim failed: %s", e, extra={"sid": self.sid})
