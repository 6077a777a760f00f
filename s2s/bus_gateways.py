"""Gateways: which gateway owns a session, and each gateway's lease and sessions, so
that a dead gateway's sessions are released at once."""

from __future__ import annotations

import time
from typing import Iterable

import redis.asyncio as aioredis

from . import keys
from .config import Settings
from .redis_scripts import END_IF_GATEWAY, GATEWAY_OWN, GATEWAY_TOUCH


class Gateways:
    """Part of ``Bus``: a session's owning gateway lives in s2s:gw:{sid}; only the owner
    may end it, and every "is it still mine? then act" is one Lua script (atomic: a
    gateway that resumed the session in between can never be undone by the old one)."""

    redis: aioredis.Redis
    settings: Settings

    async def own_session(self, sid: str, gateway_id: str, open_id: bytes | None = None
                          ) -> bytes | None:
        """Take the session over (the newest connection wins) and list it among this
        gateway's sessions at once (a gateway killed before its next heartbeat must not
        leave it unlisted, so unreleased); returns the id of its entry in
        s2s:vad:sessions as recorded (``open_id`` when given)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.eval(GATEWAY_OWN, 1, keys.session_gateway(sid), gateway_id, open_id or b"",
                  self.settings.session_ttl_s)
        pipe.sadd(keys.gateway_sessions(gateway_id), sid)
        pipe.expire(keys.gateway_sessions(gateway_id), self.settings.session_ttl_s)
        res = (await pipe.execute())[0]
        return res or None

    async def session_open_id(self, sid: str) -> bytes | None:
        """The session's entry in s2s:vad:sessions as its owner record has it."""
        return await self.redis.hget(keys.session_gateway(sid), "open")

    async def drop_gateway_session(self, gateway_id: str, sid: str) -> None:
        await self.redis.srem(keys.gateway_sessions(gateway_id), sid)

    async def touch_sessions(self, gateway_id: str, floors: dict[str, int]) -> dict[str, int]:
        """Refresh this gateway's sessions, one round trip for all.  Per session:
        0 still ours, 1 the owner record was gone (Redis restarted empty: restored),
        2 ours but the turn counter was behind what the client has seen (restored
        to it, so no reply of a new turn is dropped as stale), -1 another gateway
        owns it now (or it was ended): this gateway must let go."""
        if not floors:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for sid, floor in floors.items():
            pipe.eval(GATEWAY_TOUCH, 2, keys.session_gateway(sid), keys.turn(sid), gateway_id,
                      floor, self.settings.session_ttl_s)
        return {sid: int(r) for sid, r in zip(floors, await pipe.execute())}

    async def end_session_if_owner(self, sid: str, gateway_id: str, end: bytes) -> bool:
        """If ``gateway_id`` still owns the session: XADD ``end`` (an encoded
        SessionEnd) to its audio stream, mark it ended and shorten its keys' TTLs, as
        one script.  False (nothing done) when another gateway took it over."""
        ks = [keys.session_gateway(sid), keys.audio(sid), *keys.session_keys(sid)]
        return bool(await self.redis.eval(END_IF_GATEWAY, len(ks), *ks, gateway_id, end,
                                          self.settings.session_maxlen,
                                          self.settings.closed_ttl_s))

    async def gateway_heartbeat(self, gateway_id: str, lease_s: float,
                                sids: Iterable[str]) -> None:
        """Renew this gateway's lease and record which sessions it holds (added only: a
        closing session removes itself, so one opened meanwhile is never dropped)."""
        sids = list(sids)
        members = keys.gateway_sessions(gateway_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.GATEWAYS, {gateway_id: time.time() + lease_s})
        if sids:
            pipe.sadd(members, *sids)
            pipe.expire(members, self.settings.session_ttl_s)
        await pipe.execute()

    async def lapsed_gateways(self, grace_s: float) -> list[str]:
        """Gateways whose lease lapsed more than ``grace_s`` ago."""
        ids = await self.redis.zrangebyscore(keys.GATEWAYS, "-inf", time.time() - grace_s)
        return [i.decode() for i in ids]

    async def gateway_sessions(self, gateway_id: str) -> list[str]:
        return [s.decode() for s in await self.redis.smembers(keys.gateway_sessions(gateway_id))]

    async def forget_gateway(self, gateway_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.GATEWAYS, gateway_id)
        pipe.delete(keys.gateway_sessions(gateway_id))
        await pipe.execute()
