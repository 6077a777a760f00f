"""The worker registry (s2s:workers): each worker's lease, who is alive, and
forgetting a dead worker once its pending entries were taken over."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from . import keys
from .config import Settings
from .redis_scripts import DELCONSUMER_IF_IDLE, FORGET_IF_STALE, HEARTBEAT


class WorkerRegistry:
    """Part of ``Bus``: the member of a worker is ``stage|worker id|metrics url``, its
    score the time of its last heartbeat."""

    redis: aioredis.Redis
    settings: Settings
    #: the Lua scripts this part runs (attribute: source), registered by ``Bus``
    SCRIPTS = {"_heartbeat_script": HEARTBEAT, "_delconsumer_script": DELCONSUMER_IF_IDLE,
               "_forget_script": FORGET_IF_STALE}

    async def server_info(self) -> dict:
        """INFO server of the Redis this bus talks to (its version, for the checks of
        s2s.redis_version)."""
        return await self.redis.info("server")

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

    async def drop_consumer(self, stream: str, group: str, consumer: str, member: str,
                            seen_before: float) -> bool:
        """Forget a dead worker that has nothing pending any more: its consumer in the
        group and its registry member (unless it has heartbeated since)."""
        # checked and deleted in one script: DELCONSUMER also drops entries pending on
        # the consumer, and a stalled worker that comes back may have read new ones
        if await self._delconsumer_script(keys=[stream], args=[group, consumer]) == -1:
            return False
        return bool(await self._forget_script(keys=[keys.WORKERS], args=[member, seen_before]))
