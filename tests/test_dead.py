"""Dead letters against a real redis-server: bounded by age and by size, and
`s2s dead list|show|replay|purge` (replay goes back to a live worker)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis

from s2s import cli, config, keys
from s2s.bus import FIELD, Bus
from s2s.frames import Transcript, Utterance, decode, encode

ECHO = "tests.stages:EchoStage"


def _dead_settings(redis_url: str, **extra) -> config.Settings:
    return config.load({"redis_url": redis_url, "metrics_port": 0, **extra}, environ={})


async def _poison(bus: Bus, stream: str, frame, reason: str = "test") -> bytes:
    """Put a frame on a stage stream, deliver it, and dead-letter it as the runtime does."""
    await bus.ensure_group(stream, stream.split(":")[-1])
    eid = await bus.redis.xadd(stream, {FIELD: encode(frame)})
    await bus.read_group(stream, stream.split(":")[-1], "w", 10, 0)
    await bus.dead_letter(stream, stream.split(":")[-1], eid, encode(frame), 6, reason)
    return eid


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_dead_letter_is_acked_and_deleted_from_its_stream(redis_url):
    bus = Bus(_dead_settings(redis_url))
    try:
        eid = await _poison(bus, "s2s:stt",
                            Utterance(sid="s", turn=3, pcm=b"\0\0" * 800, sr=16000))
        # the dead letter holds the only copy of the payload: the stage entry is gone
        assert await bus.redis.xlen("s2s:stt") == 0
        assert (await bus.redis.xpending("s2s:stt", "stt"))["pending"] == 0
        (dead_id, fields), = await bus.redis.xrange(keys.DEAD)
        assert fields[b"id"] == eid and fields[b"stream"] == b"s2s:stt"
        assert decode(fields[FIELD]).turn == 3
    finally:
        await bus.close()


async def test_dead_letters_are_bounded_by_size_and_age(redis_url):
    bus = Bus(_dead_settings(redis_url, dead_maxlen=5, dead_max_age_s=3600))
    try:
        # one very old dead letter (a day old), written by hand with an old id
        old_ms = int((time.time() - 86400) * 1000)
        await bus.redis.xadd(keys.DEAD, {FIELD: b"old", b"stream": b"s2s:llm"}, id=f"{old_ms}-0")
        for i in range(8):
            await _poison(bus, "s2s:llm", Transcript(sid="s", turn=i, text=f"t{i}"))
        rows = await bus.redis.xrange(keys.DEAD)
        assert len(rows) == 5  # by size (exact: dead letters are rare, trimming is cheap)
        assert [decode(f[FIELD]).text for _, f in rows] == ["t3", "t4", "t5", "t6", "t7"]
    finally:
        await bus.close()
    bus = Bus(_dead_settings(redis_url, dead_maxlen=100, dead_max_age_s=3600))
    try:
        await bus.redis.delete(keys.DEAD)
        await bus.redis.xadd(keys.DEAD, {FIELD: b"old"}, id=f"{old_ms}-0")
        await _poison(bus, "s2s:llm", Transcript(sid="s", turn=9, text="new"))
        rows = await bus.redis.xrange(keys.DEAD)
        assert [f[FIELD] for _, f in rows][:1] != [b"old"] and len(rows) == 1  # by age
    finally:
        await bus.close()


def test_cli_list_show_purge(redis_url, capsys, monkeypatch):
    monkeypatch.setenv("S2S_REDIS_URL", redis_url)

    async def plant():
        bus = Bus(_dead_settings(redis_url))
        try:
            await _poison(bus, "s2s:llm", Transcript(sid="sess-1", turn=4, text="hello"),
                          reason="delivered 6 times")
            await _poison(bus, "s2s:tts", Transcript(sid="sess-2", turn=7, text="x"))
            await bus.redis.xadd(keys.DEAD, {FIELD: b"\x93garbage", b"stream": b"s2s:stt",
                                             b"reason": b"bad"})
            return await bus.redis.xrange(keys.DEAD)
        finally:
            await bus.close()

    rows = asyncio.run(plant())
    rc, out, _ = run_cli(capsys, "dead", "list")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["id", "age", "stream", "deliv"]
    assert len(lines) == 4 and lines[1].startswith(rows[-1][0].decode())  # newest first
    assert "sess-1/4" in out and "s2s:llm" in out and "delivered 6 times" in out
    assert "sess-2/7" in out and "?/?" in out  # the undecodable one is listed too

    rc, out, _ = run_cli(capsys, "dead", "show", rows[0][0].decode())
    shown = json.loads(out)
    assert rc == 0 and shown["stream"] == "s2s:llm" and shown["deliveries"] == "6"
    assert shown["frame"]["kind"] == "Transcript" and shown["frame"]["text"] == "hello"
    rc, _, err = run_cli(capsys, "dead", "show", "123-0")
    assert rc == 1 and "no dead letter" in err
    rc, _, err = run_cli(capsys, "dead", "show", "not-an-id")
    assert rc == 2 and "not a dead letter id" in err

    rc, out, _ = run_cli(capsys, "dead", "purge", "--older-than", "3600")
    assert rc == 0 and "purged 0" in out
    rc, out, _ = run_cli(capsys, "dead", "purge")
    assert rc == 0 and "purged 3 dead letters" in out
    rc, out, _ = run_cli(capsys, "dead", "list")
    assert "no dead letters" in out


@pytest.mark.slow
def test_replay_sends_the_frame_back_to_a_live_worker(workers, redis_url, capsys, monkeypatch):
    monkeypatch.setenv("S2S_REDIS_URL", redis_url)

    async def plant() -> bytes:
        bus = Bus(_dead_settings(redis_url))
        try:
            await _poison(bus, "s2s:echo", Transcript(sid="rp", turn=0, text="again"))
            return (await bus.redis.xrange(keys.DEAD))[0][0]
        finally:
            await bus.close()

    dead_id = asyncio.run(plant())
    workers.start(ECHO)
    workers.wait_ready("echo")
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(keys.out("rp")) == 0
    rc, out, _ = run_cli(capsys, "dead", "replay", dead_id.decode())
    assert rc == 0 and out.startswith(f"replayed {dead_id.decode()} as ")
    assert r.xlen(keys.DEAD) == 0
    deadline = time.monotonic() + 15
    while not r.xlen(keys.out("rp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (_, fields), = r.xrange(keys.out("rp"))
    assert (decode(fields[FIELD]).event, decode(fields[FIELD]).message) == ("echo", "again")
    rc, _, err = run_cli(capsys, "dead", "replay", dead_id.decode())
    assert rc == 1 and "no dead letter" in err
