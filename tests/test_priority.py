"""Turn-aware order in the worker runtime, against a real redis-server: a stage with
``lookahead`` starts the first piece of a new turn (seq 0) ahead of continuing pieces
of older replies, entries read ahead stay this consumer's (pending, kept fresh, never
claimed by another consumer, acknowledged once done), a waiting later piece is not
starved by a stream of first pieces, and a stage without lookahead keeps stream order."""

from __future__ import annotations

import asyncio
import time

import redis

from s2s import keys
from s2s.bus import FIELD
from s2s.frames import ReplyText, encode
from s2s.stage import Stage
from s2s.worker import Runtime


class OrderStage(Stage):
    """Records the order it processes (sid, seq) in; an item of a sid in ``hold``
    waits until the test removes it; each item takes ``delay`` seconds."""
    name = "prio"
    concurrency = 1
    lookahead = 4
    max_priority_wait_s = 30.0

    def __init__(self, settings, delay: float = 0.0, hold: set[str] | None = None):
        super().__init__(settings)
        self.delay = delay
        self.hold = hold if hold is not None else set()
        self.order: list[tuple[str, int]] = []

    def priority(self, frame: ReplyText) -> float:
        return 0.0 if frame.seq == 0 else 1.0

    async def process(self, frame: ReplyText):
        self.order.append((frame.sid, frame.seq))
        while frame.sid in self.hold:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.delay)
        return
        yield  # an async generator that emits nothing


class FifoStage(OrderStage):
    lookahead = 0  # priority declared but no read-ahead: strict stream order


STREAM = keys.stage_stream("prio")


def push(client: redis.Redis, sid: str, seq: int) -> bytes:
    return client.xadd(STREAM, {FIELD: encode(ReplyText(sid=sid, seq=seq, text="x"))})


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def started(stage: Stage, settings) -> tuple[Runtime, asyncio.Task]:
    runtime = Runtime(stage, settings)
    task = asyncio.create_task(runtime.run())
    client = redis.Redis.from_url(settings.redis_url)
    await until(lambda: runtime.loaded and client.exists(STREAM) and
                client.xinfo_groups(STREAM))
    client.close()
    return runtime, task


async def stopped(runtime: Runtime, task: asyncio.Task) -> None:
    runtime.stopping.set()
    await asyncio.wait_for(task, 10)


def backlog_scenario(stage: OrderStage, settings) -> tuple[list, dict]:
    """a0 runs (held); b1, b2, d0, e1 queue behind it; d0 runs (held) for longer than
    claim_idle_s while the rest wait; then everything runs.  Returns the order and
    what a foreign consumer's XAUTOCLAIM got while they waited."""
    client = redis.Redis.from_url(settings.redis_url)
    seen: dict = {}

    async def scenario():
        stage.hold.update({"a", "d"})
        runtime, task = await started(stage, settings)
        try:
            push(client, "a", 0)
            await until(lambda: stage.order == [("a", 0)])
            for sid, seq in (("b", 1), ("b", 2), ("d", 0), ("e", 1)):
                push(client, sid, seq)
            stage.hold.discard("a")
            await until(lambda: len(stage.order) >= 2)
            # whatever runs second is held; the others wait (read ahead or in the stream)
            await asyncio.sleep(settings.claim_idle_s * 1.5)
            seen["pending"] = client.xpending(STREAM, "prio")["pending"]
            seen["waiting"] = len(runtime.waiting)
            seen["claimed"] = client.xautoclaim(STREAM, "prio", "thief",
                                                int(settings.claim_idle_s * 1000),
                                                count=10)[1]
            stage.hold.clear()
            await until(lambda: len(stage.order) == 5)
            await until(lambda: client.xpending(STREAM, "prio")["pending"] == 0)
            seen["left"] = client.xlen(STREAM)
        finally:
            await stopped(runtime, task)

    try:
        asyncio.run(scenario())
    finally:
        client.close()
    return stage.order, seen


def test_first_piece_of_a_new_turn_goes_first(settings):
    order, seen = backlog_scenario(OrderStage(settings), settings)
    assert order == [("a", 0), ("d", 0), ("b", 1), ("b", 2), ("e", 1)]
    # while d0 ran, b1, b2 and e1 were read ahead: pending on this consumer and kept
    # fresh, so another consumer's idle claim got none of them
    assert seen["waiting"] == 3 and seen["pending"] == 4
    assert seen["claimed"] == []
    assert seen["left"] == 0  # every entry acknowledged (and deleted)


def test_without_lookahead_stream_order_is_kept(settings):
    order, seen = backlog_scenario(FifoStage(settings), settings)
    assert order == [("a", 0), ("b", 1), ("b", 2), ("d", 0), ("e", 1)]
    assert seen["waiting"] == 0 and seen["pending"] == 1  # nothing read ahead
    assert seen["claimed"] == [] and seen["left"] == 0


def test_a_later_piece_is_not_starved_by_first_pieces(settings):
    stage = OrderStage(settings, delay=0.2)
    stage.max_priority_wait_s = 0.5
    client = redis.Redis.from_url(settings.redis_url)

    async def scenario():
        runtime, task = await started(stage, settings)
        try:
            push(client, "a", 0)
            push(client, "x", 1)
            for i in range(16):  # first pieces keep coming faster than they are served
                push(client, f"s{i}", 0)
                await asyncio.sleep(0.05)
            await until(lambda: len(stage.order) == 18, timeout=30)
        finally:
            await stopped(runtime, task)

    try:
        asyncio.run(scenario())
        assert client.xpending(STREAM, "prio")["pending"] == 0
    finally:
        client.close()
    at = stage.order.index(("x", 1))
    # first pieces pushed after x1 went ahead of it (priority), yet x1 ran once it had
    # waited max_priority_wait_s, well before the backlog of first pieces was served
    assert at >= 2, stage.order
    assert at <= 10, stage.order
    assert {s for s, _ in stage.order} == {"a", "x"} | {f"s{i}" for i in range(16)}
