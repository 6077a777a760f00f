"""Hostile and broken clients against a real gateway on a real Redis (issue 22): every
queue of a connection is bounded, and a client that overflows one (sends faster than it
is served, or never reads) is closed with its own error, counted, while other sessions
go on; typed turns and cancels are rate limited per session; a worker's exception text
never reaches a client; connections that vanish mid-hello or mid-garbage do not lock
their own key out; and the gateway's and client's modules import without circles."""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import websockets

from s2s import config, keys, metrics
from s2s.frames import Audio, ReplyAudio, SessionEnd, SpeechStarted, Transcript
from s2s.gateway import g711, realtime, session
from s2s.gateway.output import STAGE_ERRORS
from s2s.stage import Stage
from tests.conftest import AUTH_SETTINGS, TEST_API_KEY
from tests.test_gateway import closed_with, hello, is_type, pcm, running_gateway, \
    stream_frames, until

ROOT = Path(__file__).resolve().parents[1]
PRINCIPAL = "key:tests"


def rejected(code: str) -> float:
    return metrics.REJECTED.labels(code)._value.get()


def gateway_settings(redis_url: str, **overrides):
    return config.load({"redis_url": redis_url, "max_audio_rate": 4.0, "max_sessions": 50,
                        "max_typed_rate": 0.5, **AUTH_SETTINGS, **overrides}, environ={})


@pytest.fixture
async def gw(redis_url):
    async with running_gateway(gateway_settings(redis_url)) as gateway:
        gateway.rt = gateway.http.replace("http", "ws") + "/v1/realtime"
        yield gateway


async def realtime_session(gw) -> tuple:
    ws = await websockets.connect(gw.rt, compression=None, max_size=None)
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created", created
    return ws, created["session"]["id"].removeprefix("sess_")


async def realtime_events(ws, until_type: str, timeout: float = 10.0) -> list[dict]:
    got = []
    async with asyncio.timeout(timeout):
        while not got or got[-1]["type"] != until_type:
            got.append(json.loads(await ws.recv()))
    return got


def ulaw(seconds: float) -> str:
    """``seconds`` of a quiet tone as base64 audio/pcmu (8 kHz: the most audio per byte)."""
    t = np.arange(int(seconds * 8000)) / 8000
    tone = (800 * np.sin(2 * np.pi * 220 * t)).astype("<i2").tobytes()
    return base64.b64encode(g711.encode(tone, "ulaw")).decode()


async def use_pcmu(ws) -> None:
    await ws.send(json.dumps({"type": "session.update", "session": {"audio": {
        "input": {"format": {"type": "audio/pcmu"}}}}}))
    assert (await realtime_events(ws, "session.updated"))[-1]["type"] == "session.updated"


async def ended(gw, sid: str, timeout: float = 5.0) -> bool:
    """Whether the session was ended (its SessionEnd written) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(isinstance(f, SessionEnd) for f in await stream_frames(gw.redis, keys.audio(sid))):
            return True
        await asyncio.sleep(0.05)
    return False


# --- every audio path holds at most 120 s --------------------------------------------------------
async def test_audio_items_have_the_push_to_talk_cap(gw):
    """conversation.item.create with audio went around the 120 s cap of the push-to-talk
    buffer; it now shares it: 90 s fits, 35 s more does not (nothing of it is kept), 25 s
    does."""
    ws, _ = await realtime_session(gw)
    await use_pcmu(ws)

    async def item(seconds: float, eid: str) -> dict:
        await ws.send(json.dumps({"type": "conversation.item.create", "event_id": eid, "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": ulaw(seconds)}]}}))
        return json.loads(await asyncio.wait_for(ws.recv(), 10))

    assert (await item(90, "a"))["type"] == "conversation.item.added"
    assert (await realtime_events(ws, "conversation.item.done"))
    refused = await item(35, "b")
    assert refused["type"] == "error", refused
    assert refused["error"]["code"] == "buffer_too_large" and refused["error"]["event_id"] == "b"
    assert (await item(25, "c"))["type"] == "conversation.item.added"
    await ws.close()


async def test_native_audio_message_has_the_same_cap(redis_url):
    settings = gateway_settings(redis_url, max_message_bytes=4 << 20, max_audio_rate=100.0)
    async with running_gateway(settings) as gw:
        ws, ready = await hello(gw, sample_rate=8000)
        await ws.send(pcm(8000 * 121))                      # 121 s in one message
        error = (await until(ws, is_type("error")))[-1]
        assert error["code"] == "message_too_large" and "120-second" in error["message"]
        await ws.send(pcm(8000))                            # 1 s: fine
        await ws.send(json.dumps({"type": "ping", "t": 1}))
        await until(ws, is_type("pong"))
        audio = [f for f in await stream_frames(gw.redis, keys.audio(ready["session_id"]))
                 if isinstance(f, Audio)]
        assert [round(f.seconds) for f in audio] == [1]
        await ws.close()


async def test_audio_sent_faster_than_served_closes_that_connection_only(gw):
    """Server VAD: appended audio waits to be paced into the session (at most 125 s of
    it).  A client far ahead of real time is closed with input_overflow (1008); its
    session ends; another Realtime session on the same gateway goes on."""
    other, _ = await realtime_session(gw)
    ws, sid = await realtime_session(gw)
    await use_pcmu(ws)
    before = rejected("realtime_input_overflow")
    for _ in range(3):                                      # 150 s within ~0.1 s
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": ulaw(50)}))
    got, code = await closed_with(ws, timeout=10)
    errors = [m["error"] for m in got if m.get("type") == "error"]
    assert [e["code"] for e in errors] == ["input_overflow"] and code == 1008, got
    assert rejected("realtime_input_overflow") == before + 1
    assert await ended(gw, sid)
    await other.send(json.dumps({"type": "session.update", "session": {"instructions": "hi"}}))
    assert (await realtime_events(other, "session.updated"))[-1]["session"]["instructions"] == "hi"
    await other.close()


async def test_events_sent_faster_than_the_session_takes_them(gw):
    """The session is stuck (Redis refuses writes for a while: CLIENT PAUSE WRITE) and the
    client goes on sending: past 256 events waiting, it is closed with input_overflow;
    once Redis writes again, another session is served as before."""
    ws, sid = await realtime_session(gw)
    before = rejected("realtime_input_overflow")
    await gw.redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    try:
        for i in range(400):
            await ws.send(json.dumps({"type": "session.update",
                                      "session": {"instructions": f"be brief {i}"}}))
        got, code = await closed_with(ws, timeout=10)
    finally:
        await gw.redis.execute_command("CLIENT", "UNPAUSE")
    assert code == 1008 and [m["error"]["code"] for m in got if m["type"] == "error"] == \
        ["input_overflow"], got[-3:]
    assert rejected("realtime_input_overflow") == before + 1
    assert await ended(gw, sid)
    fresh, ready = await hello(gw)
    await fresh.send(json.dumps({"type": "text", "text": "still there?"}))
    await fresh.send(json.dumps({"type": "ping", "t": 2}))
    await until(fresh, is_type("pong"))
    llm = await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"])
    assert [f.text for f in llm if f.sid == ready["session_id"]] == ["still there?"]
    await fresh.close()


@pytest.mark.parametrize("protocol", ["native", "realtime"])
async def test_a_client_that_never_reads_is_given_up(gw, monkeypatch, protocol):
    """Reply audio for a client that reads nothing fills its socket; the gateway gives the
    connection up after SEND_TIMEOUT_S (counted as not_reading), ends the session and
    frees its slot, instead of holding them (and whoever sends to it) for ever."""
    monkeypatch.setattr(session, "SEND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(realtime, "SEND_TIMEOUT_S", 1.0)
    other, other_ready = await hello(gw)
    before = rejected("not_reading")
    url = gw.ws if protocol == "native" else gw.rt
    deaf = await websockets.connect(url, compression=None, max_queue=1, max_size=None)
    if protocol == "native":
        await deaf.send(json.dumps({"type": "hello", "output_sample_rate": 24000}))
        sid = json.loads(await deaf.recv())["session_id"]
    else:
        sid = json.loads(await deaf.recv())["session"]["id"].removeprefix("sess_")
    assert await gw.redis.zscore(keys.principal_sessions(PRINCIPAL), sid)
    await gw.bus.emit(SpeechStarted(sid=sid, turn=1), Transcript(sid=sid, turn=1, text="hi"))
    chunk = bytes(200_000)
    for n in range(60):                                     # 12 MB of reply audio
        await gw.bus.emit(ReplyAudio(sid=sid, turn=1, seq=0, chunk=n, pcm=chunk, sr=24000))
    assert await ended(gw, sid, timeout=20)
    assert rejected("not_reading") == before + 1
    assert await gw.redis.zscore(keys.principal_sessions(PRINCIPAL), sid) is None
    await other.send(json.dumps({"type": "ping", "t": 3}))   # the other session is served
    await until(other, is_type("pong"))
    await gw.bus.emit(SpeechStarted(sid=other_ready["session_id"], turn=1))
    await until(other, is_type("speech_started"))
    deaf.transport.abort()
    await other.close()


# --- typed turns and cancels are rate limited ------------------------------------------------
async def test_typed_messages_over_the_rate_are_refused_and_reach_no_stage(gw):
    """max_typed_rate 0.5/s: a burst of 5 passes, the rest is refused with rate_limited
    (counted), nothing of it is written to Redis; later the bucket has refilled."""
    ws, ready = await hello(gw)
    sid = ready["session_id"]
    before = rejected("rate_limited")
    for i in range(4):
        await ws.send(json.dumps({"type": "text", "text": f"question {i}"}))
    for _ in range(3):
        await ws.send(json.dumps({"type": "cancel"}))
    await ws.send(json.dumps({"type": "ping", "t": 4}))
    got = await until(ws, is_type("pong"))
    errors = [m for m in got if m.get("type") == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"] * 2, got
    assert all("cancel dropped" in e["message"] for e in errors)
    assert rejected("rate_limited") == before + 2
    llm = [f for f in await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"]) if f.sid == sid]
    assert [f.text for f in llm] == [f"question {i}" for i in range(4)]
    assert await gw.bus.current_turn(sid) == 5              # 4 texts and 1 cancel
    await asyncio.sleep(2.1)                                # one token back
    await ws.send(json.dumps({"type": "text", "text": "later"}))
    await ws.send(json.dumps({"type": "text", "text": "too soon"}))
    error = (await until(ws, is_type("error")))[-1]
    assert error["code"] == "rate_limited" and "text dropped" in error["message"]
    llm = [f for f in await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"]) if f.sid == sid]
    assert [f.text for f in llm][-1] == "later" and len(llm) == 5
    await ws.close()


async def test_realtime_typed_turns_and_cancels_share_the_limit(gw):
    """response.create with typed text over the rate is refused (with the client's
    event_id) and its items stay pending: a later response.create answers them."""
    ws, sid = await realtime_session(gw)

    async def typed(text: str) -> None:
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": text}]}}))
        await realtime_events(ws, "conversation.item.done")

    for i in range(5):
        await typed(f"turn {i}")
        await ws.send(json.dumps({"type": "response.create"}))
    await typed("over the limit")
    await ws.send(json.dumps({"type": "response.create", "event_id": "evt_over"}))
    error = (await realtime_events(ws, "error"))[-1]["error"]
    assert error["code"] == "rate_limited" and error["event_id"] == "evt_over"
    llm = [f.text for f in await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"])
           if f.sid == sid]
    assert llm == [f"turn {i}" for i in range(5)]
    await asyncio.sleep(2.1)
    await ws.send(json.dumps({"type": "response.create"}))
    for _ in range(50):
        llm = [f.text for f in await stream_frames(gw.redis, keys.STAGE_STREAMS["llm"])
               if f.sid == sid]
        if len(llm) == 6:
            break
        await asyncio.sleep(0.05)
    assert llm[-1] == "over the limit"
    await ws.close()


# --- a worker's exception text stays in the logs ---------------------------------------------
SECRET = "password=hunter2 at /srv/models/secret.bin"


class FailingLlm(Stage):
    """An LLM stage whose every turn raises with internal details in the message."""
    name = "llm"

    async def process(self, frame: Transcript):
        raise RuntimeError(f"cannot load {SECRET}")
        yield  # an async generator, as every stage is


async def test_worker_exception_text_never_reaches_the_client(gw, workers, caplog):
    caplog.set_level(logging.INFO, logger="s2s.gateway")
    worker = workers.start("tests.test_hardening:FailingLlm")
    workers.wait_ready("llm")
    before = STAGE_ERRORS._value.get()
    ws, ready = await hello(gw)
    sid = ready["session_id"]
    await ws.send(json.dumps({"type": "text", "text": "what is the password?"}))
    error = (await until(ws, is_type("error"), timeout=30))[-1]
    assert error["code"] == "stage_error" and error["turn"] == 1
    ref = error["correlation_id"]
    assert ref.startswith("err_") and ref in error["message"]
    assert "hunter2" not in json.dumps(error) and "/srv" not in json.dumps(error)
    logged = [r for r in caplog.records if getattr(r, "correlation_id", None) == ref]
    assert len(logged) == 1 and SECRET in logged[0].getMessage() and logged[0].sid == sid
    deadline = time.monotonic() + 10
    while SECRET not in workers.log(worker) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    worker_log = workers.log(worker)
    assert SECRET in worker_log and f"sid={sid}" in worker_log
    # the Realtime face says the same: a code and the id, no text
    rt, rt_sid = await realtime_session(gw)
    await rt.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}}))
    await rt.send(json.dumps({"type": "response.create"}))
    failure = (await realtime_events(rt, "error", timeout=30))[-1]["error"]
    assert failure["code"] == "stage_error" and failure["type"] == "server_error"
    assert "err_" in failure["message"] and "hunter2" not in failure["message"]
    assert STAGE_ERRORS._value.get() == before + 2
    await rt.close()
    await ws.close()


# --- broken connections do not lock their own key out ----------------------------------------
async def test_vanished_connections_release_their_slots(redis_url):
    """principal_max_sessions 3: 30 connections with the key that vanish right after their
    hello (RST, no close frame) or after some garbage, then at once a good session with
    the same key: admitted.  The limit still holds for real sessions, and a real session
    whose client vanished is still resumable."""
    settings = gateway_settings(redis_url, principal_max_sessions=3, closed_ttl_s=60)
    async with running_gateway(settings) as gw:
        real, real_ready = await hello(gw)
        await real.send(pcm(1600))
        await asyncio.sleep(0.2)

        async def vanish(i: int) -> None:
            ws = await websockets.connect(gw.ws, compression=None)
            await ws.send(json.dumps({"type": "hello"}))
            if i % 3 == 1:
                await ws.send(b"\x00\x01\x02")              # odd length: the server closes
            elif i % 3 == 2:
                await ws.send("{garbage")
                await ws.send(pcm(10))
            ws.transport.abort()

        await asyncio.gather(*(vanish(i) for i in range(30)))
        good, ready = await hello(gw)                       # at once: admitted
        other, _ = await hello(gw)
        got, code = await closed_with(await _hello_only(gw))  # the 4th real one: refused
        assert got[0]["code"] == "session_limit" and code == 1008
        # the real session whose client vanishes stays resumable
        real.transport.abort()
        assert await ended(gw, real_ready["session_id"])
        last = await gw.redis.xrevrange(keys.audio(real_ready["session_id"]), count=1)
        await gw.redis.set(keys.vad_pos(real_ready["session_id"]), last[0][0])  # VAD read it
        back, again = await hello(gw, session_id=real_ready["session_id"])
        assert again["session_id"] == real_ready["session_id"]
        for ws in (good, other, back):
            await ws.close()


async def _hello_only(gw):
    ws = await websockets.connect(gw.ws, compression=None)
    await ws.send(json.dumps({"type": "hello"}))
    return ws


async def test_a_slot_counted_again_by_the_admission_tick_is_given_back(redis_url):
    """The admission loop registers open sessions each tick; one that ended while a tick
    registered it would count for 30 s more.  The gateway gives its slot back again."""
    settings = gateway_settings(redis_url, principal_max_sessions=1)
    async with running_gateway(settings) as gw:
        ws, ready = await hello(gw)
        sid = ready["session_id"]
        await ws.close()
        assert await ended(gw, sid)
        await gw.bus.register_sessions({sid: PRINCIPAL})   # what a racing tick does
        assert await gw.bus.live_sessions(PRINCIPAL) == 1
        await asyncio.sleep(2.0)
        assert await gw.bus.live_sessions(PRINCIPAL) == 0
        ws, _ = await hello(gw)
        await ws.close()


# --- no import circles -----------------------------------------------------------------------
def _imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """Every module of ``modules`` that ``path`` imports, at any level of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level == 1 else node.module or ""
            mod = f"{package}.{node.module}" if node.level and node.module else base
            for alias in node.names:
                out.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in modules else mod)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out & modules


@pytest.mark.parametrize("folder, package", [("gateway", "s2s.gateway"),
                                             ("client", "s2s.client")])
def test_no_import_circles(folder, package):
    files = {f"{package}.{p.stem}": p for p in (ROOT / folder).glob("*.py")
             if p.stem != "__init__"}
    graph = {m: _imports(p, package, set(files)) - {m} for m, p in files.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and (seen.add(n) or reaches(n, goal, seen)))
                   for n in graph[start])

    circles = [m for m in graph if reaches(m, m, set())]
    assert not circles, {m: sorted(graph[m]) for m in circles}
    for module in files:  # and each imports on its own, first in a fresh interpreter
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (module, result.stderr[-2000:])
