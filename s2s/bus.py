"""The Redis Streams bus: where frames go, consumer groups, acks and claims.

Stages never touch this directly: the worker runtime (``s2s.worker``) and the
gateway do.  Every stream entry has one field, ``f``, holding one encoded frame.
"""

from __future__ import annotations

import time
from typing import Iterable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .config import Settings
from .frames import (Audio, Frame, Notice, ReplyAudio, ReplyText, SessionEnd, SessionOpen,
                     SpeechStarted, Transcript, Utterance, encode)

FIELD = b"f"
#: what "Redis is unreachable" looks like: callers retry with backoff
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
Entry = tuple[bytes, bytes]  # (entry id, encoded frame)


def routes(frame: Frame) -> list[str]:
    """Streams a frame is written to (the flow in DESIGN.md, in one place)."""
    sid = frame.sid
    if isinstance(frame, SessionOpen):
        return [keys.SESSIONS]
    if isinstance(frame, (Audio, SessionEnd)):
        return [keys.audio(sid)]
    if isinstance(frame, Utterance):
        return [keys.STAGE_STREAMS["stt"]]
    if isinstance(frame, Transcript):
        return [keys.STAGE_STREAMS["llm"], keys.out(sid)]
    if isinstance(frame, ReplyText):
        return [keys.STAGE_STREAMS["tts"], keys.out(sid)]
    if isinstance(frame, (SpeechStarted, ReplyAudio, Notice)):
        return [keys.out(sid)]
    raise TypeError(f"no route for frame kind {type(frame).__name__}")


def entry_ms(entry_id: bytes | str) -> int:
    """Milliseconds since the epoch at which Redis stored the entry."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


class Bus:
    def __init__(self, settings: Settings, client: aioredis.Redis | None = None):
        self.settings = settings
        self.redis = client or aioredis.from_url(
            settings.redis(), decode_responses=False, socket_connect_timeout=2,
            socket_keepalive=True, health_check_interval=10)

    async def close(self) -> None:
        await self.redis.aclose()

    # --- writing ---------------------------------------------------------------------
    async def emit(self, *frames: Frame) -> list[bytes]:
        """XADD each frame to its streams (bounded); refresh per-session TTLs."""
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        for frame in frames:
            data = encode(frame)
            for stream in routes(frame):
                shared = "{" not in stream
                pipe.xadd(stream, {FIELD: data},
                          maxlen=s.stream_maxlen if shared else s.session_maxlen, approximate=True)
                if not shared:
                    pipe.expire(stream, s.session_ttl_s)
        results = await pipe.execute()
        return [r for r in results if isinstance(r, bytes)]

    # --- consumer groups -------------------------------------------------------------
    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group (and stream) if missing; safe to call any number of times."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def read_group(self, stream: str, group: str, consumer: str, count: int,
                         block_ms: int) -> list[Entry]:
        res = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count,
                                          block=block_ms)
        return [(eid, fields.get(FIELD, b"")) for _, entries in (res or []) for eid, fields in entries
                if fields is not None]

    async def claim_idle(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                         count: int = 10, start_id: bytes | str = b"0-0"
                         ) -> tuple[bytes, list[Entry]]:
        """Take over entries another (dead) consumer left pending for min_idle_ms.

        Returns (cursor, entries): pass the cursor back as ``start_id`` next time.  Always
        scanning from 0-0 would only ever look at the head of the pending list (XAUTOCLAIM
        claims at most COUNT, and Redis 7 scans at most COUNT*10 entries), so with enough
        live in-flight entries (or, on Redis 6.2, trimmed entries that stay pending) at the
        head, a dead worker's entries further on would never be claimed."""
        res = await self.redis.xautoclaim(stream, group, consumer, min_idle_time=min_idle_ms,
                                          start_id=start_id, count=count)
        cursor = res[0] if res else b"0-0"
        claimed = res[1] if res else []
        return cursor, [(eid, fields.get(FIELD, b"")) for eid, fields in claimed
                        if eid is not None and fields is not None]

    async def deliveries(self, stream: str, group: str,
                         entry_ids: Iterable[bytes]) -> dict[bytes, int]:
        """How many times each pending entry has been delivered (XPENDING's counter:
        XREADGROUP and XAUTOCLAIM count, the keep-alive's XCLAIM JUSTID does not).
        Entries no longer pending are left out."""
        rows = await self._pending_rows(stream, group, entry_ids)
        return {eid: int(row["times_delivered"]) for eid, row in rows.items()}

    async def _pending_rows(self, stream: str, group: str,
                            entry_ids: Iterable[bytes]) -> dict[bytes, dict]:
        """XPENDING's row (consumer, times_delivered, …) of each id still pending, in
        one round trip."""
        ids = list(entry_ids)
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(stream, group, min=eid, max=eid, count=1)
        rows = await pipe.execute()
        return {eid: r[0] for eid, r in zip(ids, rows) if r}

    async def dead_letter(self, stream: str, group: str, entry_id: bytes, data: bytes,
                          deliveries: int, reason: str) -> None:
        """Move a poison entry to ``s2s:dead`` (bounded) and acknowledge it.  Not one
        MULTI: the two keys need not share a Cluster slot; a crash between the two
        commands only leaves a duplicate dead letter once the entry is claimed again."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.DEAD, {FIELD: data, b"stream": stream, b"group": group, b"id": entry_id,
                              b"deliveries": deliveries, b"reason": reason},
                  maxlen=self.settings.stream_maxlen, approximate=True)
        pipe.xack(stream, group, entry_id)
        await pipe.execute()

    async def keep_alive(self, stream: str, group: str, consumer: str,
                         entry_ids: Iterable[bytes], reset_deliveries: bool = False
                         ) -> list[bytes]:
        """Reset the idle time of entries we still work on, so nobody claims them.

        Returns the ids another consumer owns by now (it claimed them while this one
        looked dead, e.g. a stalled event loop): those are *not* refreshed, since an
        XCLAIM with min-idle 0 would silently steal them back and both consumers would
        then work on (and, for a VAD session, own) the same entry.  ``reset_deliveries``
        also sets their delivery count back to 1 (see SessionRuntime: a session that
        makes progress is not poison)."""
        mine, lost = [], []
        # ids no longer pending (acked meanwhile, or Redis restarted empty): nothing to do
        for eid, row in (await self._pending_rows(stream, group, entry_ids)).items():
            (mine if row["consumer"] == consumer.encode() else lost).append(eid)
        if mine:  # JUSTID: does not count as a new delivery
            await self.redis.xclaim(stream, group, consumer, min_idle_time=0, message_ids=mine,
                                    justid=True, retrycount=1 if reset_deliveries else None)
        return lost

    async def ack(self, stream: str, group: str, entry_id: bytes) -> None:
        await self.redis.xack(stream, group, entry_id)

    # --- turns -----------------------------------------------------------------------
    async def current_turn(self, sid: str) -> int:
        value = await self.redis.get(keys.turn(sid))
        return int(value) if value else 0

    async def advance_turn(self, sid: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(keys.turn(sid))
        pipe.expire(keys.turn(sid), self.settings.session_ttl_s)
        return int((await pipe.execute())[0])

    async def close_session(self, sid: str) -> None:
        """Per-session keys expire shortly after the session ends."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.session_keys(sid):
            pipe.expire(key, self.settings.closed_ttl_s)
        await pipe.execute()

    # --- sessions and gateways ------------------------------------------------------
    # A session's owning gateway lives in s2s:owner:{sid}; only the owner may end it,
    # and every "is it still mine? then act" is one Lua script (atomic: a gateway
    # that resumed the session in between can never be undone by the old one).
    async def own_session(self, sid: str, gateway_id: str, open_id: bytes | None = None
                          ) -> bytes | None:
        """Take the session over (the newest connection wins) and list it among this
        gateway's sessions at once (a gateway killed before its next heartbeat must not
        leave it unlisted, so unreleased); returns the id of its entry in
        s2s:vad:sessions as recorded (``open_id`` when given)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.eval(_OWN, 1, keys.owner(sid), gateway_id, open_id or b"",
                  self.settings.session_ttl_s)
        pipe.sadd(keys.gateway_sessions(gateway_id), sid)
        pipe.expire(keys.gateway_sessions(gateway_id), self.settings.session_ttl_s)
        res = (await pipe.execute())[0]
        return res or None

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
            pipe.eval(_TOUCH, 2, keys.owner(sid), keys.turn(sid), gateway_id, floor,
                      self.settings.session_ttl_s)
        return {sid: int(r) for sid, r in zip(floors, await pipe.execute())}

    async def end_session_if_owner(self, sid: str, gateway_id: str, end: bytes) -> bool:
        """If ``gateway_id`` still owns the session: XADD ``end`` (an encoded
        SessionEnd) to its audio stream, mark it ended and shorten its keys' TTLs, as
        one script.  False (nothing done) when another gateway took it over."""
        ks = [keys.owner(sid), keys.audio(sid), *keys.session_keys(sid)]
        return bool(await self.redis.eval(_END_IF_OWNER, len(ks), *ks, gateway_id, end,
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

    async def session_entry_state(self, open_id: bytes) -> str:
        """Where a session's entry in s2s:vad:sessions stands: "owned" (pending: a VAD
        worker holds it, alive or about to be claimed), "queued" (not delivered yet),
        "released" (acknowledged: the VAD let go) or "gone" (Redis lost it)."""
        stream, group = keys.SESSIONS, "vad"
        pipe = self.redis.pipeline(transaction=False)
        pipe.xpending_range(stream, group, min=open_id, max=open_id, count=1)
        pipe.xrange(stream, min=open_id, max=open_id, count=1)
        pipe.xinfo_groups(stream)
        pending, entry, groups = await pipe.execute(raise_on_error=False)
        if isinstance(pending, list) and pending:
            return "owned"
        if not isinstance(entry, list) or not entry:
            return "gone"
        last = next((g.get("last-delivered-id") for g in groups or []
                     if isinstance(groups, list) and g.get("name") in (group, group.encode())),
                    None)
        if last is None or _entry_id(last) < _entry_id(open_id):
            return "queued"
        return "released"

    async def vad_position(self, sid: str) -> bytes | None:
        return await self.redis.get(keys.vad_pos(sid))

    async def last_audio(self, sid: str) -> Entry | None:
        """The newest entry of the session's audio stream, if any."""
        last = await self.redis.xrevrange(keys.audio(sid), count=1)
        return (last[0][0], (last[0][1] or {}).get(FIELD, b"")) if last else None

    async def force_vad_release(self, sid: str, end_id: bytes) -> None:
        """What a VAD owner does at a SessionEnd, for an owner that did not (it died)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.vad_pos(sid), end_id, ex=self.settings.session_ttl_s)
        pipe.delete(keys.vad_state(sid))
        await pipe.execute()

    async def out_tail(self, sid: str, count: int) -> list[Entry]:
        """The newest ``count`` entries of the session's output stream, newest first."""
        entries = await self.redis.xrevrange(keys.out(sid), count=count)
        return [(eid, (fields or {}).get(FIELD, b"")) for eid, fields in entries]

    async def read_out(self, sid: str, after: bytes, count: int, block_ms: int) -> list[Entry]:
        res = await self.redis.xread({keys.out(sid): after}, count=count, block=block_ms)
        return [(eid, (fields or {}).get(FIELD, b"")) for _, entries in res or []
                for eid, fields in entries]

    async def trim_out(self, sid: str, min_id: bytes) -> int:
        """Drop output entries older than ``min_id`` (played by the client already)."""
        return await self.redis.xtrim(keys.out(sid), minid=min_id, approximate=False)

    # --- liveness --------------------------------------------------------------------
    async def heartbeat(self, stage: str, worker_id: str, metrics_url: str) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WORKERS, {f"{stage}|{worker_id}|{metrics_url}": now})
        pipe.zremrangebyscore(keys.WORKERS, 0, now - 60)
        await pipe.execute()

    async def live_workers(self, max_age_s: float = 5.0) -> dict[str, list[dict]]:
        now = time.time()
        members = await self.redis.zrangebyscore(keys.WORKERS, now - max_age_s, "+inf",
                                                 withscores=True)
        out: dict[str, list[dict]] = {}
        for member, score in members:
            stage, worker_id, url = member.decode().split("|", 2)
            out.setdefault(stage, []).append(
                {"id": worker_id, "metrics": url, "age_s": round(now - score, 2)})
        return out

    async def forget_worker(self, stage: str, worker_id: str, metrics_url: str) -> None:
        await self.redis.zrem(keys.WORKERS, f"{stage}|{worker_id}|{metrics_url}")


def _entry_id(entry_id: bytes | str) -> tuple[int, int]:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# KEYS: owner; ARGV: gateway id, open entry id ("" keeps the recorded one), ttl
_OWN = """
redis.call('HSET', KEYS[1], 'gw', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'open', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], 'open')
"""
# KEYS: owner, turn; ARGV: gateway id, turn floor, ttl
_TOUCH = """
local gw = redis.call('HGET', KEYS[1], 'gw')
local r = 0
if not gw then
  redis.call('HSET', KEYS[1], 'gw', ARGV[1])
  r = 1
elseif gw ~= ARGV[1] then
  return -1
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local t = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if t < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
  if r == 0 then r = 2 end
end
return r
"""
# KEYS: owner, audio stream, then every key of the session; ARGV: gateway id, encoded
# SessionEnd, audio MAXLEN, closed TTL.  The owner record stays as a tombstone (gw "")
# so a stalled ex-owner cannot mistake it for one lost to a Redis restart.
_END_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'gw') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'f', ARGV[2])
redis.call('HSET', KEYS[1], 'gw', '')
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""
