"""Dead letters (s2s:dead, bounded in length and age): entries that kept killing the
workers taking them, and what ``s2s dead`` does with them."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from . import keys
from .bus_streams import FIELD
from .config import Settings


class DeadLetters:
    """Part of ``Bus``: a dead letter is written, then its entry acknowledged (with
    ``StageStreams.ack``), so the entry is never lost in between."""

    redis: aioredis.Redis
    settings: Settings

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
