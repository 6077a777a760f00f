"""Failover against a real Redis: two gateways on one Redis (a client resumes on B, what
A does later is harmless), a gateway killed with SIGKILL (its sessions released within
seconds unless resumed elsewhere), and Redis restarted with sessions open (real models:
the next utterance is answered), with persistence off and with AOF on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest
import redis.asyncio as aioredis
import websockets

from s2s import config, keys
from s2s.bus import FIELD, Bus
from s2s.frames import ReplyText, SessionEnd, decode

from tests.conftest import AUTH_SETTINGS, gateway_process
from tests.test_gateway import closed_with, is_type, serve, until

LEASE_S, GRACE_S = 1.0, 1.5


def fast_settings(redis_url: str):
    return config.load({"redis_url": redis_url, "gateway_lease_s": LEASE_S,
                        "gateway_grace_s": GRACE_S, "closed_ttl_s": 60, **AUTH_SETTINGS},
                       environ={})


def ws_url(http: str) -> str:
    return http.replace("http", "ws", 1) + "/ws"


async def hello(url: str, **fields):
    ws = await websockets.connect(url, compression=None)
    await ws.send(json.dumps({"type": "hello", **fields}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready


async def ends(redis, sid: str) -> int:
    """SessionEnd frames in the session's audio stream."""
    return sum(isinstance(decode(f[FIELD]), SessionEnd)
               for _, f in await redis.xrange(keys.audio(sid)))


async def test_resume_on_b_survives_a(redis_url):
    settings = fast_settings(redis_url)
    a_server, a_task, a_http = await serve(settings)
    b_server, b_task, b_http = await serve(settings)
    bus = Bus(settings)
    try:
        ws_a, ready = await hello(ws_url(a_http))
        sid = ready["session_id"]
        await ws_a.send(np.zeros(320, np.int16).tobytes())
        # the client moves to B; then A notices its socket die (the client's old side)
        ws_b, ready_b = await hello(ws_url(b_http), session_id=sid)
        assert ready_b["session_id"] == sid
        await ws_a.close()
        # a second client on A with its own session: A ending that one must still work
        ws_a2, ready_a2 = await hello(ws_url(a_http))
        await asyncio.sleep(2 * LEASE_S)
        assert await ends(bus.redis, sid) == 0, "A ended a session that B owns"
        owner = await bus.redis.hget(keys.session_gateway(sid), "gw")
        assert owner and owner != b""
        # B still carries the session both ways
        await ws_b.send(np.full(320, 7, np.int16).tobytes())
        await bus.emit(ReplyText(sid=sid, turn=0, seq=0, text="still here", final=True))
        got = await until(ws_b, is_type("reply_text"))
        assert got[-1]["text"] == "still here"
        audio = [decode(f[FIELD]) for _, f in await bus.redis.xrange(keys.audio(sid))]
        assert audio[-1].pcm == np.full(320, 7, np.int16).tobytes()
        await ws_a2.close()
        for _ in range(40):
            if await ends(bus.redis, ready_a2["session_id"]) == 1:
                break
            await asyncio.sleep(0.05)
        assert await ends(bus.redis, ready_a2["session_id"]) == 1
        await ws_b.close()
    finally:
        for server, task in ((a_server, a_task), (b_server, b_task)):
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        await bus.close()


async def test_stale_connection_let_go_when_resumed_elsewhere(redis_url):
    """A's connection is still open (a half-open socket) when the client resumes on B:
    A's failover tick sees B own the session and closes A's side, ending nothing."""
    settings = fast_settings(redis_url)
    a_server, a_task, a_http = await serve(settings)
    b_server, b_task, b_http = await serve(settings)
    bus = Bus(settings)
    try:
        ws_a, ready = await hello(ws_url(a_http))
        sid = ready["session_id"]
        ws_b, _ = await hello(ws_url(b_http), session_id=sid)
        _, code = await closed_with(ws_a, timeout=5 * LEASE_S)
        assert code == 1000
        await asyncio.sleep(LEASE_S)
        assert await ends(bus.redis, sid) == 0
        await ws_b.close()
    finally:
        for server, task in ((a_server, a_task), (b_server, b_task)):
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        await bus.close()


async def test_killed_gateway_sessions_released_unless_resumed(redis_url, workers, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("S2S_GATEWAY_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("S2S_GATEWAY_GRACE_S", str(GRACE_S))
    settings = fast_settings(redis_url)
    redis = aioredis.from_url(redis_url)
    workers.start("tests.stages:CrashSessionStage")  # a VAD-like session owner, no model
    await asyncio.to_thread(workers.wait_ready, "vad")
    b_server, b_task, b_http = await serve(settings)
    try:
        with gateway_process(redis_url, tmp_path) as (a_http, a_proc):
            conns = []
            for _ in range(2):
                ws, ready = await hello(ws_url(a_http))
                await ws.send(b"\x01\x00" * 160)
                await until(ws, lambda m: isinstance(m, dict) and m.get("event") == "heard",
                            timeout=10)
                conns.append((ws, ready["session_id"]))
            assert (await redis.xpending(keys.SESSIONS, "vad"))["pending"] == 2
            os.kill(a_proc.pid, signal.SIGKILL)
            a_proc.wait()
            killed = time.monotonic()
            (_, gone), (_, kept) = conns
            # one client resumes on B within the grace time
            ws_b, _ = await hello(ws_url(b_http), session_id=kept)
            # the other's session is released: SessionEnd written by B, VAD owner lets go
            while (await redis.xpending(keys.SESSIONS, "vad"))["pending"] > 1:
                # (a bound, not a speed check: the lease + grace is ~3 s; a loaded CI box
                # may be slower; without the lease it took the session TTL, an hour)
                assert time.monotonic() - killed < 60, \
                    "the dead gateway's session was not released"
                await asyncio.sleep(0.1)
            assert await ends(redis, gone) == 1 and await ends(redis, kept) == 0
            # the resumed one still has its VAD owner
            await ws_b.send(b"\x02\x00" * 160)
            got = await until(ws_b, lambda m: isinstance(m, dict) and m.get("event") == "heard",
                              timeout=10)
            assert got[-1]["message"] == "320"
            await asyncio.sleep(LEASE_S + GRACE_S)
            assert (await redis.xpending(keys.SESSIONS, "vad"))["pending"] == 1
            assert await redis.zcard(keys.GATEWAYS) == 1  # the dead gateway was forgotten
            await ws_b.close()
    finally:
        b_server.should_exit = True
        await asyncio.wait_for(b_task, 10)
        await redis.aclose()


# --- Redis restarted under a live session (real models) -------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_redis_restart_next_utterance_answered(tmp_path):
    """With persistence off (the embedded default) and then with AOF on: Redis is killed
    and started again while a session is open; the next thing the user says is answered
    (turn counter restored by the gateway, VAD ownership kept or re-opened), heard once."""
    from s2s.launcher.redis_server import RedisServer
    from tests.conftest import Workers

    server = RedisServer().start()
    workers = Workers(server.url, tmp_path)
    try:
        for stage in ("vad", "stt", "llm", "tts"):
            workers.start(stage)
        with gateway_process(server.url, tmp_path) as (http, _):
            for stage in ("vad", "stt", "llm", "tts"):
                workers.wait_ready(stage, timeout=600)
            asyncio.run(_restart_scenario(ws_url(http), server))
    finally:
        workers.stop_all()
        server.stop()


async def _restart_scenario(url: str, server) -> None:
    import redis as sync_redis

    from s2s.bench.chaos import Speaker
    from s2s.bench.loadgen import synthesize

    question = synthesize(1)[0]
    speaker = Speaker(0, [url], reply_timeout_s=120)
    await speaker.start()
    try:
        first = await speaker.say(question, 0)
        assert first.completed, first
        turn = first.turn
        for mode in ("persistence off", "aof"):
            if mode == "aof":  # switch AOF on live (a rewrite makes the base file)
                client = sync_redis.Redis.from_url(server.url)
                client.config_set("appendonly", "yes")
                for _ in range(100):
                    info = client.info("persistence")
                    if info["aof_enabled"] and not info["aof_rewrite_in_progress"] and \
                            not info.get("aof_rewrite_scheduled"):
                        break
                    time.sleep(0.1)
                client.close()
                server.appendonly = True
                await asyncio.sleep(1.5)  # one fsync (everysec) after the last turn
            await asyncio.to_thread(server.restart, 0.5)
            await asyncio.sleep(1.0)
            after = await speaker.say(question, 0)
            assert after.completed, (mode, after)
            assert after.turn > turn and after.transcript.strip(), (mode, after)
            assert after.duplicates == 0 and after.gaps == 0, (mode, after)
            turn = after.turn
    finally:
        await speaker.stop()


async def test_redis_restart_scripted(tmp_path):
    """Redis restarted empty under an open session, no models: the gateway restores the
    turn counter (the next turn is not dropped as stale) and, the session's VAD entry
    being lost, opens the session again once its audio goes unread."""
    from s2s.frames import SessionOpen, SpeechStarted
    from s2s.launcher.redis_server import RedisServer

    server = RedisServer().start()
    settings = config.load({"redis_url": server.url, "gateway_lease_s": LEASE_S,
                            "gateway_vad_stale_s": 1.0, **AUTH_SETTINGS}, environ={})
    srv, task, http = await serve(settings)
    bus = Bus(settings)
    try:
        ws, ready = await hello(ws_url(http))
        sid = ready["session_id"]
        assert await bus.advance_turn(sid) == 1  # what the VAD owner does
        await bus.emit(SpeechStarted(sid=sid, turn=1))
        await until(ws, is_type("speech_started"))
        await asyncio.to_thread(server.restart, 0.5)
        for _ in range(100):  # the gateway puts the counter back to the turn it has seen
            try:
                if await bus.current_turn(sid) == 1:
                    break
            except Exception:  # this client's pooled connection died with the old server
                pass
            await asyncio.sleep(0.05)
        assert await bus.current_turn(sid) == 1
        turn = await bus.advance_turn(sid)
        assert turn == 2
        await bus.emit(SpeechStarted(sid=sid, turn=turn),
                       ReplyText(sid=sid, turn=turn, seq=0, text="after", final=True))
        got = await until(ws, is_type("reply_text"), timeout=5)
        assert [m["type"] for m in got if isinstance(m, dict)][-2:] == ["speech_started",
                                                                        "reply_text"]
        # audio nobody reads (the session entry went with the old server): re-opened
        for _ in range(60):
            await ws.send(np.zeros(320, np.int16).tobytes())
            opens = [decode(f[FIELD]) for _, f in await bus.redis.xrange(keys.SESSIONS)]
            if opens:
                break
            await asyncio.sleep(0.05)
        assert len(opens) == 1 and isinstance(opens[0], SessionOpen) and opens[0].sid == sid
        assert opens[0].turn == 2
        await ws.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)
        await bus.close()
        server.stop()


# --- a resume replays the current turn without what the client already heard ------------------
def _reply(turn: int) -> list:
    from s2s.frames import ReplyAudio

    pieces = [(0, 0, False), (0, 1, True), (1, 0, True)]
    return [ReplyAudio(sid="s", turn=turn, seq=s, chunk=c, pcm=bytes([s, c]), sr=22050, last=last,
                       final=(s, c) == (1, 0)) for s, c, last in pieces]


def test_playback_marks_and_resume_skip():
    from s2s.bench.chaos import audio_faults
    from s2s.client import Tracker
    from s2s.gateway.playback import Playback

    frames = _reply(3)
    first = Playback(turn=3, marks=True)
    tracker = Tracker()
    for m in [m for f in frames[:2] for m in first.feed(f)]:  # the connection dies here
        tracker.handle(m)
    heard = tracker.heard()
    assert heard["turn"] == 3 and heard["audio_next"] == [1, 0] and heard["sample_rate"] == 22050
    # another gateway replays the whole turn from the output stream
    second = Playback(turn=3, marks=True)
    assert second.resume(json.loads(json.dumps(heard)))
    out = [m for f in frames for m in second.feed(f)]
    assert [m for m in out if isinstance(m, bytes)] == [bytes([1, 0])]
    assert "audio_start" not in [m.get("type") for m in out if isinstance(m, dict)]
    for m in out:
        tracker.handle(m)
    t = tracker.turns[3]
    assert t.done and t.audio == b"".join(f.pcm for f in frames)
    assert audio_faults(t.chunks) == (0, 0)
    # without the resume info the turn is heard again: the check sees the duplicates
    third = Playback(turn=3, marks=True)
    for m in [m for f in frames for m in third.feed(f)]:
        tracker.handle(m)
    assert audio_faults(tracker.turns[3].chunks) == (3, 0)


@pytest.mark.parametrize("heard", [None, "x", {"turn": 2}, {"turn": 3, "audio_next": [1]},
                                   {"turn": 3, "audio_next": [-1, 0]},
                                   {"turn": 3, "audio_next": [0, 0], "text_next": True},
                                   {"turn": 3, "audio_next": ["a", 0]}])
def test_playback_resume_ignores_bad_heard(heard):
    from s2s.gateway.playback import Playback

    p = Playback(turn=3)
    assert not p.resume(heard)
    assert len([m for f in _reply(3) for m in p.feed(f) if isinstance(m, bytes)]) == 3


async def test_redis_refusing_writes_busy_not_crash():
    """Redis up but refusing writes (OOM under noeviction): a new session gets `busy`
    (close 1013), an open one gets an error event and lives on; both are counted."""
    from prometheus_client import REGISTRY

    from s2s.launcher.redis_server import RedisServer

    def refused() -> float:
        return REGISTRY.get_sample_value("s2s_gateway_redis_refused_total", {"kind": "oom"}) or 0

    server = RedisServer().start()
    settings = config.load({"redis_url": server.url, **AUTH_SETTINGS}, environ={})
    srv, task, http = await serve(settings)
    bus = Bus(settings)
    try:
        ws, ready = await hello(ws_url(http))
        before = refused()
        await bus.redis.config_set("maxmemory-policy", "noeviction")
        await bus.redis.config_set("maxmemory", "1")
        await ws.send(np.zeros(320, np.int16).tobytes())
        got = await until(ws, is_type("error"))
        assert got[-1]["code"] == "busy" and "oom" in got[-1]["message"]
        ws2 = await websockets.connect(ws_url(http))
        await ws2.send(json.dumps({"type": "hello"}))
        got, code = await closed_with(ws2)
        assert got[0]["code"] == "busy" and code == 1013
        assert refused() >= before + 2
        await bus.redis.config_set("maxmemory", "0")
        await asyncio.sleep(2.5)  # the error events are rate limited (one per 2 s)
        await ws.send(np.full(320, 3, np.int16).tobytes())
        for _ in range(40):
            entries = await bus.redis.xrange(keys.audio(ready["session_id"]))
            if entries and decode(entries[-1][1][FIELD]).pcm == np.full(320, 3, np.int16).tobytes():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the open session did not carry audio again")
        await ws.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)
        await bus.close()
        server.stop()


async def test_output_trimmed_once_played(redis_url):
    """Moving to a newer turn, the gateway drops the older turns' output entries; the
    current turn stays whole (a resume replays it)."""
    from s2s.frames import ReplyAudio, SpeechStarted

    settings = fast_settings(redis_url)
    srv, task, http = await serve(settings)
    bus = Bus(settings)
    try:
        ws, ready = await hello(ws_url(http))
        sid = ready["session_id"]
        await bus.emit(SpeechStarted(sid=sid, turn=1),
                       ReplyAudio(sid=sid, turn=1, seq=0, pcm=b"\x01\x00", sr=22050, last=True,
                                  final=True))
        await until(ws, is_type("reply_done"))
        assert await bus.redis.xlen(keys.out(sid)) == 2
        await bus.emit(SpeechStarted(sid=sid, turn=2),
                       ReplyText(sid=sid, turn=2, seq=0, text="two"))
        await until(ws, is_type("reply_text"))
        for _ in range(40):
            if await bus.redis.xlen(keys.out(sid)) == 2:
                break
            await asyncio.sleep(0.05)
        left = [decode(f[FIELD]) for _, f in await bus.redis.xrange(keys.out(sid))]
        assert [(type(f).__name__, f.turn) for f in left] == [("SpeechStarted", 2),
                                                               ("ReplyText", 2)]
        await ws.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)
        await bus.close()


async def test_talk_resumes_on_the_next_gateway(redis_url):
    """s2s.client.talk() given two gateways: the first goes away mid-session, the talk goes
    on on the second with the same session id."""
    from s2s.client import talk

    settings = fast_settings(redis_url)
    a_server, a_task, a_http = await serve(settings)
    b_server, b_task, b_http = await serve(settings)
    bus = Bus(settings)
    try:
        async def stop_a():
            await asyncio.sleep(1.0)
            a_server.should_exit = True
        stopper = asyncio.create_task(stop_a())
        result = await talk([ws_url(a_http), ws_url(b_http)], np.zeros(16000 * 3, np.int16),
                            tail_silence_s=0.5, reply_timeout_s=5)
        await stopper
        assert result.resumes == 1 and result.session_id
        # A's shutdown closed the socket.  If the client was on B before A cleaned up, A
        # (no longer the owner) ended nothing: one SessionEnd, B's, at the bye; if A was
        # first, it ended the session and B opened it again: audio goes on after it
        for _ in range(60):
            audio = [decode(f[FIELD]) for _, f in
                     await bus.redis.xrange(keys.audio(result.session_id))]
            kinds = [type(f).__name__ for f in audio]
            if kinds and kinds[-1] == "SessionEnd":  # B's, at the bye
                break
            await asyncio.sleep(0.05)
        assert kinds[-1] == "SessionEnd", kinds
        if kinds.count("SessionEnd") > 1:
            assert kinds.count("SessionEnd") == 2 and \
                "Audio" in kinds[kinds.index("SessionEnd"):-1], kinds
        assert kinds.count("Audio") > 100  # 3 s in 20 ms messages, minus the switch
    finally:
        for server, task in ((a_server, a_task), (b_server, b_task)):
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        await bus.close()


async def test_redis_restart_keeps_a_surviving_vad_owner(tmp_path):
    """Redis restarted empty while a VAD owner reads the session: that owner goes on
    reading the new audio, so the gateway must not open the session a second time (two
    owners would each open turns)."""
    from s2s.launcher.redis_server import RedisServer
    from tests.conftest import Workers

    server = RedisServer().start()
    workers = Workers(server.url, tmp_path)
    settings = config.load({"redis_url": server.url, "gateway_lease_s": LEASE_S,
                            "gateway_vad_stale_s": 1.0, **AUTH_SETTINGS}, environ={})
    srv = None
    try:
        workers.start("tests.stages:CrashSessionStage")
        await asyncio.to_thread(workers.wait_ready, "vad")
        srv, task, http = await serve(settings)
        ws, ready = await hello(ws_url(http))
        heard = lambda m: isinstance(m, dict) and m.get("event") == "heard"  # noqa: E731
        await ws.send(b"\x01\x00" * 160)
        await until(ws, heard, timeout=10)
        for _ in range(10):  # the gateway's audio probes are in flight at the restart
            await ws.send(b"\x01\x00" * 160)
            await asyncio.sleep(0.1)
        await asyncio.to_thread(server.restart, 0.3)
        deadline = time.monotonic() + 4 * settings.gateway_vad_stale_s
        while time.monotonic() < deadline:  # mic audio goes on; the owner keeps hearing it
            await ws.send(b"\x02\x00" * 160)
            await asyncio.sleep(0.05)
        got = await until(ws, lambda m: heard(m) and m["message"] == "320", timeout=10)
        assert got
        client = aioredis.from_url(server.url)
        assert await client.xlen(keys.SESSIONS) == 0, "the session was opened a second time"
        await client.aclose()
        log = workers.log(workers.procs[0])
        assert log.count("owning session") == 1, log
        await ws.close()
    finally:
        if srv is not None:
            srv.should_exit = True
            await asyncio.wait_for(task, 10)
        workers.stop_all()
        server.stop()


# --- mic audio that arrives while Redis is away is kept and delivered in order -------------
async def test_audio_sent_during_a_redis_outage_is_delivered_whole_and_in_order(tmp_path):
    """Redis (AOF on) killed under an open session for 2 s while the client streams its
    microphone in 20 ms messages, each numbered by its samples: once Redis is back, the
    session's audio stream holds every message sent, before, during and after the outage,
    once each and in order (before this, what came during the outage was lost and the
    utterance reached the STT with a hole)."""
    from s2s.launcher.redis_server import RedisServer

    server = RedisServer(appendonly=True).start()
    settings = config.load({"redis_url": server.url, "gateway_lease_s": LEASE_S,
                            **AUTH_SETTINGS}, environ={})
    srv, task, http = await serve(settings)
    sent: list[int] = []
    try:
        ws, ready = await hello(ws_url(http))
        sid = ready["session_id"]

        async def stream(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                n = len(sent)
                await ws.send(np.full(320, n, np.int16).tobytes())  # 20 ms at 16 kHz
                sent.append(n)
                await asyncio.sleep(0.02)

        await stream(0.5)
        await asyncio.sleep(1.2)  # the AOF (fsync every second) has what came before
        server.kill()
        await stream(2.0)         # Redis away: the gateway holds this
        errors = [m for m in await received(ws, 0.3) if m.get("type") == "error"]
        await asyncio.to_thread(server.start)
        await stream(1.0)
        r = aioredis.Redis.from_url(server.url)
        want = np.repeat(np.array(sent, np.int16), 320)
        for _ in range(100):
            got = np.concatenate([np.frombuffer(decode(f[FIELD]).pcm, np.int16) for _, f in
                                  await r.xrange(keys.audio(sid))] or [np.zeros(0)])
            if len(got) >= len(want):
                break
            await asyncio.sleep(0.1)
        await r.aclose()
        assert np.array_equal(got, want), (len(got), len(want))
        assert any("held" in e["message"] for e in errors), errors
        await ws.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)
        server.stop()


async def received(ws, seconds: float) -> list[dict]:
    """The JSON messages that arrive within ``seconds``."""
    got = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str):
                    got.append(json.loads(msg))
    return got


def test_held_audio_is_bounded_in_bytes_and_time():
    from s2s.gateway.held_audio import HeldAudio

    held = HeldAudio(max_s=1.0, sample_rate=16000)
    for n in range(75):  # 1.5 s of 20 ms pieces: the oldest 0.5 s go
        dropped = held.hold(np.full(320, n, np.int16).tobytes(), wall=float(n))
    assert dropped == pytest.approx(0.02) and held.size == 32000
    frames = held.frames()
    assert [len(pcm) for _, pcm in frames] == [16000, 16000]  # merged into 0.5 s frames
    assert frames[0][0] == 25.0 and np.frombuffer(frames[0][1], np.int16)[0] == 25
    held.delivered(len(frames[0][1]))
    assert held.size == 16000 and held.frames()[0][0] == 50.0
    held.max_age_s = 0.0  # held longer than its time bound: all of it goes
    assert held.expire() == pytest.approx(0.5) and not held
    assert HeldAudio(max_s=0, sample_rate=16000).hold(b"\0" * 640, 0.0) == pytest.approx(0.02)
