"""One session's keys: its audio and output streams, its turn counter, what the client
asked for, and the VAD owner's resume point; and the writes a session owner fences
by the session's entry in s2s:vad:sessions (a stale owner's late write is refused)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import AsyncIterator, Callable, NamedTuple

import redis.asyncio as aioredis

from . import keys
from .bus_reader import Follow, StreamReader, connect
from .bus_streams import FIELD, Entry, entry_order, routes
from .config import Settings
from .frames import Frame, encode
from .redis_scripts import ADVANCE_TURN, EMIT_IF_OWNER, INCR_IF_OWNER, SAVE_IF_OWNER

#: the pub/sub channel every turn change is published on ("<turn> <sid>"): work in
#: flight for a superseded turn is stopped at once (s2s.turn_watch), not polled for
TURN_CHANNEL = "s2s:turns"
AUDIO_GAP_S = 0.04  # the VAD's audio reads, at most this often while audio flows


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


class SessionKeys:
    """Part of ``Bus``: the keys of one session (``keys.session_keys``) and the VAD's
    hold on it."""

    redis: aioredis.Redis
    settings: Settings
    readers: dict[str, StreamReader]
    #: the Lua scripts this part runs (attribute: source), registered by ``Bus``
    SCRIPTS = {"_emit_owned_script": EMIT_IF_OWNER, "_save_owned_script": SAVE_IF_OWNER,
               "_incr_owned_script": INCR_IF_OWNER, "_advance_turn_script": ADVANCE_TURN}

    # --- following session streams (one reading connection per kind: bus_reader) ------
    def _reader(self, kind: str, count: int, block_ms: int,
                on_error: Callable[[Exception], None], on_ok: Callable[[], None],
                gap_s: float = 0.0) -> StreamReader:
        reader = self.readers.get(kind)
        if reader is None:
            reader = self.readers[kind] = StreamReader(
                connect(self.settings, single_connection=True), self.redis, count,
                block_ms, 2 * count, on_error, on_ok, name=kind, gap_s=gap_s)
        return reader

    def follow_out(self, sid: str, after: bytes, count: int, block_ms: int,
                   on_error: Callable[[Exception], None], on_ok: Callable[[], None] = lambda: None
                   ) -> Follow:
        """The session's output stream after ``after``, read with every other session's
        output this bus follows (the first caller's count, block and callbacks hold)."""
        return self._reader("out", count, block_ms, on_error, on_ok).follow(keys.out(sid), after)

    def follow_audio(self, sid: str, after: bytes, count: int, block_ms: int,
                     on_error: Callable[[Exception], None],
                     on_ok: Callable[[], None] = lambda: None) -> Follow:
        """The session's audio stream after ``after`` (see ``follow_out``), read at most
        every AUDIO_GAP_S: a client's 20 ms messages reach the VAD a few at a time (one
        XREAD each was a third of a speaking session's commands)."""
        return self._reader("audio", count, block_ms, on_error, on_ok, AUDIO_GAP_S).follow(
            keys.audio(sid), after)

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

    # --- turns -----------------------------------------------------------------------
    async def current_turn(self, sid: str) -> int:
        value = await self.redis.get(keys.turn(sid))
        return int(value) if value else 0

    async def current_turns(self, sids: list[str]) -> dict[str, int]:
        """The turn of each session, in one round trip."""
        values = await self.redis.mget([keys.turn(sid) for sid in sids])
        return {sid: int(v) if v else 0 for sid, v in zip(sids, values)}

    async def advance_turn(self, sid: str, owner: Owner | None = None) -> int:
        """The session's next turn, published on TURN_CHANNEL.  With ``owner``, fenced
        (INCR_IF_OWNER): a stale owner's late increment would supersede the new owner's
        turn in every stage."""
        if owner is not None:
            turn = await self._incr_owned_script(
                keys=[owner.stream, keys.turn(sid)],
                args=[owner.group, owner.consumer, owner.entry_id, self.settings.session_ttl_s,
                      TURN_CHANNEL, sid])
            if turn is None:
                raise OwnershipLost(owner.entry_id)
            return int(turn)
        return int(await self._advance_turn_script(
            keys=[keys.turn(sid)], args=[self.settings.session_ttl_s, TURN_CHANNEL, sid]))

    async def turn_changes(self) -> AsyncIterator[tuple[str, int] | None]:
        """Turn changes as they are published: None once subscribed (a change made
        before is not seen: look at the turns then), then (sid, turn) for each change.  Ends with the RedisError that lost the
        subscription (pub/sub keeps nothing for a subscriber that was away)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(TURN_CHANNEL)
            yield None
            while True:
                # a bounded wait: the client's socket timeout would end a longer one
                msg = await pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                turn, _, sid = bytes(msg["data"]).decode("utf-8", "replace").partition(" ")
                if sid and turn.isdigit():
                    yield sid, int(turn)
        finally:
            await pubsub.aclose()

    # --- what the client asked for (read by the stages through SessionState) ---------
    async def set_prefs(self, sid: str, **fields: str) -> None:
        """Record per-session preferences (``instructions``; ``heard:<turn>``: what the
        user heard of that turn's reply) in the hash ``s2s:prefs:{sid}``."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.prefs(sid), mapping=fields)
        pipe.expire(keys.prefs(sid), self.settings.session_ttl_s)
        await pipe.execute()

    async def context(self, sid: str) -> bytes | None:
        """A session's LLM context (``s2s:ctx:{sid}``), as JSON bytes."""
        return await self.redis.get(keys.ctx(sid))

    async def set_context(self, sid: str, value: str) -> None:
        await self.redis.set(keys.ctx(sid), value, ex=self.settings.session_ttl_s)

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

    async def trim_out(self, sid: str, min_id: bytes) -> int:
        """Drop output entries older than ``min_id`` (played by the client already)."""
        return await self.redis.xtrim(keys.out(sid), minid=min_id, approximate=False)
