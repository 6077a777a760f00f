"""Many session streams read on one connection: one task does one XREAD BLOCK over
every stream a process follows and hands each follower its entries.

A gateway follows the output stream of each of its sessions, a VAD worker the audio
stream of each session it owns.  One blocking XREAD per session would hold one Redis
connection per session (Redis's default limit, 10,000 clients, is one cell's sessions
times a few); here a process holds one reading connection per kind of stream, however
many sessions it serves.

Each follower (``Follow``) has its own position (the last id handed to it) and a bounded
backlog: a follower whose backlog is full is left out of the XREAD until it takes what
it has, so a slow session waits alone and nothing is lost (its position stays where it
got to).  A new follower, or one that makes room, must not wait for the running XREAD
to time out: the reader's connection is woken with CLIENT UNBLOCK from the other
connection, and the XREAD starts again with the new set of streams.

Redis going away is retried here with a short backoff (a restarted Redis is noticed at
once); followers just see no entries meanwhile and read on from their positions after."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .bus_streams import FIELD, Entry, entry_order
from .config import Settings

log = logging.getLogger("s2s.bus")

POOL_WAIT_S = 30.0     # longest wait for a free pooled connection
KICK_RETRY_S = 0.005   # a CLIENT UNBLOCK that found the reader not blocked yet is retried
KICK_STALE_S = 0.2     # that long unanswered: the reader's connection id is stale (reconnect)


def _keepalive_options() -> dict[int, int]:
    """TCP_USER_TIMEOUT (Linux): the kernel drops data it could not deliver within 3 s.
    Without it, a command a client already gave up on (a timeout during a network cut)
    still reaches Redis when the link comes back and runs late: a stale owner's output
    or turn change would land after another worker took over (docs/multihost.md)."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        return {socket.TCP_USER_TIMEOUT: 3000}
    return {}


def connect(settings: Settings, single_connection: bool = False) -> aioredis.Redis:
    """A client of the bus's Redis: a pool of at most ``redis_pool_size`` connections
    (a burst of sessions' commands waits for one rather than opening more: Redis's
    client limit is shared by every process), or one connection of its own."""
    read_timeout = settings.block_ms / 1000 + 5
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis(), decode_responses=False, socket_connect_timeout=2,
        # a cut link must surface as an error, not a read that hangs: redis-py < 8
        # has no read timeout of its own; blocking reads wait block_ms at most
        socket_timeout=read_timeout,
        socket_keepalive=True, socket_keepalive_options=_keepalive_options(),
        health_check_interval=10, max_connections=1 if single_connection else
        max(settings.redis_pool_size, 2),
        # a wait for a free connection is the process's own backlog (a burst, a starved
        # event loop), not Redis away (that fails the connection at once): slow, not failed
        timeout=POOL_WAIT_S)
    return aioredis.Redis.from_pool(pool)


class Follow:
    """One stream followed from a position: ``get`` hands out entries in stream order."""

    def __init__(self, reader: "StreamReader", key: str, after: bytes, limit: int):
        self.reader, self.key, self.last = reader, key, after
        self.limit = limit
        self.entries: list[Entry] = []
        self.ready = asyncio.Event()
        self.closed = False

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.limit

    def _push(self, entries: list[Entry]) -> None:
        last = entry_order(self.last)
        for entry_id, data in entries:
            if entry_order(entry_id) > last:  # another follower of the key may be behind
                self.entries.append((entry_id, data))
                self.last, last = entry_id, entry_order(entry_id)
        if self.entries:
            self.ready.set()

    async def get(self, timeout: float) -> list[Entry]:
        """What arrived since the last call (waiting up to ``timeout`` s for some)."""
        if not self.entries:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        was_full = self.full
        entries, self.entries = self.entries, []
        self.ready.clear()
        if was_full:  # it was left out of the XREAD: back in
            self.reader.kick()
        return entries

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reader._drop(self)


class StreamReader:
    """The reading task of one kind of session stream, on its own connection."""

    def __init__(self, reading: aioredis.Redis, control: aioredis.Redis, count: int,
                 block_ms: int, backlog: int, on_error: Callable[[Exception], None],
                 on_ok: Callable[[], None] = lambda: None, name: str = "streams",
                 gap_s: float = 0.0):
        """``reading``: a single-connection client for the XREAD (it blocks);
        ``control``: another client, for CLIENT UNBLOCK.  ``on_error`` counts and logs a
        Redis failure of the reading task, ``on_ok`` is told when reads work again.
        ``gap_s``: after a read that found entries, wait this long before the next one,
        so a stream written every 20 ms is read a few entries at a time, not one."""
        self.reading, self.control = reading, control
        self.count, self.block_ms, self.backlog = count, block_ms, backlog
        self.on_error, self.on_ok, self.name = on_error, on_ok, name
        self.gap_s = gap_s
        self.follows: dict[str, list[Follow]] = {}
        self.task: asyncio.Task | None = None
        self.kicker: asyncio.Task | None = None
        self.wanted = 0       # bumped by every change of what must be read
        self.reading_gen = 0  # the value of `wanted` the running XREAD was built from
        self.blocked = False  # an XREAD is in flight
        self.client_id: int | None = None
        self.failing = False

    def follow(self, key: str, after: bytes) -> Follow:
        f = Follow(self, key, after, self.backlog)
        self.follows.setdefault(key, []).append(f)
        self.kick()
        return f

    def _drop(self, f: Follow) -> None:
        group = self.follows.get(f.key)
        if group is not None and f in group:
            group.remove(f)
            if not group:
                del self.follows[f.key]
        # not read any more: the running XREAD can go on with the stream in it until it
        # returns (its entries for nobody are dropped), no need to wake it

    def kick(self) -> None:
        """Something new to read: start the task, or wake its XREAD."""
        self.wanted += 1
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name=f"s2s-{self.name}-reader")
            return
        if self.kicker is None or self.kicker.done():
            self.kicker = asyncio.create_task(self._unblock(), name=f"s2s-{self.name}-kick")

    async def _unblock(self) -> None:
        """CLIENT UNBLOCK the reader's XREAD until it runs with what is wanted now (it
        may not have reached Redis yet: retried a few ms later)."""
        target = self.wanted
        waited = 0.0
        while self.reading_gen < target and self.task is not None and not self.task.done():
            if self.blocked and self.client_id is not None:
                try:
                    if await self.control.client_unblock(self.client_id):
                        return
                except RedisError:
                    return  # Redis is away: the reader retries by itself
                if waited > KICK_STALE_S:
                    # blocked but never found: the client reconnected under a new id
                    # (redis-py retries a lost connection itself); fetched anew next read
                    self.client_id = None
                    return
            await asyncio.sleep(KICK_RETRY_S)
            waited += KICK_RETRY_S

    def _positions(self) -> dict[str, bytes]:
        """Each stream to read, from the position of its furthest-behind follower that
        has room."""
        out = {}
        for key, group in self.follows.items():
            room = [f for f in group if not f.full]
            if room:
                out[key] = min((f.last for f in room), key=entry_order)
        return out

    async def _run(self) -> None:
        backoff = 0.1
        while self.follows:
            positions = self._positions()
            self.reading_gen = self.wanted
            if not positions:  # everyone's backlog is full: wait until one takes its part
                await asyncio.sleep(0.05)
                continue
            try:
                if self.client_id is None:
                    self.client_id = int(await self.reading.client_id())
                self.blocked = True
                try:
                    res = await self.reading.xread(positions, count=self.count,
                                                   block=self.block_ms)
                finally:
                    self.blocked = False
                backoff = 0.1
                if self.failing:
                    self.failing = False
                    self.on_ok()
            except RedisError as e:
                self.client_id = None
                self.failing = True
                self.on_error(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)  # short: a restarted Redis is noticed at once
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a surprise must not leave every session mute for good
                log.exception("%s reader failed; retrying", self.name)
                self.client_id = None
                await asyncio.sleep(1.0)
                continue
            if res and self.gap_s:
                await asyncio.sleep(self.gap_s)
            for key, entries in _by_key(res):
                start = entry_order(positions[key]) if key in positions else None
                for f in list(self.follows.get(key, ())):
                    # a follower behind where this read started (it was full, or joined
                    # meanwhile) would get a gap: it is served by the next read
                    if start is not None and not f.full and entry_order(f.last) >= start:
                        f._push(entries)

    async def close(self) -> None:
        self.follows.clear()
        tasks = [t for t in (self.kicker, self.task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # a read cut off mid-reply can hold on: closing the connection ends it
            await asyncio.wait(tasks, timeout=1.0)
        await self.reading.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)


def _by_key(res) -> list[tuple[str, list[Entry]]]:
    """XREAD's reply (a list of [key, entries]) as (key, entries)."""
    out = []
    for key, entries in res or []:
        out.append((key.decode() if isinstance(key, bytes) else key,
                    [(eid, (fields or {}).get(FIELD, b"")) for eid, fields in entries]))
    return out
