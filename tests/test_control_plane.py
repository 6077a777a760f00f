"""The control plane's cost does not grow with sessions: a process's Redis connections stay
the same however many sessions it serves (one multiplexed reader per kind of session
stream, a bounded command pool, one turn subscription), and turn changes reach the work
in flight by pub/sub, with a slow check for what pub/sub loses."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import redis.asyncio as aredis

from s2s import keys
from s2s.bus import FIELD, Bus, Owner
from s2s.launcher.redis_server import RedisServer
from s2s.turn_watch import TurnWatch


async def _xadd(r: aredis.Redis, key: str, n: int, tag: str = "") -> list[bytes]:
    return [await r.xadd(key, {FIELD: f"{tag}{i}".encode()}) for i in range(n)]


async def test_many_streams_are_read_on_one_connection_in_order_from_each_position(settings):
    settings = dataclasses.replace(settings, block_ms=5000)  # a wake-up must not wait for it
    bus = Bus(settings)
    r = aredis.Redis.from_url(settings.redis_url)
    errors: list[Exception] = []
    try:
        sids = [f"s{i}" for i in range(30)]
        written = {sid: await _xadd(r, keys.out(sid), 5, sid) for sid in sids}
        # each follower from its own position: all, none, from the third
        follows = {sid: bus.follow_out(sid, [b"0-0", written[sid][-1], written[sid][2]][i % 3],
                                       50, 5000, errors.append)
                   for i, sid in enumerate(sids)}
        got = {sid: [] for sid in sids}

        async def drain(until: float):
            while time.monotonic() < until:
                for sid, f in follows.items():
                    got[sid] += await f.get(0.01)

        await drain(time.monotonic() + 1.0)
        for i, sid in enumerate(sids):
            want = [written[sid], [], written[sid][3:]][i % 3]
            assert [eid for eid, _ in got[sid]] == want, sid
        # new entries arrive in order, on one reading connection for all 30 sessions
        more = {sid: await _xadd(r, keys.out(sid), 3, "more") for sid in sids}
        await drain(time.monotonic() + 1.0)
        for i, sid in enumerate(sids):
            want = [written[sid], [], written[sid][3:]][i % 3] + more[sid]
            assert [eid for eid, _ in got[sid]] == want, sid
        clients = await r.client_list()
        reading = [c for c in clients if c.get("cmd") in ("xread", "client|id")]
        assert len(reading) == 1, reading
        # a newcomer joins the running XREAD (block 5 s) at once: CLIENT UNBLOCK
        late = bus.follow_out("late", b"0-0", 50, 5000, errors.append)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        eid = await r.xadd(keys.out("late"), {FIELD: b"x"})
        assert [e for e, _ in await late.get(2.0)] == [eid]
        assert time.monotonic() - t0 < 1.0
        late.close()
        assert not errors
    finally:
        await bus.close()
        await r.aclose()


async def test_a_full_follower_waits_alone_and_loses_nothing(settings):
    bus = Bus(settings)
    r = aredis.Redis.from_url(settings.redis_url)
    try:
        slow = bus.follow_out("slow", b"0-0", 10, 200, lambda e: None)   # backlog: 20
        fast = bus.follow_out("fast", b"0-0", 10, 200, lambda e: None)
        slow_ids = await _xadd(r, keys.out("slow"), 100)
        fast_ids = await _xadd(r, keys.out("fast"), 100)
        got_fast: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got_fast) < 100 and time.monotonic() < deadline:
            got_fast += [e for e, _ in await fast.get(0.2)]
        assert got_fast == fast_ids                 # never held up by the slow one
        assert len(slow.entries) <= 30              # bounded while nobody takes them
        got_slow: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(got_slow) < 100 and time.monotonic() < deadline:
            got_slow += [e for e, _ in await slow.get(0.2)]
        assert got_slow == slow_ids                 # all of it, in order, once
    finally:
        await bus.close()
        await r.aclose()


async def test_the_reader_reads_on_after_a_redis_restart(tmp_path):
    from s2s import config

    with RedisServer() as server:
        settings = config.load({"redis_url": server.url, "block_ms": 200, "metrics_port": 0},
                               environ={})
        bus = Bus(settings)
        r = aredis.Redis.from_url(server.url)
        errors: list[Exception] = []
        recovered: list[bool] = []
        try:
            f = bus.follow_audio("a", b"0-0", 50, 200, errors.append,
                                 lambda: recovered.append(True))
            first = await _xadd(r, keys.audio("a"), 3)
            got = []
            while len(got) < 3:
                got += [e for e, _ in await f.get(1.0)]
            assert got == first
            server.restart(down_s=1.0)
            await asyncio.sleep(0.5)
            after = await _xadd(r, keys.audio("a"), 3)  # a fresh, empty Redis
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                got += [e for e, _ in await f.get(0.5)]
            assert got == after
            assert errors and recovered  # counted while down, told when it read again
        finally:
            await bus.close()
            await r.aclose()


async def test_a_turn_change_reaches_the_work_in_flight_by_pubsub(settings):
    bus, other = Bus(settings), Bus(settings)
    # the slow check is 30 s here: only the push can be this fast
    watch = TurnWatch(bus, check_s=30.0)
    try:
        first = watch.watch("s", 0)
        await asyncio.sleep(0.3)                       # subscribed
        waiter = watch.watch("s", 1)
        assert await other.advance_turn("s") == 1      # the gateway's (unfenced) change
        await asyncio.wait_for(first, 1.0)
        assert not waiter.done()                       # turn 1 is current, not superseded
        entry = await other.redis.xadd(keys.SESSIONS, {FIELD: b"x"})
        await other.ensure_group(keys.SESSIONS, "vad")
        await other.redis.xreadgroup("vad", "owner", {keys.SESSIONS: ">"})
        t0 = time.monotonic()
        assert await other.advance_turn("s", Owner(keys.SESSIONS, "vad", "owner", entry)) == 2
        assert await asyncio.wait_for(waiter, 1.0) == 2  # the VAD's (fenced) change
        assert time.monotonic() - t0 < 1.0
        # one subscription for the whole process, whatever is watched
        clients = await other.redis.client_list()
        assert sum(1 for c in clients if int(c.get("sub", 0)) > 0) == 1
    finally:
        await watch.close()
        await bus.close()
        await other.close()


async def test_a_change_pubsub_lost_is_found_by_the_slow_check(settings):
    bus = Bus(settings)
    watch = TurnWatch(bus, check_s=0.3)
    try:
        waiter = watch.watch("q", 0)
        await asyncio.sleep(0.3)
        await bus.redis.set(keys.turn("q"), 3)  # as after a restart: nothing published
        assert await asyncio.wait_for(waiter, 2.0) == 3
    finally:
        await watch.close()
        await bus.close()


@pytest.mark.timeout(900)
def test_connections_do_not_grow_with_sessions(tmp_path, redis_url, monkeypatch):
    """The bench, reduced: a real gateway and real workers (VAD real, STT/LLM/TTS timing
    stubs), 4 then 24 sessions sending audio: each process holds no more Redis
    connections at 24 sessions than its bound, the same as at 4 (before: about four more
    per session)."""
    from s2s.bench.control_plane import Stack, measure

    monkeypatch.setenv("S2S_REDIS_POOL_SIZE", "4")
    stack = Stack(24, tmp_path).start(redis_url)
    lines: list[str] = []

    async def run():
        await stack.ready()
        return await measure(stack, [4, 24], hold_s=3.0, idle_s=1.0, settle_s=2.0,
                             out=lines.append)
    try:
        small, large = asyncio.run(run())
    finally:
        stack.stop()
    print("\n".join(lines))
    assert (small["sessions"], large["sessions"]) == (4, 24), lines
    for proc in ("gateway", "vad", "stt", "llm", "tts"):
        # at most the pool (4 here), the stream reader and the turn subscription, at 4
        # sessions and at 24 alike: the pool fills with concurrent commands, up to its
        # bound, whatever the session count (before: a blocked XREAD per session, and
        # a pool that grew without bound)
        for row in (small, large):
            assert row["connections"][proc] <= 4 + 2, (proc, lines)
