"""Which work in flight has had its turn superseded: told by Redis, not asked every 50 ms.

A turn change is published where it is made (``Bus.advance_turn``, on
``s2s.bus_sessions.TURN_CHANNEL``).  A worker process holds ONE subscription to it and
wakes every item in flight of that session whose turn is older.  Pub/sub is at most once
(a change published while the subscription was down, e.g. across a Redis restart, is
never delivered), so the turns of the sessions in flight are also read in one MGET once
a second, at once after each (re)subscription, and every ``POLL_S`` while there is no
subscription (Redis away, or a Redis user without the channel: the old polling)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from redis.exceptions import RedisError

log = logging.getLogger("s2s.worker")

CHECK_S = 1.0   # the slow check while subscribed: what pub/sub may have lost
POLL_S = 0.05   # without a subscription
RETRY_S = 0.5   # a lost subscription is made again after this long


class TurnWatch:
    def __init__(self, bus: Any, on_error: Callable[[Exception], Any] = lambda e: None,
                 check_s: float = CHECK_S, poll_s: float = POLL_S):
        self.bus = bus
        self.on_error = on_error
        self.check_s, self.poll_s = check_s, poll_s
        self.waiters: dict[str, dict[asyncio.Future, int]] = {}  # sid -> {waiter: its turn}
        self.subscribed = False
        self.check_now = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def watch(self, sid: str, turn: int) -> asyncio.Future:
        """A future done once a turn after ``turn`` of ``sid`` is known; call ``unwatch``
        with it when the work is over."""
        if not self.tasks:
            self.tasks = [asyncio.create_task(self._listen(), name="s2s-turn-subscription"),
                          asyncio.create_task(self._check(), name="s2s-turn-check")]
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(sid, {})[waiter] = turn
        return waiter

    def unwatch(self, sid: str, waiter: asyncio.Future) -> None:
        group = self.waiters.get(sid)
        if group is not None:
            group.pop(waiter, None)
            if not group:
                del self.waiters[sid]
        waiter.cancel()

    def note(self, sid: str, turn: int) -> None:
        """``sid`` is at ``turn``: wake its work of older turns."""
        for waiter, its_turn in list(self.waiters.get(sid, {}).items()):
            if its_turn < turn and not waiter.done():
                waiter.set_result(turn)

    async def _listen(self) -> None:
        while True:
            try:
                async for change in self.bus.turn_changes():
                    if change is None:  # (re)subscribed: what was published before is lost
                        self.subscribed = True
                        self.check_now.set()
                    else:
                        self.note(*change)
            except asyncio.CancelledError:
                raise
            except RedisError as e:
                self.on_error(e)
            except Exception:
                log.exception("turn subscription failed")
            if self.subscribed:
                log.info("turn subscription lost: polling the turns until it is back")
            self.subscribed = False
            await asyncio.sleep(RETRY_S)

    async def _check(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.check_now.wait(),
                                       self.check_s if self.subscribed else self.poll_s)
            except asyncio.TimeoutError:
                pass
            self.check_now.clear()
            sids = list(self.waiters)
            if not sids:
                continue
            try:
                turns = await self.bus.current_turns(sids)
            except RedisError:  # passing: the work goes on; it raises on its own if it must
                continue
            for sid, turn in turns.items():
                self.note(sid, turn)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
