"""The Redis Streams bus: where frames go, consumer groups, acks and claims.

Stages never touch this directly: the worker runtime (``s2s.worker``) and the
gateway do.  Every stream entry has one field, ``f``, holding one encoded frame.
"""

from __future__ import annotations

import socket
import time
from contextvars import ContextVar
from typing import Iterable, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys
from .config import Settings
from .frames import (Audio, Frame, Notice, ReplyAudio, ReplyText, SessionConfig, SessionEnd,
                     SessionOpen, SpeechStarted, Transcript, TurnStatus, Utterance, encode)
from .redis_scripts import (ACK_DEL, DELCONSUMER_IF_IDLE, EMIT_IF_OWNER, END_IF_GATEWAY,
                            FORGET_IF_STALE, GATEWAY_OWN, GATEWAY_TOUCH, HEARTBEAT,
                            INCR_IF_OWNER, KEEP_ALIVE, SAVE_IF_OWNER)

FIELD = b"f"
#: what "Redis is unreachable" looks like: callers retry with backoff
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
Entry = tuple[bytes, bytes]  # (entry id, encoded frame)


class Owner(NamedTuple):
    """A consumer holding one pending entry: what fenced writes check (EMIT_IF_OWNER)."""
    stream: str
    group: str
    consumer: str
    entry_id: bytes


class OwnershipLost(Exception):
    """A fenced write found the entry held by another consumer."""


#: the session entry the current task owns (set by the session runtime for each session
#: it owns): the turn changes a session-owning stage makes are fenced by it
SESSION_OWNER: ContextVar[Owner | None] = ContextVar("s2s_session_owner", default=None)


#: kinds of Redis trouble that pass: wait (with backoff) and do the same again
RETRYABLE = frozenset({"down", "loading", "oom", "readonly", "busy"})


def redis_error_kind(exc: BaseException) -> str:
    """What a Redis failure means for the caller, in one word:

    - ``down``: unreachable (connection refused/reset, timeout): retry with backoff;
    - ``loading``: restarted, still loading its AOF/RDB (``LOADING``): retry;
    - ``oom``: ``maxmemory`` reached with ``noeviction`` ("OOM command not allowed"):
      writes fail, reads, acks and deletes still work: retry the write later;
    - ``readonly``: talking to a replica (``READONLY``, e.g. during a failover): retry;
    - ``busy``: a script runs too long (``BUSY``): retry;
    - ``nogroup``: the stream or its consumer group is gone (``NOGROUP``: Redis
      restarted empty): create the group again;
    - ``other``: anything else (a bug, a wrong type): log it, do not retry in a loop;
    - ``none``: not a Redis error at all.

    One place for this, used by the worker runtime and the gateway alike."""
    if isinstance(exc, BusyLoadingError):  # a ConnectionError subclass: test it first
        return "loading"
    if isinstance(exc, REDIS_DOWN):
        return "down"
    if not isinstance(exc, RedisError):
        return "none"
    # redis-py maps OOM and READONLY to classes and strips their prefix from the text
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    text = str(exc)
    # an error inside a pipeline reads "Command # 1 (XADD …) of pipeline caused error: …"
    # (the command's arguments may hold any text: look only at the error's own words)
    text = text.rsplit("caused error: ", 1)[-1].lstrip("('\"")
    head = text.split(" ", 1)[0].upper()
    if head == "OOM" or text.startswith("command not allowed when used memory"):
        return "oom"
    for prefix, kind in (("READONLY", "readonly"), ("LOADING", "loading"), ("BUSY", "busy"),
                         ("NOGROUP", "nogroup"), ("MASTERDOWN", "readonly"),
                         # a blocked read cut off as the server became a replica
                         ("UNBLOCKED", "readonly")):
        if head == prefix:
            return kind
    return "other"


def routes(frame: Frame) -> list[str]:
    """Streams a frame is written to (the flow in DESIGN.md, in one place)."""
    sid = frame.sid
    if isinstance(frame, SessionOpen):
        return [keys.SESSIONS]
    if isinstance(frame, (Audio, SessionEnd, SessionConfig)):
        return [keys.audio(sid)]
    if isinstance(frame, Utterance):
        return [keys.STAGE_STREAMS["stt"]]
    if isinstance(frame, Transcript):
        return [keys.STAGE_STREAMS["llm"], keys.out(sid)]
    if isinstance(frame, ReplyText):
        return [keys.STAGE_STREAMS["tts"], keys.out(sid)]
    if isinstance(frame, (SpeechStarted, ReplyAudio, Notice, TurnStatus)):
        return [keys.out(sid)]
    raise TypeError(f"no route for frame kind {type(frame).__name__}")


def entry_ms(entry_id: bytes | str) -> int:
    """Milliseconds since the epoch at which Redis stored the entry."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq) (ValueError if it is not one)."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _keepalive_options() -> dict[int, int]:
    """TCP_USER_TIMEOUT (Linux): the kernel drops data it could not deliver within 3 s.
    Without it, a command a client already gave up on (a timeout during a network cut)
    still reaches Redis when the link comes back and runs late: a stale owner's output
    or turn change would land after another worker took over (docs/multihost.md)."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        return {socket.TCP_USER_TIMEOUT: 3000}
    return {}


class Bus:
    def __init__(self, settings: Settings, client: aioredis.Redis | None = None):
        self.settings = settings
        self.redis = client or aioredis.from_url(
            settings.redis(), decode_responses=False, socket_connect_timeout=2,
            # a cut link must surface as an error, not a read that hangs: redis-py < 8
            # has no read timeout of its own; blocking reads wait block_ms at most
            socket_timeout=settings.block_ms / 1000 + 5,
            socket_keepalive=True, socket_keepalive_options=_keepalive_options(),
            health_check_interval=10)

        # registered once per client; redis-py sends EVALSHA and loads on NOSCRIPT
        # (a Redis restarted empty has no scripts)
        self._ack_del_script = self.redis.register_script(ACK_DEL)
        self._keep_alive_script = self.redis.register_script(KEEP_ALIVE)
        self._forget_script = self.redis.register_script(FORGET_IF_STALE)
        self._delconsumer_script = self.redis.register_script(DELCONSUMER_IF_IDLE)
        self._heartbeat_script = self.redis.register_script(HEARTBEAT)
        self._emit_owned_script = self.redis.register_script(EMIT_IF_OWNER)
        self._save_owned_script = self.redis.register_script(SAVE_IF_OWNER)
        self._incr_owned_script = self.redis.register_script(INCR_IF_OWNER)

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

    async def emit_owned(self, owner: "Owner", *frames: Frame) -> list[bytes] | None:
        """``emit`` fenced by session ownership (EMIT_IF_OWNER): None, and nothing
        written, when another consumer holds ``owner``'s session entry."""
        s = self.settings
        out_keys: list[str] = []
        args: list = [owner.group, owner.consumer, owner.entry_id]
        for frame in frames:
            data = encode(frame)
            for stream in routes(frame):
                shared = "{" not in stream
                out_keys.append(stream)
                args += [data, s.stream_maxlen if shared else s.session_maxlen,
                         0 if shared else s.session_ttl_s]
        return await self._emit_owned_script(keys=[owner.stream, *out_keys], args=args)

    async def session_resume(self, sid: str) -> tuple[bytes | None, bytes | None]:
        """The last owner's resume point of a session: (audio position, state json)."""
        position, state = await self.redis.mget(keys.vad_pos(sid), keys.vad_state(sid))
        return position, state

    async def save_session_state(self, owner: "Owner", sid: str, position: bytes,
                                 state_json: str | None) -> bool:
        """Write the resume point (state None: the session ended, drop its state),
        fenced like ``emit_owned``; False when another consumer holds the session."""
        done = await self._save_owned_script(
            keys=[owner.stream, keys.vad_pos(sid), keys.vad_state(sid)],
            args=[owner.group, owner.consumer, owner.entry_id, position, state_json or "",
                  self.settings.session_ttl_s])
        return bool(done)

    async def read_audio(self, sid: str, after: bytes, count: int, block_ms: int
                         ) -> list[Entry]:
        res = await self.redis.xread({keys.audio(sid): after}, count=count, block=block_ms)
        return [(eid, (fields or {}).get(FIELD, b"")) for _, entries in res or []
                for eid, fields in entries]

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
                          deliveries: int, reason: str, delete: bool = True) -> None:
        """Move a poison entry to ``s2s:dead`` (bounded) and acknowledge it.  Not one
        MULTI: the two keys need not share a Cluster slot; a crash between the two
        commands only leaves a duplicate dead letter once the entry is claimed again."""
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(keys.DEAD, {FIELD: data, b"stream": stream, b"group": group, b"id": entry_id,
                              b"deliveries": deliveries, b"reason": reason},
                  maxlen=max(s.dead_maxlen, 1), approximate=False)  # rare: trim exactly
        pipe.xtrim(keys.DEAD, minid=self._dead_minid(), approximate=False)
        await pipe.execute()
        await self.ack(stream, group, entry_id, delete=delete)

    def _dead_minid(self, max_age_s: float | None = None) -> str:
        age = self.settings.dead_max_age_s if max_age_s is None else max_age_s
        return f"{max(int((time.time() - age) * 1000), 0)}-0"

    # --- dead letters (``s2s dead``) -------------------------------------------------
    async def dead_letters(self, count: int = 100, newest_first: bool = True
                           ) -> list[tuple[bytes, dict]]:
        """Dead letters as (id, fields), newest first by default."""
        if newest_first:
            return await self.redis.xrevrange(keys.DEAD, count=count)
        return await self.redis.xrange(keys.DEAD, count=count)

    async def dead_letter_get(self, dead_id: str) -> dict | None:
        rows = await self.redis.xrange(keys.DEAD, min=dead_id, max=dead_id, count=1)
        return rows[0][1] if rows else None

    async def dead_letter_replay(self, dead_id: str) -> bytes | None:
        """XADD the dead letter's frame to its original stream again (bounded like any
        stage entry) and delete the dead letter.  None if there is no such dead letter.
        Not one MULTI (two keys, maybe two Cluster slots): a crash between the two
        leaves the dead letter in place, to be replayed or purged again."""
        fields = await self.dead_letter_get(dead_id)
        if fields is None:
            return None
        stream = fields.get(b"stream", b"").decode()
        if not stream.startswith("s2s:") or FIELD not in fields:
            raise ValueError(f"dead letter {dead_id} names no stream to replay to")
        new_id = await self.redis.xadd(stream, {FIELD: fields[FIELD]},
                                       maxlen=self.settings.stream_maxlen, approximate=True)
        await self.redis.xdel(keys.DEAD, dead_id)
        return new_id

    async def dead_letter_purge(self, older_than_s: float | None = None) -> int:
        """Delete every dead letter, or those older than ``older_than_s``; how many."""
        if older_than_s is None:
            n = await self.redis.xlen(keys.DEAD)
            await self.redis.delete(keys.DEAD)
            return int(n)
        return int(await self.redis.xtrim(keys.DEAD, minid=self._dead_minid(older_than_s)))

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
        ids = list(entry_ids)
        if not ids:
            return []
        # one script (KEEP_ALIVE): ids no longer pending (acked meanwhile, or Redis
        # restarted empty) are left out of both lists
        lost = await self._keep_alive_script(keys=[stream], args=[
            group, consumer, "1" if reset_deliveries else "0", *ids])
        return [bytes(eid) for eid in lost]

    async def ack(self, stream: str, group: str, *entry_ids: bytes, delete: bool = True) -> int:
        """Acknowledge entries and (``delete``, the default: every stage stream has one
        consumer group) delete them, in one script: an acknowledged entry holds no
        memory.  Returns how many were acknowledged by this call."""
        if not entry_ids:
            return 0
        if not delete:
            return int(await self.redis.xack(stream, group, *entry_ids))
        return int(await self._ack_del_script(keys=[stream], args=[group, *entry_ids]))

    # --- turns -----------------------------------------------------------------------
    async def current_turn(self, sid: str) -> int:
        value = await self.redis.get(keys.turn(sid))
        return int(value) if value else 0

    async def advance_turn(self, sid: str, owner: Owner | None = None) -> int:
        """The session's next turn.  With ``owner``, fenced (INCR_IF_OWNER): a stale
        owner's late increment would supersede the new owner's turn in every stage."""
        if owner is not None:
            turn = await self._incr_owned_script(
                keys=[owner.stream, keys.turn(sid)],
                args=[owner.group, owner.consumer, owner.entry_id, self.settings.session_ttl_s])
            if turn is None:
                raise OwnershipLost(owner.entry_id)
            return int(turn)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(keys.turn(sid))
        pipe.expire(keys.turn(sid), self.settings.session_ttl_s)
        return int((await pipe.execute())[0])

    # --- what the client asked for (read by the stages through SessionState) ---------
    async def set_prefs(self, sid: str, **fields: str) -> None:
        """Record per-session preferences (``instructions``; ``heard:<turn>``: what the
        user heard of that turn's reply) in the hash ``s2s:prefs:{sid}``."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.prefs(sid), mapping=fields)
        pipe.expire(keys.prefs(sid), self.settings.session_ttl_s)
        await pipe.execute()

    async def stage_value(self, sid: str, stage: str) -> bytes | None:
        return await self.redis.get(keys.stage_state(sid, stage))

    async def set_stage_value(self, sid: str, stage: str, value: str) -> None:
        await self.redis.set(keys.stage_state(sid, stage), value, ex=self.settings.session_ttl_s)

    async def prefs(self, sid: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.prefs(sid))
        return {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}

    async def close_session(self, sid: str) -> None:
        """Per-session keys expire shortly after the session ends."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys.session_keys(sid):
            pipe.expire(key, self.settings.closed_ttl_s)
        await pipe.execute()

    # --- sessions and gateways ------------------------------------------------------
    # A session's owning gateway lives in s2s:gw:{sid}; only the owner may end it,
    # and every "is it still mine? then act" is one Lua script (atomic: a gateway
    # that resumed the session in between can never be undone by the old one).
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
        if last is None or entry_order(last) < entry_order(open_id):
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
        """Renew this worker's lease: its member's score is the time of its last beat."""
        await self._heartbeat_script(keys=[keys.WORKERS], args=[
            repr(time.time()), f"{stage}|{worker_id}|{metrics_url}"])

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

    async def expired_workers(self, stage: str, lease_s: float) -> list[tuple[str, str, float]]:
        """Registry members of ``stage`` whose lease ran out: [(member, worker id,
        last beat)].  Members older than a minute are gone already (heartbeat)."""
        now = time.time()
        rows = await self.redis.zrangebyscore(keys.WORKERS, now - 60, now - lease_s,
                                              withscores=True)
        out = []
        for member, score in rows:
            parts = member.decode().split("|", 2)
            if len(parts) == 3 and parts[0] == stage:
                out.append((member.decode(), parts[1], score))
        return out

    async def pending_of(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                         count: int) -> tuple[list[bytes], int]:
        """Ids pending on ``consumer`` idle for at least ``min_idle_ms`` (up to ``count``),
        and how many it has pending in all."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xpending_range(stream, group, min="-", max="+", count=max(count, 1),
                            consumername=consumer, idle=min_idle_ms)
        pipe.xpending(stream, group)  # the summary: entries pending per consumer
        idle_rows, summary = await pipe.execute()
        total = sum(int(c["pending"]) for c in summary.get("consumers") or []
                    if c["name"] == consumer.encode())
        return [r["message_id"] for r in idle_rows][:count], total

    async def claim(self, stream: str, group: str, consumer: str, entry_ids: list[bytes],
                    min_idle_ms: int) -> list[Entry]:
        """XCLAIM entries still idle for ``min_idle_ms`` (so a live owner, whose
        keep-alive keeps them fresh, is never robbed); counts as a delivery.  Entries
        deleted meanwhile are dropped from the pending list by Redis and left out."""
        if not entry_ids:
            return []
        res = await self.redis.xclaim(stream, group, consumer, min_idle_time=min_idle_ms,
                                      message_ids=entry_ids)
        return [(eid, fields.get(FIELD, b"")) for eid, fields in res or []
                if eid is not None and fields is not None]

    async def drop_consumer(self, stream: str, group: str, consumer: str, member: str,
                            seen_before: float) -> bool:
        """Forget a dead worker that has nothing pending any more: its consumer in the
        group and its registry member (unless it has heartbeated since)."""
        # checked and deleted in one script: DELCONSUMER also drops entries pending on
        # the consumer, and a stalled worker that comes back may have read new ones
        if await self._delconsumer_script(keys=[stream], args=[group, consumer]) == -1:
            return False
        return bool(await self._forget_script(keys=[keys.WORKERS], args=[member, seen_before]))
