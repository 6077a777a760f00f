"""What keeps a gateway's sessions alive across gateway deaths and Redis restarts.

One ``Failover`` per gateway process runs one loop (4 ticks per lease):

- **Lease.** The gateway's id in ``s2s:gateways`` with the time its lease lapses, and
  the set of sessions it holds (``s2s:gwsessions:<id>``).
- **Ownership.** Each session's owner record (``s2s:owner:{sid}``) is refreshed in one
  Lua script per session that also restores the turn counter to at least the highest
  turn this gateway has seen.  "Not ours any more" (a client resumed on another
  gateway) makes this gateway let the old connection go without ending the session.
  "Gone" (Redis restarted empty) restores it.
- **VAD watchdog.** Audio this gateway wrote that the session's VAD owner has not read
  after ``gateway_vad_stale_s`` makes it look at the session's entry in
  ``s2s:vad:sessions``: lost (Redis restarted empty) or released, it opens the session
  again; pending or queued, a VAD worker has it or will.
- **Reaper.** Sessions of a gateway whose lease lapsed more than ``gateway_grace_s``
  ago, and that no client resumed elsewhere, are ended (owner-checked, atomically), so
  their VAD owner lets go.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Callable, Protocol

from prometheus_client import Counter

from s2s.bus import REDIS_DOWN, Bus
from s2s.config import Settings
from s2s.frames import SessionEnd, encode

from .faults import REDIS_REFUSED, RESTORED, redis_error_kind

log = logging.getLogger("s2s.gateway")

REAPED = Counter("s2s_gateway_sessions_reaped", "Sessions of a dead gateway ended by this one.")
TAKEN_OVER = Counter("s2s_gateway_sessions_taken_over", "Connections let go because the session "
                     "was resumed on another gateway.")


class FailoverSession(Protocol):
    """What this loop needs of a client session (``gateway.session.ClientSession``)."""
    sid: str
    opened: bool
    closed: bool
    replaced: bool

    def turn_floor(self) -> int: ...

    def redis_lost(self) -> None: ...

    def let_go(self) -> None: ...

    async def check_vad(self) -> None: ...


def new_gateway_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Failover:
    def __init__(self, bus: Bus, settings: Settings, sessions: dict[str, "FailoverSession"],
                 owns: Callable[[str], bool] | None = None, gateway_id: str | None = None):
        self.bus = bus
        self.settings = settings
        self.sessions = sessions
        # with cells: one Failover per cell, each minding the sessions of its cell (owns),
        # all under the one gateway id
        self.owns = owns or (lambda sid: True)
        self.id = gateway_id or new_gateway_id()
        self.task: asyncio.Task | None = None
        self.up_since: float | None = None   # wall time Redis answered since, without a miss
        self.next_reap = 0.0

    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        try:  # a clean exit: nobody needs to wait for our lease to lapse
            await asyncio.wait_for(self.bus.forget_gateway(self.id), 2)
        except (Exception, asyncio.TimeoutError):
            pass

    async def _loop(self) -> None:
        period = self.settings.gateway_lease_s / 4
        while True:
            started = time.monotonic()
            try:
                await self.tick()
                if self.up_since is None:
                    self.up_since = time.time()
            except REDIS_DOWN as e:
                self.up_since = None
                log.debug("failover tick: Redis unavailable (%s)", e)
            except Exception as e:  # never let the loop die: the lease would lapse for good
                kind = redis_error_kind(e)
                if kind:
                    REDIS_REFUSED.labels(kind).inc()
                log.warning("failover tick failed: %s", e)
            await asyncio.sleep(max(0.05, period - (time.monotonic() - started)))

    def _live(self) -> list["FailoverSession"]:
        return [s for s in list(self.sessions.values())
                if s.opened and not s.closed and not s.replaced and self.owns(s.sid)]

    async def tick(self) -> None:
        live = self._live()
        await self.bus.gateway_heartbeat(self.id, self.settings.gateway_lease_s,
                                          [s.sid for s in live])
        states = await self.bus.touch_sessions(self.id, {s.sid: s.turn_floor() for s in live})
        for s in live:
            state = states.get(s.sid, 0)
            if state == -1:
                TAKEN_OVER.inc()
                log.info("session resumed on another gateway: letting this connection go",
                         extra={"sid": s.sid})
                s.let_go()
            elif state in (1, 2):
                if state == 1:
                    s.redis_lost()
                RESTORED.labels("owner" if state == 1 else "turn").inc()
                log.warning("session state restored after Redis lost it (%s)",
                            "owner record and turn" if state == 1 else "turn counter",
                            extra={"sid": s.sid, "turn": s.turn_floor()})
            if state != -1:
                try:
                    await s.check_vad()
                except REDIS_DOWN:
                    raise
                except Exception as e:  # one session's trouble must not skip the others
                    log.warning("VAD check failed: %s", e, extra={"sid": s.sid})
        if time.monotonic() >= self.next_reap:
            self.next_reap = time.monotonic() + 1.0
            await self.reap()

    async def reap(self) -> int:
        """End the sessions of gateways whose lease lapsed over the grace time ago.  A
        lease counts from when this gateway last (re)connected at the earliest: after a
        Redis outage every gateway gets a lease's time to renew before it is judged."""
        if self.up_since is None:
            return 0
        s = self.settings
        ended = 0
        if time.time() - self.up_since < s.gateway_lease_s + s.gateway_grace_s:
            return 0  # just (re)connected: the others may not have renewed yet
        for gw in await self.bus.lapsed_gateways(s.gateway_grace_s):
            if gw == self.id:
                continue
            for sid in await self.bus.gateway_sessions(gw):
                turn = await self.bus.current_turn(sid)
                if await self.bus.end_session_if_owner(sid, gw, encode(SessionEnd(sid=sid,
                                                                                  turn=turn))):
                    ended += 1
                    REAPED.inc()
                    log.info("released a session of dead gateway %s", gw, extra={"sid": sid})
            await self.bus.forget_gateway(gw)
            log.warning("gateway %s lost its lease: its sessions not resumed were released", gw)
        return ended
