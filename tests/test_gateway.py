"""Gateway against a real Redis: protocol, limits, malformed input, output ordering
(frames XADDed by the test to s2s:out:{sid}), barge-in, resume, and s2s.client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import uvicorn
import websockets

from s2s import config, keys, metrics
from s2s.bus import FIELD, Bus
from s2s.client import Connection, talk
from s2s.frames import (Audio, Notice, ReplyAudio, ReplyText, SessionEnd, SessionOpen,
                        SpeechStarted, Transcript, decode)

from s2s.gateway.server import uvicorn_config
from tests.conftest import AUTH_SETTINGS


async def serve(settings):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(settings, log_level="warning"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture
async def gw(redis_url):
    settings = config.load({"redis_url": redis_url, "max_message_bytes": 16000,
                            "max_audio_rate": 4.0, "max_sessions": 5, "closed_ttl_s": 60,
                            **AUTH_SETTINGS}, environ={})
    async with running_gateway(settings) as gateway:
        yield gateway


@contextlib.asynccontextmanager
async def running_gateway(settings):
    """An in-process gateway on a free port and a Bus beside it (``http``, ``ws``, ``bus``,
    ``redis``, ``settings``); stopped on exit."""
    server, task, base = await serve(settings)
    bus = Bus(settings)
    try:
        yield type("GW", (), {"http": base, "ws": base.replace("http", "ws") + "/ws",
                              "bus": bus, "redis": bus.redis, "settings": settings})
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await bus.close()


async def hello(gw, **fields):
    ws = await websockets.connect(gw.ws, compression=None)
    await ws.send(json.dumps({"type": "hello", **fields}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready


async def until(ws, pred, timeout=5.0) -> list:
    """Messages received until pred(message) is true (inclusive)."""
    got = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            msg = json.loads(msg) if isinstance(msg, str) else msg
            got.append(msg)
            if pred(msg):
                return got


async def closed_with(ws, timeout=5.0) -> tuple[list, int | None]:
    """Messages until the server closes; and the close code."""
    got = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await ws.recv()
                got.append(json.loads(msg) if isinstance(msg, str) else msg)
    except websockets.ConnectionClosed as e:
        return got, e.rcvd.code if e.rcvd else None
    return got, None


async def stream_frames(redis, stream: str) -> list:
    return [decode(f[FIELD]) for _, f in await redis.xrange(stream)]


def is_type(kind):
    return lambda m: isinstance(m, dict) and m.get("type") == kind


def pcm(n_samples: int, value: int = 1000) -> bytes:
    return np.full(n_samples, value, np.int16).tobytes()


# --- HTTP ------------------------------------------------------------------------------
async def test_http_routes(gw):
    await gw.bus.heartbeat("stt", "w1", "http://127.0.0.1:1")
    async with httpx.AsyncClient(base_url=gw.http) as client:
        r = await client.get("/healthz")
        assert r.status_code == 200
        body = r.json()
        assert body["ok"] is True and body["redis"] is True
        assert body["workers"]["stt"][0]["id"] == "w1"
        assert "vad" in body["missing"]
        r = await client.get("/metrics")
        assert r.status_code == 200 and "s2s_active_sessions" in r.text
        assert "s2s_voice_to_voice_seconds" in r.text
        r = await client.get("/")
        assert r.status_code == 200 and "<" in r.text
        assert (await client.get("/static/nope.js")).status_code == 404


async def test_healthz_503_without_redis():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # bound, never listening
    settings = config.load({"redis_url": dead, **AUTH_SETTINGS}, environ={})
    server, task, base = await serve(settings)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.get("/healthz")
        assert r.status_code == 503 and r.json()["redis"] is False
        ws = await websockets.connect(base.replace("http", "ws") + "/ws")
        await ws.send(json.dumps({"type": "hello"}))
        got, code = await closed_with(ws)
        assert got[0]["code"] == "unavailable" and code == 1013
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        s.close()


# --- session life cycle ------------------------------------------------------------------
async def test_hello_audio_bye(gw):
    ws, ready = await hello(gw, sample_rate=8000, output_sample_rate=16000)
    sid = ready["session_id"]
    assert (ready["sample_rate"], ready["output_sample_rate"]) == (8000, 16000)
    opened = await stream_frames(gw.redis, keys.SESSIONS)
    assert opened == [SessionOpen(sid=sid, in_sr=8000, out_sr=16000)]
    for _ in range(3):
        await ws.send(pcm(160))
    await ws.send(json.dumps({"type": "ping", "t": 5}))
    assert (await until(ws, is_type("pong")))[-1]["t"] == 5
    frames = await stream_frames(gw.redis, keys.audio(sid))
    assert [type(f) for f in frames] == [Audio] * 3
    assert frames[0].sr == 8000 and frames[0].pcm == pcm(160) and "recv" in frames[0].marks
    await ws.send(json.dumps({"type": "bye"}))
    _, code = await closed_with(ws)
    assert code == 1000
    for _ in range(50):
        frames = await stream_frames(gw.redis, keys.audio(sid))
        if isinstance(frames[-1], SessionEnd):
            break
        await asyncio.sleep(0.05)
    assert isinstance(frames[-1], SessionEnd)
    assert 0 < await gw.redis.ttl(keys.audio(sid)) <= 60


async def test_defaults(gw):
    ws, ready = await hello(gw)
    assert (ready["sample_rate"], ready["output_sample_rate"]) == (16000, 22050)
    assert len(ready["session_id"]) >= 16
    await ws.close()


# --- output stream: ordering, duplicates, stale turns ------------------------------------------
async def test_reply_reordered_and_deduplicated(gw):
    ws, ready = await hello(gw)
    sid = ready["session_id"]
    await gw.redis.xadd(keys.out(sid), {FIELD: b"\x00garbage"})   # skipped, counted
    await gw.redis.xadd(keys.out(sid), {b"other": b"x"})           # no frame field
    marks = {"speech_end": 1.0}
    a = lambda seq, chunk, last=False, final=False, turn=1, sr=22050: ReplyAudio(  # noqa: E731
        sid=sid, turn=turn, seq=seq, chunk=chunk, last=last, final=final, sr=sr, marks=marks,
        pcm=bytes([seq * 16 + chunk]) * 4)
    frames = [
        SpeechStarted(sid=sid, turn=1, at_s=0.5),
        Transcript(sid=sid, turn=1, text="hi there", end_s=1.5, marks=marks),
        Transcript(sid=sid, turn=1, text="hi there", end_s=1.5, marks=marks),  # duplicate
        ReplyText(sid=sid, turn=1, seq=1, text="Second.", final=True),
        ReplyText(sid=sid, turn=1, seq=0, text="First."),
        ReplyText(sid=sid, turn=1, seq=0, text="First."),                     # duplicate
        a(2, 0, last=True, final=True),
        a(1, 0), a(0, 1, last=True), a(0, 0), a(0, 0), a(1, 1, last=True),
        ReplyAudio(sid=sid, turn=0, seq=0, pcm=b"\x01\x01", sr=22050),       # stale turn
        Notice(sid=sid, turn=1, event="error", message="llm failed: boom"),
    ]
    await gw.bus.emit(*frames)
    got = await until(ws, is_type("error"))
    events = [m for m in got if isinstance(m, dict)]
    assert [e["type"] for e in events] == ["speech_started", "transcript", "reply_text",
                                           "reply_text", "audio_start", "reply_done", "error"]
    assert events[1]["text"] == "hi there" and events[1]["end_s"] == 1.5
    assert [e["text"] for e in events[2:4]] == ["First.", "Second."] and events[3]["final"]
    assert events[4]["sample_rate"] == 22050 and events[4]["voice_to_voice_ms"] > 0
    audio = [m for m in got if isinstance(m, bytes)]
    assert audio == [bytes([v]) * 4 for v in (0x00, 0x01, 0x10, 0x11, 0x20)]
    assert got.index(audio[0]) > got.index(events[4]) and got.index(events[5]) > \
        got.index(audio[-1])
    # a stage's failure reaches the client as a code and a correlation id, never its text
    assert events[6]["code"] == "stage_error" and "boom" not in events[6]["message"]
    assert events[6]["correlation_id"] in events[6]["message"] and events[6]["turn"] == 1
    await ws.close()


async def test_barge_in_interrupts_and_drops_old_turn(gw):
    ws, ready = await hello(gw)
    sid = ready["session_id"]
    before = metrics.INTERRUPTS._value.get()
    await gw.bus.emit(SpeechStarted(sid=sid, turn=1), Transcript(sid=sid, turn=1, text="one"),
                      ReplyText(sid=sid, turn=1, seq=0, text="A long answer."),
                      ReplyAudio(sid=sid, turn=1, seq=0, chunk=0, pcm=b"\x01\x00" * 100,
                                 sr=22050))
    await until(ws, lambda m: isinstance(m, bytes))
    await gw.bus.emit(SpeechStarted(sid=sid, turn=2, at_s=3.0),
                      ReplyAudio(sid=sid, turn=1, seq=0, chunk=1, pcm=b"\x02\x00" * 100,
                                 sr=22050, last=True, final=True),
                      Transcript(sid=sid, turn=2, text="two"),
                      ReplyText(sid=sid, turn=2, seq=0, text="Sure.", final=True),
                      ReplyAudio(sid=sid, turn=2, seq=0, pcm=b"\x03\x00" * 100, sr=22050,
                                 last=True, final=True))
    got = await until(ws, is_type("reply_done"))
    kinds = [m["type"] if isinstance(m, dict) else "audio" for m in got]
    assert kinds == ["interrupt", "speech_started", "transcript", "reply_text", "audio_start",
                     "audio", "reply_done"]
    assert got[0]["turn"] == 2 and got[-1]["turn"] == 2 and got[5] == b"\x03\x00" * 100
    assert metrics.INTERRUPTS._value.get() == before + 1
    # speech right after reply_done: the reply still plays on the client -> barge-in
    await gw.bus.emit(SpeechStarted(sid=sid, turn=3), Transcript(sid=sid, turn=3, text="x"),
                      ReplyText(sid=sid, turn=3, seq=0, text="Ok.", final=True),
                      ReplyAudio(sid=sid, turn=3, seq=0, pcm=b"\x03\x00" * 100, sr=22050,
                                 last=True, final=True))
    await until(ws, is_type("reply_done"))
    await gw.bus.emit(SpeechStarted(sid=sid, turn=4))
    got = await until(ws, is_type("speech_started"))
    assert [m["type"] for m in got] == ["interrupt", "speech_started"]
    # once it has played out (100 samples + the playback margin), a new turn is no barge-in
    await asyncio.sleep(0.7)
    await gw.bus.emit(SpeechStarted(sid=sid, turn=5))
    got = await until(ws, is_type("speech_started"))
    assert [m["type"] for m in got] == ["speech_started"]


async def test_resume_and_replace(gw):
    ws1, ready = await hello(gw)
    sid = ready["session_id"]
    await ws1.send(pcm(320))
    await asyncio.sleep(0.2)
    # a second connection with the same id replaces the first, no SessionEnd, no 2nd open
    ws2, ready2 = await hello(gw, session_id=sid)
    assert ready2["session_id"] == sid
    _, code = await closed_with(ws1)
    assert code == 1000
    assert len(await stream_frames(gw.redis, keys.SESSIONS)) == 1
    assert not any(isinstance(f, SessionEnd)
                   for f in await stream_frames(gw.redis, keys.audio(sid)))
    await gw.bus.emit(Transcript(sid=sid, turn=0, text="old"))
    assert await gw.bus.advance_turn(sid) == 1           # what VAD does
    await gw.bus.emit(SpeechStarted(sid=sid, turn=1),
                      ReplyAudio(sid=sid, turn=1, seq=0, pcm=b"\x05\x00", sr=22050))
    assert (await until(ws2, lambda m: isinstance(m, bytes)))[-1] == b"\x05\x00"
    await ws2.close()
    # closed (SessionEnd written); a resume waits for the VAD owner to pass it, then reopens
    for _ in range(50):
        last = await gw.redis.xrevrange(keys.audio(sid), count=1)
        if isinstance(decode(last[0][1][FIELD]), SessionEnd):
            break
        await asyncio.sleep(0.05)
    await gw.redis.set(keys.vad_pos(sid), last[0][0])   # what the VAD owner does
    ws3, ready3 = await hello(gw, session_id=sid)
    assert ready3["session_id"] == sid and ready3["turn"] == 1
    # the current turn is replayed from its start (a reply in flight), older turns are not
    got = await until(ws3, lambda m: isinstance(m, bytes))
    assert [m["type"] for m in got[:-1]] == ["speech_started", "audio_start"]
    await gw.bus.emit(ReplyAudio(sid=sid, turn=1, seq=0, chunk=1, pcm=b"\x06\x00", sr=22050,
                                 last=True, final=True))
    got = await until(ws3, is_type("reply_done"))
    assert got[0] == b"\x06\x00"
    opens = await stream_frames(gw.redis, keys.SESSIONS)
    assert len(opens) == 2 and opens[1].sid == sid and opens[1].turn == 1
    await ws3.close()


# --- limits and malformed input -----------------------------------------------------------------
@pytest.mark.parametrize("first, code, close", [
    (b"\x00\x01", "audio_before_hello", 1003),
    ("{not json", "bad_json", 1003),
    ("[1, 2]", "bad_message", 1008),
    ('{"type": 5}', "bad_message", 1008),
    ('{"type": "bye"}', "bad_hello", 1008),
    ('{"type": "hello", "sample_rate": "16000"}', "bad_hello", 1008),
    ('{"type": "hello", "sample_rate": 12345}', "bad_hello", 1008),
    ('{"type": "hello", "sample_rate": true}', "bad_hello", 1008),
    ('{"type": "hello", "output_sample_rate": 1e9}', "bad_hello", 1008),
    ('{"type": "hello", "session_id": "../../etc"}', "bad_hello", 1008),
    ('{"type": "hello", "session_id": ["x"]}', "bad_hello", 1008),
])
async def test_bad_first_message(gw, first, code, close):
    ws = await websockets.connect(gw.ws)
    await ws.send(first)
    got, close_code = await closed_with(ws)
    assert got == [{"type": "error", "code": code, "message": got[0]["message"]}]
    assert close_code == close


async def test_malformed_messages_never_hurt_other_sessions(gw):
    good, ready = await hello(gw)
    good_sid = ready["session_id"]
    rejected = metrics.REJECTED.labels("message_too_large")._value.get()

    bad, _ = await hello(gw)
    await bad.send(b"\x00" * 20000)                        # over max_message_bytes: refused
    await bad.send(json.dumps({"type": "dance"}))          # unknown type: refused
    await bad.send(json.dumps({"type": "hello"}))          # second hello: refused
    got = await until(bad, lambda m: m.get("code") == "already_open")
    assert [m["code"] for m in got] == ["message_too_large", "unknown_type", "already_open"]
    assert metrics.REJECTED.labels("message_too_large")._value.get() == rejected + 1
    await bad.send(b"\x00" * 3)                            # odd byte count: fatal
    got, code = await closed_with(bad)
    assert got[-1]["code"] == "odd_length" and code == 1003

    abuser, _ = await hello(gw)
    for _ in range(10):
        await abuser.send(b"\x00" * 20000)
    got, code = await closed_with(abuser)
    assert got[-1]["code"] == "abuse" and code == 1008

    flooder, _ = await hello(gw)       # 4x real time allowed, averaged over 2 s: 8 s burst
    for _ in range(30):
        await flooder.send(pcm(8000))                      # 0.5 s each, all at once
    got = await until(flooder, is_type("error"))
    assert got[-1]["code"] == "rate_limited"
    await flooder.close()

    # the good session still works
    await good.send(pcm(320))
    await gw.bus.emit(SpeechStarted(sid=good_sid, turn=1))
    assert (await until(good, is_type("speech_started")))[-1]["turn"] == 1
    await good.close()


async def test_hello_timeout(gw, monkeypatch):
    from s2s.gateway import session

    monkeypatch.setattr(session, "HELLO_TIMEOUT_S", 0.3)
    ws = await websockets.connect(gw.ws)
    got, code = await closed_with(ws)
    assert got[0]["code"] == "hello_timeout" and code == 1008


async def test_max_sessions(gw):
    conns = [(await hello(gw))[0] for _ in range(5)]
    ws = await websockets.connect(gw.ws)
    await ws.send(json.dumps({"type": "hello"}))
    got, code = await closed_with(ws)
    assert got[0]["code"] == "too_many_sessions" and code == 1013
    await conns[0].close()
    await asyncio.sleep(0.2)
    ws, _ = await hello(gw)  # a place is free again
    for c in conns[1:] + [ws]:
        await c.close()


# --- s2s.client against the gateway and a scripted pipeline --------------------------------------
async def fake_pipeline(gw, reply_pcm: bytes, speech_end_s: float):
    """Plays VAD/STT/LLM/TTS: once the session's audio passed speech_end_s, answers."""
    redis: aioredis.Redis = gw.redis
    while not (opens := await stream_frames(redis, keys.SESSIONS)):
        await asyncio.sleep(0.02)
    sid = opens[0].sid
    last, pos = b"0-0", 0.0
    while pos < speech_end_s + 0.3:  # VAD needs some silence to decide
        res = await redis.xread({keys.audio(sid): last}, block=1000)
        for _, entries in res or []:
            for eid, f in entries:
                last = eid
                frame = decode(f[FIELD])
                if isinstance(frame, Audio):
                    pos += frame.seconds
    marks = {"speech_end": time.time() - 0.3 / 4}
    await gw.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1),
                      Transcript(sid=sid, turn=1, text="Hello there.", start_s=0.1,
                                 end_s=speech_end_s, marks=marks),
                      ReplyText(sid=sid, turn=1, seq=0, text="Hi!", marks=marks),
                      ReplyText(sid=sid, turn=1, seq=1, text="How are you?", final=True),
                      ReplyAudio(sid=sid, turn=1, seq=1, pcm=reply_pcm[100:], sr=16000,
                                 last=True, final=True, marks=marks),
                      ReplyAudio(sid=sid, turn=1, seq=0, pcm=reply_pcm[:100], sr=16000,
                                 last=True, marks=marks))


async def test_client_talk(gw):
    reply_pcm = np.arange(1000, dtype=np.int16).tobytes()
    speech = np.full(16000, 500, np.int16)  # 1 s "speech"
    pipeline = asyncio.create_task(fake_pipeline(gw, reply_pcm, speech_end_s=1.0))
    events = []
    result = await talk(gw.ws, speech, 16000, out_rate=16000, realtime=False, speed=4.0,
                        tail_silence_s=0.5, reply_timeout_s=10, on_event=events.append)
    await pipeline
    assert not result.timed_out and not result.errors
    assert result.transcript == "Hello there."
    assert result.reply == "Hi! How are you?"
    assert result.audio == reply_pcm and result.sample_rate == 16000
    [turn] = result.turns
    assert turn.done and not turn.interrupted and turn.end_s == 1.0
    # measured from when 1.0 s of audio had been sent (4x speed): about 0.3 s / 4 later
    assert 0 < result.voice_to_voice_ms < 2000
    assert turn.first_transcript_ms is not None and turn.first_reply_text_ms is not None
    assert turn.server_voice_to_voice_ms > 0
    assert json.dumps(result.to_dict())
    assert any(isinstance(e, bytes) for e in events)


async def test_connection_refused_session(gw):
    conns = [(await hello(gw))[0] for _ in range(5)]
    with pytest.raises(Exception, match="too_many_sessions"):
        await Connection.open(gw.ws)
    for c in conns:
        await c.close()


async def test_s2s_talk_command(gw, tmp_path, capsys):
    import argparse

    import soundfile as sf

    from s2s.client import talk_command as talk_cmd

    speech = tmp_path / "speech.flac"
    sf.write(speech, np.full(44100, 0.1, np.float32), 44100)  # 1 s at 44.1 kHz, resampled
    reply_pcm = np.arange(1000, dtype=np.int16).tobytes()
    pipeline = asyncio.create_task(fake_pipeline(gw, reply_pcm, speech_end_s=1.0))
    parser = argparse.ArgumentParser()
    talk_cmd.add_arguments(parser)
    args = parser.parse_args([str(speech), "--url", gw.ws, "--json", "--fast", "--tail", "0.5",
                              "--out", str(tmp_path / "reply.wav"), "--out-rate", "16000"])
    assert await asyncio.to_thread(talk_cmd.main, args) == 0
    await pipeline
    out = json.loads(capsys.readouterr().out)
    assert out["transcript"] == "Hello there." and out["reply"] == "Hi! How are you?"
    assert out["voice_to_voice_ms"] > 0
    audio, sr = sf.read(tmp_path / "reply.wav", dtype="int16")
    assert sr == 16000 and audio.tobytes() == reply_pcm
    args = parser.parse_args([str(tmp_path / "missing.wav")])
    assert talk_cmd.main(args) == 2


async def test_native_text_configure_truncate_and_their_refusals(gw):
    """The native messages behind the Realtime endpoint: typed text becomes a turn's
    Transcript, configure sets the session's prefs and VAD config, truncate records what
    was heard; a malformed one is refused with its code and the session goes on."""
    from s2s.frames import SessionConfig

    ws, ready = await hello(gw)
    sid = ready["session_id"]
    bad = [({"type": "text", "text": "  "}, "bad_text"),
           ({"type": "configure", "vad": {"threshold": 2}}, "bad_configure"),
           ({"type": "configure", "vad": {"nope": 1}}, "bad_configure"),
           ({"type": "configure", "instructions": 7}, "bad_configure"),
           ({"type": "truncate", "turn": 1, "text": "x"}, "bad_truncate"),  # no such turn yet
           ({"type": "truncate", "turn": "1", "text": "x"}, "bad_truncate")]
    for message, code in bad:
        await ws.send(json.dumps(message))
        got = await until(ws, is_type("error"))
        assert got[-1]["code"] == code, (message, got)
    await ws.send(json.dumps({"type": "configure", "instructions": "Be brief.",
                              "vad": {"min_silence_ms": 800}}))
    await ws.send(json.dumps({"type": "text", "text": "Hello there."}))
    got = await until(ws, is_type("transcript"))
    assert got[-1]["text"] == "Hello there." and got[-1]["turn"] == 1
    [asked] = await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"])
    assert asked.text == "Hello there." and asked.turn == 1
    assert [f.vad for f in await stream_frames(gw.redis, keys.audio(sid))
            if isinstance(f, SessionConfig)] == [{"min_silence_ms": 800.0}]
    await ws.send(json.dumps({"type": "truncate", "turn": 1, "text": "Hi."}))
    await ws.send(json.dumps({"type": "ping", "t": 1}))
    await until(ws, is_type("pong"))
    assert await gw.bus.prefs(sid) == {"instructions": "Be brief.", "heard:1": "Hi."}
    await ws.close()
