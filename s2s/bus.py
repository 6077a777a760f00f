"""The Redis Streams bus: every Redis command of the core, on one client.

Stages never touch this directly: the worker runtime (``s2s.worker``) and the
gateway do.  ``Bus`` is one object put together from one part per domain, each in
its own module:

    bus_streams       stage streams and consumer groups: routes, emit, read, ack, claim
    bus_sessions      one session's keys (audio, output, turn, prefs, resume point) and
                      the writes fenced by session ownership
    bus_reader        the session streams a process follows, read on one connection
    bus_gateways      which gateway owns a session; gateway leases
    bus_admission     tickets, principals, open sessions, stage backlog, audio rate
    bus_workers       the worker registry: leases, live workers, forgetting dead ones
    bus_dead_letters  s2s:dead
    bus_errors        what a Redis failure means to the caller (retry or not)

Callers import every name from here; the parts are how the code is kept apart.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from .bus_admission import Admission
from .bus_dead_letters import DeadLetters
from .bus_errors import REDIS_DOWN, RETRYABLE, redis_error_kind
from .bus_gateways import Gateways
from .bus_reader import connect
from .bus_sessions import SESSION_OWNER, Owner, OwnershipLost, SessionKeys
from .bus_streams import FIELD, Entry, StageStreams, entry_ms, entry_order, routes
from .bus_workers import WorkerRegistry
from .config import Settings

__all__ = ["Bus", "Entry", "FIELD", "Owner", "OwnershipLost", "REDIS_DOWN", "RETRYABLE",
           "SESSION_OWNER", "entry_ms", "entry_order", "redis_error_kind", "routes"]


class Bus(StageStreams, SessionKeys, Gateways, Admission, WorkerRegistry, DeadLetters):
    """One Redis client, and every part of the bus on it."""

    def __init__(self, settings: Settings, client: aioredis.Redis | None = None):
        self.settings = settings
        self.redis = client or connect(settings)
        self.readers: dict = {}  # the session-stream readers (bus_reader), made on first use
        self.audio_ttl_set: dict[str, float] = {}  # audio stream -> when its TTL was last set

        # registered once per client; redis-py sends EVALSHA and loads on NOSCRIPT
        # (a Redis restarted empty has no scripts)
        for part in type(self).__mro__:
            for attr, source in vars(part).get("SCRIPTS", {}).items():
                setattr(self, attr, self.redis.register_script(source))

    async def close(self) -> None:
        for reader in self.readers.values():
            await reader.close()
        await self.redis.aclose()
