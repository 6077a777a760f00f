"""Admission control against a real Redis: capacity (all gateways together), a stage's
queue wait, per-principal limits (sessions, audio seconds, bytes in Redis) and idle
sessions.  The stage backlog is made by XADDing to the real stage streams."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from s2s import config, keys
from s2s.bus import Bus
from s2s.frames import SessionEnd
from s2s.gateway import admission
from s2s.gateway.auth import mint_token
from tests.conftest import AUTH_SETTINGS, TEST_TOKEN_SECRET
from tests.test_gateway import closed_with, hello, pcm, serve, stream_frames


class Gateway:
    def __init__(self, redis_url: str, **overrides):
        self.settings = config.load({"redis_url": redis_url, **AUTH_SETTINGS, **overrides},
                                    environ={})

    async def __aenter__(self):
        self.server, self.task, self.http = await serve(self.settings)
        self.ws = self.http.replace("http", "ws") + "/ws"
        self.bus = Bus(self.settings)
        self.redis = self.bus.redis
        return self

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)
        await self.bus.close()


async def refused_with(gw, **kw) -> tuple[dict, int | None]:
    ws = await websockets.connect(gw.ws, **kw)
    await ws.send(json.dumps({"type": "hello"}))
    got, code = await closed_with(ws)
    assert got and got[0]["type"] == "error", got
    return got[0], code


async def test_capacity_across_gateways(redis_url):
    async with Gateway(redis_url, session_capacity=2) as a, \
            Gateway(redis_url, session_capacity=2) as b:
        ws1, _ = await hello(a)
        ws2, _ = await hello(b)                  # the second gateway counts the first's
        error, code = await refused_with(a)
        assert error["code"] == "busy" and code == 1013 and error["retry_after_s"] > 0
        error, code = await refused_with(b)
        assert error["code"] == "busy" and code == 1013
        assert admission.REFUSED.labels("busy")._value.get() >= 2
        await ws1.close()
        await asyncio.sleep(0.3)
        ws3, _ = await hello(b)                  # a place is free again
        await ws2.close()
        await ws3.close()


async def test_capacity_follows_vad_workers(redis_url):
    async with Gateway(redis_url) as gw:
        await gw.bus.heartbeat("vad", "v1", "http://127.0.0.1:1")
        await asyncio.sleep(1.2)   # the next refresh sees the worker
        import httpx
        async with httpx.AsyncClient() as client:
            body = (await client.get(gw.http + "/healthz")).json()
        assert body["headroom"]["capacity"] == admission.VAD_SESSIONS_PER_WORKER


async def test_busy_when_a_stage_falls_behind(redis_url):
    async with Gateway(redis_url, admission_max_wait_s=1.0) as gw:
        ws, _ = await hello(gw)      # no backlog: admitted
        await ws.close()
        await gw.bus.ensure_group(keys.stage_stream("llm"), "llm")
        old = int(time.time() * 1000) - 5000   # a transcript waiting for 5 s
        await gw.redis.xadd(keys.stage_stream("llm"), {b"f": b"x"}, id=f"{old}-0")
        await asyncio.sleep(1.2)
        error, code = await refused_with(gw)
        assert error["code"] == "busy" and code == 1013 and "llm" in error["message"]
        assert error["retry_after_s"] >= 5
        # the LLM workers catch up (the entry is delivered): admitted again
        await gw.redis.xreadgroup("llm", "w", {keys.stage_stream("llm"): ">"})
        await asyncio.sleep(1.2)
        ws, _ = await hello(gw)
        await ws.close()


async def test_sessions_per_principal(redis_url):
    async with Gateway(redis_url, principal_max_sessions=1) as gw:
        ws, _ = await hello(gw)
        error, code = await refused_with(gw)
        assert error["code"] == "session_limit" and code == 1008
        # a token's own limit wins over the gateway's
        tok = {"additional_headers": {"Authorization": "Bearer " + mint_token(
            TEST_TOKEN_SECRET, "team", 60, max_sessions=2)}}
        a = await websockets.connect(gw.ws, **tok)
        await a.send(json.dumps({"type": "hello"}))
        b = await websockets.connect(gw.ws, **tok)
        await b.send(json.dumps({"type": "hello"}))
        assert json.loads(await a.recv())["type"] == json.loads(await b.recv())["type"] == "ready"
        error, code = await refused_with(gw, **tok)
        assert error["code"] == "session_limit"
        for c in (ws, a, b):
            await c.close()
        await asyncio.sleep(0.3)
        ws, _ = await hello(gw)
        await ws.close()


async def test_audio_seconds_per_minute(redis_url):
    async with Gateway(redis_url, principal_audio_s_per_min=1.0, max_audio_rate=100.0) as gw:
        if time.time() % 60 > 58:   # the budget is per wall-clock minute: not across one
            await asyncio.sleep(60.2 - time.time() % 60)
        ws, ready = await hello(gw)
        for _ in range(4):
            await ws.send(pcm(4000))             # 0.25 s each: 1 s allowed
        await ws.send(pcm(4000))
        got = []
        async with asyncio.timeout(5):
            while not got or got[-1].get("code") != "audio_limit":
                got.append(json.loads(await ws.recv()))
        audio = [f for f in await stream_frames(gw.redis, keys.audio(ready["session_id"]))]
        assert len(audio) == 4                   # the fifth was dropped
        await ws.close()


async def test_idle_session_closed_and_ended(redis_url):
    async with Gateway(redis_url, idle_timeout_s=1.0) as gw:
        ws, ready = await hello(gw)
        sid = ready["session_id"]
        await ws.send(pcm(320))
        got, code = await closed_with(ws, timeout=6)
        assert got[-1]["code"] == "idle_timeout" and code == 1008
        for _ in range(50):      # the session ended: its VAD owner lets it go
            frames = await stream_frames(gw.redis, keys.audio(sid))
            if isinstance(frames[-1], SessionEnd):
                break
            await asyncio.sleep(0.05)
        assert isinstance(frames[-1], SessionEnd)
        assert await gw.bus.live_sessions() == 0


async def test_session_bytes_limit(redis_url, monkeypatch):
    monkeypatch.setattr(admission, "BYTES_EVERY_S", 0.5)
    async with Gateway(redis_url, max_session_bytes=20_000, max_audio_rate=100.0) as gw:
        small, _ = await hello(gw)
        ws, ready = await hello(gw)
        for _ in range(10):
            await ws.send(pcm(4000))             # 80 kB of audio in Redis
        got, code = await closed_with(ws, timeout=6)
        assert got[-1]["code"] == "session_too_large" and code == 1008
        # the small session is untouched
        await small.send(json.dumps({"type": "ping", "t": 2}))
        assert json.loads(await small.recv())["t"] == 2
        await small.close()


@pytest.mark.parametrize("stage", ["stt", "tts"])
async def test_backlog_reading(redis_url, stage):
    s = config.load({"redis_url": redis_url}, environ={})
    bus = Bus(s)
    try:
        assert (await bus.stage_backlog([stage]))[stage] == {"lag": 0, "pending": 0, "wait_s": 0.0}
        stream = keys.stage_stream(stage)
        await bus.ensure_group(stream, stage)
        for _ in range(3):
            await bus.redis.xadd(stream, {b"f": b"x"})
        await bus.redis.xreadgroup(stage, "w", {stream: ">"}, count=1)
        info = (await bus.stage_backlog([stage]))[stage]
        assert info["lag"] == 2 and info["pending"] == 1 and 0 <= info["wait_s"] < 5
    finally:
        await bus.close()


async def test_bench_burst_mode_counts_busy(redis_url):
    """`s2s bench --burst`: against a gateway with room for one session (no pipeline: the
    admitted one gets no reply), the other burst sessions are refused `busy`, counted, and
    the report says the gateway is still up."""
    import argparse

    from s2s.bench import burst, loadgen

    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    async with Gateway(redis_url, session_capacity=1) as gw:
        args = parser.parse_args(["--url", gw.ws, "--burst", "4", "--burst-window", "0.5",
                                  "--turns", "1", "--no-realtime", "--no-warmup",
                                  "--turn-timeout", "1", "--gap", "0.5", "--lead", "0"])
        report = await burst.run_burst(args)
    assert report["admitted_sessions"] == 1 and report["refused"] == {"busy": 3}
    assert report["refused_not_busy"] == 0
    assert report["health_after"]["status"] == 200
    assert report["unloaded"]["turns_answered"] == 0   # no pipeline here: nobody answers
    table = burst.format_burst(report)
    assert "3 busy" in table and "gateway up" in table
