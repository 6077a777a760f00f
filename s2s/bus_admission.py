"""Auth and admission (the gateway): one-time tickets, who opened a session, how many
sessions are open, how far behind the stages are, and each principal's audio rate and
session size."""

from __future__ import annotations

import time
from typing import Iterable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import keys
from .bus_streams import entry_ms
from .config import Settings


class Admission:
    """Part of ``Bus``: what the gateway reads and counts to admit a session or input."""

    redis: aioredis.Redis
    settings: Settings

    async def put_ticket(self, digest: str, principal_json: str, ttl_s: float) -> None:
        await self.redis.set(keys.ticket(digest), principal_json, px=max(1, int(ttl_s * 1000)))

    async def take_ticket(self, digest: str) -> bytes | None:
        """The ticket's principal JSON, once: GETDEL makes it one-time across gateways."""
        return await self.redis.getdel(keys.ticket(digest))

    async def claim_session(self, sid: str, principal: str) -> bool:
        """Record who opened a new session (SET NX: never overwrites another's)."""
        return bool(await self.redis.set(keys.owner(sid), principal, nx=True,
                                         ex=self.settings.session_ttl_s))

    async def session_principal(self, sid: str) -> str | None:
        value = await self.redis.get(keys.owner(sid))
        return value.decode() if value is not None else None

    async def register_sessions(self, sessions: dict[str, str]) -> None:
        """Mark open sessions (sid -> principal) alive now; refresh their owner key."""
        if not sessions:
            return
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.LIVE, dict.fromkeys(sessions, now))
        for sid, principal in sessions.items():
            pipe.zadd(keys.principal_sessions(principal), {sid: now})
            pipe.expire(keys.principal_sessions(principal), 3600)
            pipe.expire(keys.owner(sid), self.settings.session_ttl_s)
        await pipe.execute()

    async def unregister_session(self, sid: str, principal: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.LIVE, sid)
        pipe.zrem(keys.principal_sessions(principal), sid)
        await pipe.execute()

    async def live_sessions(self, principal: str | None = None, max_age_s: float = 30.0) -> int:
        """Open sessions refreshed within max_age_s (a crashed gateway's age out)."""
        key = keys.LIVE if principal is None else keys.principal_sessions(principal)
        return int(await self.redis.zcount(key, time.time() - max_age_s, "+inf"))

    async def stage_backlog(self, stages: Iterable[str] = ("stt", "llm", "tts")
                            ) -> dict[str, dict]:
        """Per stage: entries not yet delivered (lag), delivered but not acknowledged
        (pending), and how long the oldest undelivered entry has waited (wait_s)."""
        out: dict[str, dict] = {}
        now_ms = time.time() * 1000
        for stage in stages:
            stream = keys.stage_stream(stage)
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:  # no such stream yet
                groups = []
            info = {"lag": 0, "pending": 0, "wait_s": 0.0}
            for g in groups:
                info["pending"] += int(g.get("pending") or 0)
                lag = g.get("lag")
                info["lag"] += int(lag) if lag is not None else 0
                last = g.get("last-delivered-id") or b"0-0"
                nxt = await self.redis.xrange(stream, min=b"(" + last if isinstance(last, bytes)
                                              else "(" + last, max="+", count=1)
                if nxt:
                    info["wait_s"] = max(info["wait_s"], (now_ms - entry_ms(nxt[0][0])) / 1000)
            out[stage] = info
        return out

    async def add_audio_seconds(self, principal: str, seconds: float) -> float:
        """Count a principal's audio in the current wall-clock minute; the new total."""
        key = keys.principal_audio(principal, int(time.time() // 60))
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrbyfloat(key, seconds)
        pipe.expire(key, 120)
        return float((await pipe.execute())[0])

    async def session_bytes(self, sid: str) -> int:
        """Bytes the session's keys take in Redis (MEMORY USAGE, sampled for streams)."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.session_keys(sid):
            pipe.memory_usage(key)
        return sum(int(n or 0) for n in await pipe.execute())
