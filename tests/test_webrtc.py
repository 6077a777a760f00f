"""WebRTC calls (``POST /v1/realtime/calls``) with the Python client (client/webrtc.py,
aiortc), against a real in-process gateway on a real Redis.

The pipeline stages are played by the test (frames XADDed to the session's streams, as
tests/test_realtime.py does), so the call is checked without models: the offer and
answer (Opus), the microphone track reaching the session's audio stream, the Realtime
events on the data channel, the reply on the outgoing track (measured), barge-in, the
refusals, and the end of the call.  The real stack over WebRTC is
test_webrtc_talk_real_stack (slow), and the browser in tests/test_web.py."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request

import numpy as np
import pytest

from s2s import config, keys
from s2s.frames import Audio, ReplyAudio, ReplyText, SessionEnd, SpeechStarted, Transcript
from s2s.client.webrtc import WebRTCConnection, calls_url

from tests.conftest import AUTH_SETTINGS, ROOT, TEST_API_KEY
from tests.test_gateway import running_gateway, stream_frames

TRACK_RATE = 48000


@pytest.fixture
async def gw(redis_url):
    settings = config.load({"redis_url": redis_url, "max_sessions": 5, "webrtc_max_calls": 3,
                            "principal_max_sessions": 3, **AUTH_SETTINGS}, environ={})
    async with running_gateway(settings) as gw:
        yield gw


def tone(seconds: float, freq: float = 440.0, rate: int = TRACK_RATE, amp: float = 0.3) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * 32767 * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes()


def dominant_hz(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


async def session_sid(gw) -> str:
    async with asyncio.timeout(10):
        while not (opens := await stream_frames(gw.redis, keys.SESSIONS)):
            await asyncio.sleep(0.02)
    return opens[-1].sid


async def audio_seconds(gw, sid: str) -> float:
    return sum(f.seconds for f in await stream_frames(gw.redis, keys.audio(sid))
               if isinstance(f, Audio))


async def speak(conn, seconds: float, rate: int = 16000, freq: float = 220.0) -> None:
    """Microphone audio paced in real time, as talk() sends it."""
    pcm = tone(seconds, freq, rate)
    step = rate // 50 * 2
    start = time.monotonic()
    for i in range(0, len(pcm), step):
        await conn.send_audio(pcm[i:i + step])
        await asyncio.sleep(max(0.0, start + (i + step) / 2 / rate - time.monotonic()))


async def collect(conn, until, timeout: float = 10.0) -> list:
    got = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await conn.recv()
            assert msg is not None, f"the call ended; got {got[-5:]}"
            got.append(msg)
            if until(msg):
                return got


def of_type(kind):
    return lambda m: isinstance(m, dict) and m.get("type") == kind


def post(url: str, body: bytes, headers: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), {}
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


async def test_call_mic_events_and_reply_track(gw):
    """Offer/answer with Opus; the microphone track reaches the session (24 kHz, at its
    real length); a turn's events come on the data channel and its reply on the track."""
    conn = await WebRTCConnection.open(gw.http + "/", api_key=TEST_API_KEY)
    try:
        assert conn.audio_codec.lower().startswith("opus/48000")
        events: list[dict] = []
        conn.channel.on("message", lambda raw: events.append(json.loads(raw)))
        sid = await session_sid(gw)
        assert conn.session_id == sid
        await speak(conn, 1.0)
        async with asyncio.timeout(5):
            while await audio_seconds(gw, sid) < 0.9:
                await asyncio.sleep(0.05)
        opened = (await stream_frames(gw.redis, keys.SESSIONS))[-1]
        assert opened.in_sr == 24000 and opened.out_sr == TRACK_RATE
        heard = b"".join(f.pcm for f in await stream_frames(gw.redis, keys.audio(sid))
                         if isinstance(f, Audio))
        assert abs(dominant_hz(heard, 24000) - 220) < 5  # Opus both ways kept the tone

        marks = {"speech_end": time.time()}
        reply = tone(1.5, 440.0)
        await gw.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1),
                          Transcript(sid=sid, turn=1, text="Play me a tone.", start_s=0.1,
                                     end_s=1.0, marks=marks),
                          ReplyText(sid=sid, turn=1, seq=0, text="Here it is.", final=True),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=reply, sr=TRACK_RATE,
                                     last=True, final=True, marks=marks))
        got = await collect(conn, of_type("reply_done"))
        kinds = [m["type"] if isinstance(m, dict) else "audio" for m in got]
        assert [k for k in kinds if k != "audio"] == [
            "speech_started", "transcript", "reply_text", "audio_start", "reply_done"], kinds
        assert next(m for m in got if of_type("transcript")(m))["text"] == "Play me a tone."
        audio = b"".join(m for m in got if isinstance(m, bytes))
        seconds = len(audio) / 2 / 24000
        assert 1.3 < seconds < 1.8, seconds          # the whole reply, at its real length
        assert abs(dominant_hz(audio, 24000) - 440) < 5
        start = next(m for m in got if of_type("audio_start")(m))
        assert start["voice_to_voice_ms"] is not None and start["voice_to_voice_ms"] >= 0
        await asyncio.sleep(0.3)
        names = [e["type"] for e in events]
        order = ["response.created", "output_audio_buffer.started", "response.done",
                 "output_audio_buffer.stopped"]
        assert [names.index(n) for n in order] == sorted(names.index(n) for n in order), names
        assert "response.output_audio.delta" not in names  # the audio is on the track
    finally:
        await conn.close()
