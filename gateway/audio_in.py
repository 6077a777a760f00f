"""A session's microphone audio into Redis, and the watch that a VAD owner reads it.

Each binary message is checked (size, whole samples, the audio cap), charged to the
session's audio bucket and to its principal's per-minute budget, and XADDed to
``s2s:audio:{sid}``.  While Redis is unreachable the audio waits at the gateway, bounded
(``held_audio.py``), and goes out in order once Redis is back; a Redis that refuses writes
(OOM, read-only) loses that audio only.  Either way one error event per 2 s.
The first audio written and not yet seen read is the probe the failover loop checks
(``check_vad``): unread for ``gateway_vad_stale_s`` and no VAD worker holding the session
means its entry was lost, and the session is opened again."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from redis.exceptions import ResponseError

from s2s.bus import REDIS_DOWN, Bus, entry_order
from s2s.config import Settings
from s2s.frames import Audio, SessionOpen

from . import messages
from .auth import Principal
from .errors import Reject
from .faults import REDIS_REFUSED, RESTORED, redis_error_kind
from .held_audio import HeldAudio
from .limits import audio_bucket

if TYPE_CHECKING:
    from .admission import Admission

log = logging.getLogger("s2s.gateway")

ERROR_EVERY_S = 2.0


class AudioIn:
    def __init__(self, settings: Settings, admission: "Admission | None",
                 send: Callable[[Any], Awaitable[None]]):
        self.settings, self.admission, self.send = settings, admission, send
        self.bucket = audio_bucket(settings)
        self.last_audio = time.monotonic()      # for the idle timeout
        self.last_error = 0.0
        self.open_id: bytes | None = None       # the session's entry in s2s:vad:sessions
        self.probe: tuple[bytes, float] | None = None  # (audio id, when) not yet seen read
        self.held: HeldAudio | None = None      # audio waiting out a Redis outage
        self.order = asyncio.Lock()  # held audio before newer audio, written by one task at a time

    async def write(self, bus: Bus, sid: str, principal: Principal, sample_rate: int,
                    pcm: bytes) -> None:
        if not pcm:
            return
        seconds = messages.audio(pcm, self.settings.max_message_bytes, sample_rate)
        if not self.bucket.take(seconds):
            raise Reject("rate_limited", f"more than {self.settings.max_audio_rate:g} s of "
                         "audio per second: message dropped")
        now = self.last_audio = time.monotonic()
        try:
            allowed = self.admission is None or await self.admission.audio_allowed(
                principal, seconds)
        except REDIS_DOWN:
            allowed = True  # the write below reports the outage
        if not allowed:
            raise Reject("audio_limit", "this key or token sent its audio seconds for this "
                         "minute: message dropped")
        wall = time.time()
        if self.held is None:
            self.held = HeldAudio(self.settings.gateway_outage_audio_s, sample_rate)
        try:
            async with self.order:
                if not await self._deliver_held(bus, sid):
                    await self._hold(sid, pcm, wall, "Redis still unavailable")
                    return
                await self._emit(bus, sid, sample_rate, pcm, wall)
        except REDIS_DOWN as e:
            self.probe = None
            await self._hold(sid, pcm, wall, f"Redis unavailable ({e})")
        except ResponseError as e:  # OOM, READONLY...: the session stays, this audio is lost
            kind = redis_error_kind(e) or "other"
            REDIS_REFUSED.labels(kind).inc()
            await self._lost(sid, "busy", f"the service is busy ({kind}): audio dropped",
                             f"Redis refused audio ({kind}): {e}")

    async def _emit(self, bus: Bus, sid: str, sample_rate: int, pcm: bytes,
                    wall: float) -> None:
        ids = await bus.emit(Audio(sid=sid, pcm=pcm, sr=sample_rate, marks={"recv": wall}))
        if self.probe is None and ids:
            self.probe = (ids[0], time.monotonic())

    async def deliver_held(self, bus: Bus, sid: str) -> bool:
        """Write the audio held through an outage, oldest first; True once none is left."""
        if not self.held:
            return True
        async with self.order:
            return await self._deliver_held(bus, sid)

    async def _deliver_held(self, bus: Bus, sid: str) -> bool:
        if not self.held:
            return True
        if self.held.expire():
            log.warning("audio held through a Redis outage for too long: oldest dropped",
                        extra={"sid": sid})
        for wall, pcm in self.held.frames():
            try:
                await self._emit(bus, sid, self.held.sample_rate, pcm, wall)
            except REDIS_DOWN + (ResponseError,):
                return False
            self.held.delivered(len(pcm))
        log.info("audio held through a Redis outage delivered", extra={"sid": sid})
        return True

    async def _hold(self, sid: str, pcm: bytes, wall: float, detail: str) -> None:
        assert self.held is not None
        if self.held.hold(pcm, wall):
            await self._lost(sid, "unavailable", "the service is unavailable: the oldest "
                             "audio held for it was dropped", f"{detail}: oldest audio dropped")
        else:
            await self._lost(sid, "unavailable", "the service is unavailable: audio is held "
                             "until it is back", f"{detail}: audio held")

    async def _lost(self, sid: str, code: str, message: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.last_error > ERROR_EVERY_S:
            self.last_error = now
            log.warning("%s", detail, extra={"sid": sid})
            await self.send({"type": "error", "code": code, "message": message})

    async def check_vad(self, bus: Bus, sid: str, opening: SessionOpen,
                        gateway_id: str | None) -> None:
        """Audio written ``gateway_vad_stale_s`` ago and still unread by a VAD owner: if
        the session's entry in s2s:vad:sessions was lost (Redis restarted empty) or
        released, open the session again (``opening``).  A pending or queued entry means
        a VAD worker has it or will (a dead owner's entry is claimed by the runtime), so
        nothing is done: opening twice would give the session two owners."""
        await self.deliver_held(bus, sid)
        if self.probe is None:
            return
        audio_id, written = self.probe
        if time.monotonic() - written < self.settings.gateway_vad_stale_s:
            return
        pos = await bus.vad_position(sid)
        if pos is not None and entry_order(pos) >= entry_order(audio_id):
            self.probe = None
            return
        state = await bus.session_entry_state(self.open_id) if self.open_id else "gone"
        if state in ("owned", "queued"):
            self.probe = None  # look again at the next unread audio
            return
        ids = await bus.emit(opening)
        self.open_id = await bus.own_session(sid, gateway_id, ids[0]) if gateway_id else ids[0]
        self.probe = None
        RESTORED.labels("vad").inc()
        log.warning("session had no VAD owner (its entry was %s): opened again", state,
                    extra={"sid": sid, "turn": opening.turn})
