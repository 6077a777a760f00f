"""Every way a user connects goes through the same authentication, admission and failover:
one suite, run over each transport of ``TRANSPORTS`` (the native ``/ws``, the Realtime API
``/v1/realtime``, Twilio Media Streams ``/telephony/twilio``).  A transport is one entry:
how its client opens a session with a credential (or none), how it is told it was refused,
how it sends audio, and how it comes back after its gateway died (when its protocol can).

The stages are played by a session-owning stage without a model (tests/stages.py's
``CrashSessionStage`` answers each audio frame with a ``heard`` notice in the session's
output stream), so what is checked is the gateway's part, with real Redis and real
gateways (one of them a process, killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
import pytest
import redis.asyncio as aioredis
import websockets

from s2s import config, keys
from s2s.bench.telephony_client import TwilioCall, to_phone
from s2s.bus import FIELD
from s2s.frames import Notice, SessionEnd, decode
from s2s.gateway.telephony.socket import resume_ticket

from tests.conftest import AUTH_SETTINGS, TEST_API_KEY, gateway_process
from tests.test_gateway import serve

LEASE_S, GRACE_S = 1.0, 1.5


class Refused(Exception):
    def __init__(self, code: str, close: int | None):
        super().__init__(f"{code} (close {close})")
        self.code, self.close = code, close


@dataclass
class Conn:
    """An open session of some transport: its id, and how to send audio and leave."""
    sid: str
    audio: Callable[[float], Awaitable[None]]     # send this many seconds of speech-ish audio
    close: Callable[[], Awaitable[None]]
    resume_info: Any = None                       # what the transport resumes with


def _headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _pcm(seconds: float, sr: int) -> bytes:
    return (np.sin(np.arange(int(seconds * sr)) / 7) * 3000).astype("<i2").tobytes()


# --- the transports ---------------------------------------------------------------------------
async def _closed(ws) -> int | None:
    try:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    except TimeoutError:
        return None


async def open_ws(http: str, key: str | None, redis, resume: Any = None) -> Conn:
    ws = await websockets.connect(http.replace("http", "ws") + "/ws",
                                  additional_headers=_headers(key), compression=None)
    await ws.send(json.dumps({"type": "hello", **({"session_id": resume} if resume else {})}))
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if first["type"] == "error":
        raise Refused(first["code"], await _closed(ws))
    assert first["type"] == "ready", first

    async def audio(seconds: float) -> None:
        for i in range(0, int(seconds * 50)):
            await ws.send(_pcm(0.02, 16000))

    return Conn(first["session_id"], audio, ws.close, first["session_id"])


async def open_realtime(http: str, key: str | None, redis, resume: Any = None) -> Conn:
    ws = await websockets.connect(http.replace("http", "ws") + "/v1/realtime",
                                  additional_headers=_headers(key), compression=None)
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if first["type"] == "error":
        raise Refused(first["error"]["code"], await _closed(ws))
    assert first["type"] == "session.created", first

    async def audio(seconds: float) -> None:
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(
            _pcm(seconds, 24000)).decode()}))

    return Conn(first["session"]["id"].removeprefix("sess_"), audio, ws.close)


async def open_twilio(http: str, key: str | None, redis, resume: Any = None) -> Conn:
    """A stream as a TwiML <Connect><Stream> with <Parameter name="token"> makes it; a
    resume is the same call's next stream (same callSid), as <Connect action> brings it."""
    call_sid, account = resume or (None, None)
    call = await TwilioCall.open(http.replace("http", "ws") + "/telephony/twilio",
                                 parameters={"token": key} if key else {}, headers={},
                                 call_sid=call_sid, account_sid=account)
    ticket = keys.ticket(resume_ticket("twilio", call.account_sid, call.call_sid))
    deadline = time.monotonic() + 10
    # Twilio is told nothing: the session is the one its call id names (on a resume the
    # old gateway's record may be read before the new one replaces it with the same id:
    # the failover test proves the resume by the audio sent on the new gateway reaching it)
    while True:
        if call.closed.is_set():
            raise Refused(call.close_reason, call.close_code)
        sid = await redis.get(ticket)
        if sid:
            break
        assert time.monotonic() < deadline, "no session for the call"
        await asyncio.sleep(0.02)

    async def audio(seconds: float) -> None:
        await call.speak(to_phone(np.frombuffer(_pcm(seconds, 16000), "<i2")))

    return Conn(sid.decode(), audio, call.hang_up, (call.call_sid, call.account_sid))


# a refused WebRTC call's HTTP status, as the close code a WebSocket would have got
HTTP_AS_CLOSE = {401: 1008, 403: 1008, 429: 1008, 503: 1013}


async def open_webrtc(http: str, key: str | None, redis, resume: Any = None) -> Conn:
    """A Realtime WebRTC call (client/webrtc.py: POST /v1/realtime/calls, Opus tracks,
    the oai-events data channel); refused by the HTTP answer to its offer."""
    from s2s.client import ProtocolError
    from s2s.client.webrtc import WebRTCConnection

    try:
        conn = await WebRTCConnection.open(http, api_key=key or "")
    except ProtocolError as e:
        raise Refused(e.code, HTTP_AS_CLOSE.get(e.error.get("http_status"))) from None

    async def audio(seconds: float) -> None:
        await conn.send_audio(_pcm(seconds, 16000))

    return Conn(conn.session_id, audio, conn.close)


@dataclass
class Transport:
    name: str
    open: Callable[..., Awaitable[Conn]]
    resumes: bool       # its protocol can come back to the same session after a failover


TRANSPORTS = [
    Transport("ws", open_ws, resumes=True),
    Transport("realtime", open_realtime, resumes=False),  # the Realtime API has no resume
    Transport("twilio", open_twilio, resumes=True),
    Transport("webrtc", open_webrtc, resumes=False),  # a call is a Realtime session
]


@pytest.fixture(params=TRANSPORTS, ids=lambda t: t.name)
def transport(request) -> Transport:
    return request.param


def settings_for(redis_url: str, **overrides):
    return config.load({"redis_url": redis_url, "gateway_lease_s": LEASE_S,
                        "gateway_grace_s": GRACE_S, **AUTH_SETTINGS, **overrides}, environ={})


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def frames(redis, stream: str) -> list:
    return [decode(f[FIELD]) for _, f in await redis.xrange(stream)]


# --- authentication ------------------------------------------------------------------------
@pytest.mark.parametrize("credential", ["none", "wrong key"])
async def test_refused_without_a_valid_credential(transport, credential, redis_url, redis):
    srv, task, http = await serve(settings_for(redis_url))
    try:
        with pytest.raises(Refused) as refused:
            await transport.open(http, None if credential == "none" else "not-a-key", redis)
        assert (refused.value.code, refused.value.close) == ("unauthorized", 1008)
        assert await redis.xlen(keys.SESSIONS) == 0  # nothing reached the pipeline
        conn = await transport.open(http, TEST_API_KEY, redis)  # the right key: opened
        assert await redis.get(keys.owner(conn.sid)) == b"key:tests"
        await conn.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


# --- admission -----------------------------------------------------------------------------
async def test_busy_when_the_stack_is_full(transport, redis_url, redis):
    """Capacity counts every session, whatever its transport: full, the next is refused
    ``busy`` with close 1013 (try again later); once one leaves, it is admitted."""
    srv, task, http = await serve(settings_for(redis_url, session_capacity=1))
    try:
        first = await transport.open(http, TEST_API_KEY, redis)
        with pytest.raises(Refused) as refused:
            await transport.open(http, TEST_API_KEY, redis)
        assert (refused.value.code, refused.value.close) == ("busy", 1013)
        await first.close()
        for _ in range(50):
            try:
                again = await transport.open(http, TEST_API_KEY, redis)
                break
            except Refused:
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("a place did not free up")
        await again.close()
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


# --- failover ------------------------------------------------------------------------------
async def heard(redis, sid: str, timeout: float = 10.0) -> None:
    """The session's VAD owner reads its audio (its notice lands in the output stream)."""
    deadline = time.monotonic() + timeout
    while not any(isinstance(f, Notice) and f.event == "heard"
                  for f in await frames(redis, keys.out(sid))):
        assert time.monotonic() < deadline, "the session's audio is not read"
        await asyncio.sleep(0.05)
    await redis.delete(keys.out(sid))


async def ends(redis, sid: str) -> int:
    return sum(isinstance(f, SessionEnd) for f in await frames(redis, keys.audio(sid)))


async def test_session_survives_its_gateway_dying(transport, redis_url, redis, workers,
                                                  tmp_path, monkeypatch):
    """Gateway A (a process) is killed with SIGKILL under an open session.  A transport
    that can resume comes back on gateway B to the same session: same id, same VAD owner
    reading its audio, never ended.  One that cannot (Realtime) has its session released
    by B (ended, so its VAD owner lets go) and a new one on B answered."""
    monkeypatch.setenv("S2S_GATEWAY_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("S2S_GATEWAY_GRACE_S", str(GRACE_S))
    workers.start("tests.stages:CrashSessionStage")  # a VAD-like session owner, no model
    await asyncio.to_thread(workers.wait_ready, "vad")
    b_srv, b_task, b_http = await serve(settings_for(redis_url))
    try:
        with gateway_process(redis_url, tmp_path) as (a_http, a_proc):
            conn = await transport.open(a_http, TEST_API_KEY, redis)
            await conn.audio(0.2)
            await heard(redis, conn.sid)
            os.kill(a_proc.pid, signal.SIGKILL)
            a_proc.wait()
            killed = time.monotonic()
            if transport.resumes:
                back = await transport.open(b_http, TEST_API_KEY, redis, resume=conn.resume_info)
                assert back.sid == conn.sid
                await back.audio(0.2)
                await heard(redis, back.sid)
                await asyncio.sleep(2 * (LEASE_S + GRACE_S))  # the reaper had its chance
                assert await ends(redis, conn.sid) == 0, "B ended a session it carries"
                await back.audio(0.2)
                await heard(redis, back.sid)
            else:
                while await ends(redis, conn.sid) == 0:
                    assert time.monotonic() - killed < 60, "the dead gateway's session " \
                        "was never released"
                    await asyncio.sleep(0.1)
                back = await transport.open(b_http, TEST_API_KEY, redis)
                await back.audio(0.2)
                await heard(redis, back.sid)
            await back.close()
    finally:
        b_srv.should_exit = True
        await asyncio.wait_for(b_task, 10)
