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

    # --- auth and admission (the gateway) -----------------------------------------
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
