"""Admission control: whether one more session fits, per-principal limits, idle sessions.

The gateway keeps a picture of the stack's headroom, refreshed every second from Redis
(one loop per gateway): per stage the lag, the pending count and the wait of the oldest
undelivered entry of its shared stream, the live workers per stage (registry
``s2s:workers``) and the open sessions of all gateways (``s2s:live``).  A new session is
refused with ``busy`` (close 1013, ``retry_after_s`` in the error event) when the stack
holds its capacity already or a stage's queue wait is past the bound: admitting more
would only make everyone's replies late together.  The same loop refreshes this
gateway's sessions in Redis (so counts across gateways stay right and a crashed
gateway's sessions age out), closes idle sessions, and checks each session's bytes in
Redis every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter

from s2s.bus import REDIS_DOWN, Bus
from s2s.config import Settings

from .auth import Principal

log = logging.getLogger("s2s.gateway.admission")

VAD_SESSIONS_PER_WORKER = 64   # what one VAD worker holds (its session concurrency)
TICK_S = 1.0
BYTES_EVERY_S = 5.0            # MEMORY USAGE is not free: sample each session this often
LIVE_MAX_AGE_S = 30.0

REFUSED = Counter("s2s_gateway_refused_sessions_total",
                  "New sessions refused by admission control, by reason", ["reason"])


@dataclass
class Refusal:
    code: str                  # busy, session_limit
    message: str
    retry_after_s: float | None = None


class Admission:
    def __init__(self, settings: Settings, bus: Bus, sessions: dict):
        self.settings = settings
        self.bus = bus
        self.sessions = sessions            # this gateway's open sessions (sid -> ClientSession)
        self.lock = asyncio.Lock()          # one admission decision at a time per gateway
        self.backlog: dict[str, dict] = {}
        self.workers: dict[str, int] = {}
        self.updated = 0.0
        self.task: asyncio.Task | None = None
        self.bytes_checked = 0.0

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # --- headroom ----------------------------------------------------------------------
    async def refresh(self) -> None:
        self.backlog = await self.bus.stage_backlog()
        self.workers = {stage: len(ws) for stage, ws in (await self.bus.live_workers()).items()}
        self.updated = time.monotonic()

    def capacity(self) -> int | None:
        if self.settings.session_capacity > 0:
            return self.settings.session_capacity
        vad = self.workers.get("vad", 0)
        return vad * VAD_SESSIONS_PER_WORKER if vad else None  # unknown: no cap

    def headroom(self) -> dict:
        return {"capacity": self.capacity(), "workers": self.workers, "stages": self.backlog}

    async def admit(self, principal: Principal, sid: str) -> Refusal | None:
        """Decide on a new session and, when admitted, count it at once (under the lock,
        so a burst on this gateway cannot overshoot between the check and the count)."""
        async with self.lock:
            if time.monotonic() - self.updated > TICK_S:
                await self.refresh()
            refusal = await self._check(principal)
            if refusal is not None:
                REFUSED.labels(refusal.code).inc()
                return refusal
            await self.bus.register_sessions({sid: principal.id})
            return None

    async def _check(self, principal: Principal) -> Refusal | None:
        s = self.settings
        limit = principal.max_sessions if principal.max_sessions is not None \
            else s.principal_max_sessions
        if limit and await self.bus.live_sessions(principal.id, LIVE_MAX_AGE_S) >= limit:
            return Refusal("session_limit", f"this key or token may hold {limit} sessions at "
                                            "once: end one first")
        cap = self.capacity()
        if cap is not None and await self.bus.live_sessions(None, LIVE_MAX_AGE_S) >= cap:
            return Refusal("busy", f"the service is at its capacity of {cap} sessions; "
                                   "try again later", retry_after_s=10.0)
        bound = s.admission_max_wait_s
        if bound > 0:
            for stage, info in self.backlog.items():
                if info["wait_s"] > bound:
                    return Refusal("busy", f"the {stage} stage is {info['wait_s']:.1f} s "
                                           "behind; try again later",
                                   retry_after_s=round(min(60.0, 2 * info["wait_s"] + 1), 1))
        return None

    async def audio_allowed(self, principal: Principal, seconds: float) -> bool:
        """Count audio against the principal's per-minute budget (all gateways)."""
        rate = principal.audio_s_per_min if principal.audio_s_per_min is not None \
            else self.settings.principal_audio_s_per_min
        if not rate:
            return True
        return await self.bus.add_audio_seconds(principal.id, seconds) <= rate

    # --- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except REDIS_DOWN as e:
                log.warning("admission: Redis unavailable (%s)", e)
            except Exception:  # the loop must outlive any surprise
                log.exception("admission tick failed")

    async def _tick(self) -> None:
        await self.refresh()
        open_ = {sid: s for sid, s in self.sessions.items() if s.opened and not s.closed}
        await self.bus.register_sessions({sid: s.principal.id for sid, s in open_.items()})
        now = time.monotonic()
        idle = self.settings.idle_timeout_s
        check_bytes = self.settings.max_session_bytes and now - self.bytes_checked > BYTES_EVERY_S
        if check_bytes:
            self.bytes_checked = now
        for sid, session in open_.items():
            if idle and now - session.last_audio > idle:
                await session.end_for("idle_timeout", f"no audio for {idle:g} s: session closed")
            elif session.principal.expires is not None and time.time() > session.principal.expires:
                await session.end_for("token_expired", "the token of this session expired")
            elif check_bytes:
                used = await self.bus.session_bytes(sid)
                if used > self.settings.max_session_bytes:
                    await session.end_for("session_too_large",
                                          f"the session holds {used} bytes in Redis, over the "
                                          f"limit of {self.settings.max_session_bytes}")
