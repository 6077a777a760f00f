"""Stage streams and consumer groups: where a frame goes, reading a stage's input,
acknowledging it, keeping in-flight entries alive and taking over a dead consumer's.

Every stream entry has one field, ``f``, holding one encoded frame."""

from __future__ import annotations

import time
from typing import Iterable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import keys
from .config import Settings
from .frames import (Audio, Frame, Notice, ReplyAudio, ReplyText, SessionConfig, SessionEnd,
                     SessionOpen, SpeechStarted, ToolCall, ToolOutput, Transcript, TurnStatus,
                     Utterance, encode)
from .redis_scripts import ACK_DEL, KEEP_ALIVE

FIELD = b"f"
# A session's audio stream gets its TTL again at most this often per writer (of the TTL):
# its writer, the gateway, adds 50 entries a second while the session is open, and one
# EXPIRE per entry was half of what a speaking session costs Redis.  The TTL set at the
# last refresh outlives the next one, so an open session's stream never expires; a new
# writer (another gateway after a resume) sets it at its first entry.
AUDIO_TTL_REFRESH_SHARE = 0.1
TTL_MEMORY = 8192  # streams remembered per process (older entries are forgotten first)
Entry = tuple[bytes, bytes]  # (entry id, encoded frame)


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
    if isinstance(frame, ToolOutput):
        return [keys.STAGE_STREAMS["llm"]]
    if isinstance(frame, (SpeechStarted, ReplyAudio, Notice, TurnStatus, ToolCall)):
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


class StageStreams:
    """Part of ``Bus``: frames written to their streams, and the consumer-group side of
    every stage (delivery is at-least-once: an entry is acknowledged after its output
    is written, and a dead consumer's entries are claimed by a live one)."""

    redis: aioredis.Redis
    settings: Settings
    audio_ttl_set: dict[str, float]
    #: the Lua scripts this part runs (attribute: source), registered by ``Bus``
    SCRIPTS = {"_ack_del_script": ACK_DEL, "_keep_alive_script": KEEP_ALIVE}

    async def emit(self, *frames: Frame) -> list[bytes]:
        """XADD each frame to its streams (bounded); refresh per-session TTLs (a session's
        audio stream only every AUDIO_TTL_REFRESH_SHARE of the TTL)."""
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        now = time.monotonic()
        for frame in frames:
            data = encode(frame)
            if isinstance(frame, (SessionOpen, SessionEnd)):  # (re)opened or ended here: the
                self.audio_ttl_set.pop(keys.audio(frame.sid), None)  # TTL was or will be reset
            for stream in routes(frame):
                shared = "{" not in stream
                pipe.xadd(stream, {FIELD: data},
                          maxlen=s.stream_maxlen if shared else s.session_maxlen, approximate=True)
                if not shared and self._ttl_due(frame, stream, now):
                    pipe.expire(stream, s.session_ttl_s)
        results = await pipe.execute()
        return [r for r in results if isinstance(r, bytes)]

    def _ttl_due(self, frame: Frame, stream: str, now: float) -> bool:
        """Does this write set the stream's TTL?  Always, except for live audio whose
        stream this process set recently.  Only ``Audio`` is spared: its writer owns the
        open session, so nothing else ends the stream between two refreshes, whereas a
        late write to a closed session's stream must set its TTL or the key would stay."""
        if not isinstance(frame, Audio):
            return True
        last = self.audio_ttl_set.get(stream)
        if last is not None and now - last < self.settings.session_ttl_s * AUDIO_TTL_REFRESH_SHARE:
            return False
        if last is None and len(self.audio_ttl_set) >= TTL_MEMORY:
            del self.audio_ttl_set[next(iter(self.audio_ttl_set))]  # the oldest remembered
        self.audio_ttl_set.pop(stream, None)  # re-inserted last: dict order is age order
        self.audio_ttl_set[stream] = now
        return True

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group (and stream) if missing; safe to call any number of times."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def groups(self, stream: str) -> list[dict]:
        """XINFO GROUPS of ``stream``: each consumer group with its pending and lag."""
        return await self.redis.xinfo_groups(stream)

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
