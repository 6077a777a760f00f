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

With cells (s2s/cells.py) the picture is kept per cell: capacity, backlog and live
sessions are judged in the cell a new session is placed in (the one with the most room
among the cells that answered), a principal's session limit is the sum over the cells
that answer, and its audio budget lives in its home cell.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from s2s.bus import REDIS_DOWN, Bus
from s2s.cells import Cell, Cells
from s2s.config import Settings
from s2s.stage import SessionStage

from .auth import Principal

log = logging.getLogger("s2s.gateway.admission")

# Admission's hard cap per live VAD worker: the sessions one worker can own (its slots,
# SessionStage.concurrency; the k8s manifests leave S2S_CONCURRENCY unset so the two agree).
# Past it a session would sit unowned, its audio unheard, so it is refused ("busy").  The
# autoscaler must act before this: KEDA's VAD target (deploy/k8s/keda.yaml) is 48, 3/4 of
# the cap, so a new pod is asked for at 53 sessions a pod (past the HPA's 10 % tolerance),
# while 11 slots a pod are free for the sessions that arrive while it starts (docs/scaling.md,
# "Autoscaling").  Admission does not stop at the target: it still admits up to the cap.
VAD_SESSIONS_PER_WORKER = SessionStage.concurrency
TICK_S = 1.0
BYTES_EVERY_S = 5.0            # MEMORY USAGE is not free: sample each session this often
LIVE_MAX_AGE_S = 30.0

REFUSED = Counter("s2s_gateway_refused_sessions_total",
                  "New sessions refused by admission control, by reason", ["reason"])
CELL_UP = Gauge("s2s_gateway_cell_up", "Whether the cell's Redis answered the gateway's last "
                "admission tick (1) or not (0); one cell unless S2S_REDIS_CELLS.", ["cell"])
CELL_SESSIONS = Gauge("s2s_gateway_cell_sessions", "Live sessions of the cell (all gateways), "
                      "as of the gateway's last admission tick.", ["cell"])


@dataclass
class Refusal:
    code: str                  # busy, session_limit
    message: str
    retry_after_s: float | None = None


class Admission:
    def __init__(self, settings: Settings, cells: Cells | Bus, sessions: dict):
        self.settings = settings
        self.cells = cells if isinstance(cells, Cells) else Cells.of_bus(cells)
        self.bus = self.cells.home.bus
        self.sessions = sessions            # this gateway's open sessions (sid -> ClientSession)
        self.lock = asyncio.Lock()          # one admission decision at a time per gateway
        self.backlog: dict[str, dict] = {}
        self.workers: dict[str, int] = {}
        self.updated = 0.0
        self.task: asyncio.Task | None = None
        self.bytes_checked = 0.0
        self.placed: list[tuple[float, str]] = []  # (when, cell) of recent placements

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # --- headroom ----------------------------------------------------------------------
    async def refresh(self) -> None:
        """Every cell's picture; a cell whose Redis does not answer is marked down (no new
        sessions go there).  Raises only when no cell answers."""
        results = await asyncio.gather(*(self._refresh_cell(c) for c in self.cells),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for cell, r in zip(self.cells, results):
            cell.up = not isinstance(r, BaseException)
            CELL_UP.labels(cell.name).set(1 if cell.up else 0)
            if cell.up:
                CELL_SESSIONS.labels(cell.name).set(cell.info.get("live", 0))
        home = self.cells.home.info
        self.backlog, self.workers = home.get("stages", {}), home.get("workers", {})
        self.updated = time.monotonic()
        if len(errors) == len(self.cells):
            raise errors[0]

    async def _refresh_cell(self, cell: Cell) -> None:
        bus = cell.bus
        backlog = await asyncio.wait_for(bus.stage_backlog(), 2)
        workers = {stage: len(ws) for stage, ws in (await bus.live_workers()).items()}
        live = await bus.live_sessions(None, LIVE_MAX_AGE_S)
        cell.info = {"stages": backlog, "workers": workers, "live": live,
                     "capacity": self._capacity(workers)}

    def _capacity(self, workers: dict[str, int]) -> int | None:
        if self.settings.session_capacity > 0:  # per cell: each cell is a whole stack
            return self.settings.session_capacity
        vad = workers.get("vad", 0)
        return vad * VAD_SESSIONS_PER_WORKER if vad else None  # unknown: no cap

    def capacity(self) -> int | None:
        return self._capacity(self.workers)

    def headroom(self) -> dict:
        if not self.cells.prefixed:
            return {"capacity": self.capacity(), "workers": self.workers, "stages": self.backlog}
        return {"cells": {c.name: {"up": c.up, **c.info} for c in self.cells}}

    async def place(self) -> Cell:
        """The cell for a new session (or ticket): the one with the most room, from a
        picture at most a tick old."""
        if len(self.cells) == 1:
            return self.cells.home
        async with self.lock:
            if time.monotonic() - self.updated > TICK_S:
                try:
                    await self.refresh()
                except REDIS_DOWN:
                    pass  # every cell is down: the open fails with "unavailable" right after
            # sessions placed in the last ticks count at once (a refresh may not see them
            # registered yet), so a burst of opens spreads over the cells
            now = time.monotonic()
            self.placed = [(t, c) for t, c in self.placed if now - t < 2 * TICK_S]
            recent = collections.Counter(c for _, c in self.placed)
            cell = self.cells.choose(recent)
            self.placed.append((now, cell.name))
            return cell

    async def admit(self, principal: Principal, sid: str) -> Refusal | None:
        """Decide on a new session and, when admitted, count it at once (under the lock,
        so a burst on this gateway cannot overshoot between the check and the count)."""
        async with self.lock:
            if time.monotonic() - self.updated > TICK_S:
                await self.refresh()
            cell = self.cells.of(sid)
            refusal = await self._check(principal, cell)
            if refusal is not None:
                REFUSED.labels(refusal.code).inc()
                return refusal
            await cell.bus.register_sessions({sid: principal.id})
            return None

    async def _principal_sessions(self, principal: Principal) -> int:
        """The principal's live sessions over every cell that answers (cells down at the
        last tick are not waited for: their sessions are not being served anyway)."""
        cells = [c for c in self.cells if c.up] or list(self.cells)
        counts = await asyncio.gather(*(asyncio.wait_for(
            c.bus.live_sessions(principal.id, LIVE_MAX_AGE_S), 2) for c in cells),
            return_exceptions=True)
        if all(isinstance(n, BaseException) for n in counts):
            raise counts[0]  # type: ignore[misc]
        return sum(n for n in counts if not isinstance(n, BaseException))

    async def _check(self, principal: Principal, cell: Cell | None = None) -> Refusal | None:
        s = self.settings
        cell = cell or self.cells.home
        limit = principal.max_sessions if principal.max_sessions is not None \
            else s.principal_max_sessions
        if limit and await self._principal_sessions(principal) >= limit:
            return Refusal("session_limit", f"this key or token may hold {limit} sessions at "
                                            "once: end one first")
        cap = self._capacity(cell.info.get("workers", {}))
        if cap is not None and await cell.bus.live_sessions(None, LIVE_MAX_AGE_S) >= cap:
            where = f" (cell {cell.name}, the one with the most room)" if self.cells.prefixed \
                else ""
            return Refusal("busy", f"the service is at its capacity of {cap} sessions"
                                   f"{where}; try again later", retry_after_s=10.0)
        bound = s.admission_max_wait_s
        if bound > 0:
            for stage, info in cell.info.get("stages", {}).items():
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
        bus = self.cells.principal_cell(principal.id).bus
        return await bus.add_audio_seconds(principal.id, seconds) <= rate

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
        try:
            await self.refresh()
        except REDIS_DOWN as e:  # no cell answers: still close idle sessions below
            log.warning("admission: Redis unavailable (%s)", e)
        open_ = {sid: s for sid, s in self.sessions.items() if s.opened and not s.closed}
        for cell in self.cells:  # each cell counts its own sessions
            mine = {sid: s.principal.id for sid, s in open_.items() if self.cells.owns(cell, sid)}
            if mine and cell.up:
                try:
                    await cell.bus.register_sessions(mine)
                except REDIS_DOWN as e:
                    log.warning("admission: cell %s unavailable (%s)", cell.name, e)
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
                try:
                    used = await self.cells.of(sid).bus.session_bytes(sid)
                except REDIS_DOWN:
                    continue  # its cell is down: look again at the next check
                if used > self.settings.max_session_bytes:
                    await session.end_for("session_too_large",
                                          f"the session holds {used} bytes in Redis, over the "
                                          f"limit of {self.settings.max_session_bytes}")
