"""Phone calls on /telephony/twilio, by a caller that follows Twilio's documented Media
Streams flow and timing (bench/telephony_client.py): connected, start, 20 ms μ-law media
in real time, marks sent back as the reply plays, clear honoured, stop.

The first tests play the pipeline stages themselves (frames XADDed to the session's
streams, as tests/test_gateway.py does), so the protocol is checked exactly and fast; the
last one runs the real stack (real models) on real speech made 8 kHz μ-law.  Auth,
admission and failover of every transport are in tests/test_transports.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import xml.etree.ElementTree as ET

import httpx
import numpy as np
import pytest
import websockets

from s2s import config, keys, metrics
from s2s.bench.telephony_client import RATE, TwilioCall, from_phone, to_phone
from s2s.bus import FIELD
from s2s.frames import (Audio, ReplyAudio, ReplyText, SessionOpen, SpeechStarted, Transcript,
                        decode)
from s2s.gateway import g711
from s2s.gateway.telephony.serializer import BadMessage, MarkPlayed, Media, Start, Stop
from s2s.gateway.telephony.twilio import TwilioSerializer, signature, stream_twiml

from tests.conftest import AUTH_SETTINGS, DATA, TEST_API_KEY, load_pcm16
from tests.test_gateway import running_gateway, stream_frames

AUTH_TOKEN = "twilio-test-auth-token-0123456789"
ACCOUNT = "AC" + "0" * 32


@pytest.fixture
async def gw(redis_url):
    settings = config.load({"redis_url": redis_url, "twilio_auth_token": AUTH_TOKEN,
                            "twilio_account_sid": ACCOUNT, "max_sessions": 5,
                            **AUTH_SETTINGS}, environ={})
    async with running_gateway(settings) as gateway:
        gateway.call_url = gateway.http.replace("http", "ws") + "/telephony/twilio"
        yield gateway


async def signed_call(gw, **kw) -> TwilioCall:
    return await TwilioCall.open(gw.call_url, auth_token=AUTH_TOKEN, account_sid=ACCOUNT, **kw)


async def opened(gw) -> SessionOpen:
    for _ in range(250):
        opens = await stream_frames(gw.redis, keys.SESSIONS)
        if opens:
            return opens[-1]
        await asyncio.sleep(0.02)
    raise AssertionError("no session opened")


async def wait_for(pred, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def tone(seconds: float, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2").tobytes()


# --- the serializer, on the messages as Twilio documents them -----------------------------
def test_documented_messages_parse():
    s = TwilioSerializer()
    with pytest.raises(BadMessage):  # media before start
        s.parse(json.dumps({"event": "media", "media": {"payload": ""}}), None)
    assert s.parse('{"event": "connected", "protocol": "Call", "version": "1.0.0"}', None)
    start = {"event": "start", "sequenceNumber": "1", "start": {
        "accountSid": ACCOUNT, "streamSid": "MZ" + "1" * 32, "callSid": "CA" + "2" * 32,
        "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                               "channels": 1},
        "customParameters": {"FirstName": "Jane"}}, "streamSid": "MZ" + "1" * 32}
    (ev,) = s.parse(json.dumps(start), None)
    assert ev == Start("MZ" + "1" * 32, "CA" + "2" * 32, ACCOUNT, {"FirstName": "Jane"})
    ulaw = g711.encode(tone(0.02), "ulaw")
    (media,) = s.parse(json.dumps({"event": "media", "sequenceNumber": "2", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "5",
        "payload": base64.b64encode(ulaw).decode()}, "streamSid": s.stream_sid}), None)
    assert isinstance(media, Media) and media.pcm == g711.decode(ulaw, "ulaw")
    assert s.parse(json.dumps({"event": "mark", "sequenceNumber": "4", "streamSid": s.stream_sid,
                               "mark": {"name": "my label"}}), None) == [MarkPlayed("my label")]
    assert s.parse(json.dumps({"event": "stop", "sequenceNumber": "5", "stop": {
        "accountSid": ACCOUNT, "callSid": "CA" + "2" * 32}, "streamSid": s.stream_sid}),
        None) == [Stop()]
    for bad in ('{"event": "media", "streamSid": "MZother", "media": {"payload": ""}}',
                '{"event": "media", "media": {"payload": "%%%"}}', "[1]", "not json"):
        with pytest.raises(BadMessage):
            s.parse(bad, None)
    with pytest.raises(BadMessage):
        s.parse(None, b"\x00\x01")  # Twilio sends text only
    # what goes back: media (base64 μ-law, 200 ms at most a message), mark, clear
    out = [json.loads(m) for m in s.audio(tone(0.5))]
    assert [len(base64.b64decode(m["media"]["payload"])) for m in out] == [1600, 1600, 800]
    assert all(m["event"] == "media" and m["streamSid"] == s.stream_sid for m in out)
    assert json.loads(s.mark("1:500")) == {"event": "mark", "streamSid": s.stream_sid,
                                           "mark": {"name": "1:500"}}
    assert json.loads(s.clear()) == {"event": "clear", "streamSid": s.stream_sid}


def test_signature_matches_twilios_published_example():
    """The example of https://www.twilio.com/docs/usage/security (auth token 12345)."""
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}
    assert signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params) == \
        "RSOYDt4T1cUTdK1PDd93/VVr8B8="


# --- a call on a real gateway, the stages played by the test --------------------------------
async def test_call_answered_marks_follow_playback_and_barge_in_clears(gw):
    """The caller's μ-law reaches the session as 8 kHz PCM; the reply comes back as μ-law
    media with marks the caller returns as it plays them; speech over the reply brings a
    ``clear`` and the history keeps only the pieces the caller heard."""
    call = await signed_call(gw)
    try:
        opening = await opened(gw)
        sid = opening.sid
        assert (opening.in_sr, opening.out_sr) == (8000, 8000)
        said = to_phone(load_pcm16(DATA / "jfk.wav")[16000:16000 + 8000])  # 0.5 s of JFK
        await call.speak(said)
        await wait_for(lambda: len(call.sent) == 25, what="media sent")
        for _ in range(100):
            audio = [f for f in await stream_frames(gw.redis, keys.audio(sid))
                     if isinstance(f, Audio)]
            if sum(len(f.pcm) for f in audio) == len(said) * 2:
                break
            await asyncio.sleep(0.02)
        assert all(f.sr == 8000 for f in audio)
        assert b"".join(f.pcm for f in audio) == g711.decode(said, "ulaw")

        # turn 1: a reply of three pieces, 1.2 s of audio each
        marks = {"speech_end": time.time()}
        await gw.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1),
                          Transcript(sid=sid, turn=1, text="Hello?", start_s=0.1, end_s=0.5,
                                     marks=marks))
        pieces = ["First piece.", "Second piece.", "Third piece."]
        reply_pcm = [tone(1.2, 300 + 100 * i) for i in range(3)]
        for seq, (text, pcm) in enumerate(zip(pieces, reply_pcm)):
            final = seq == 2
            await gw.bus.emit(ReplyText(sid=sid, turn=1, seq=seq, text=text, final=final),
                              ReplyAudio(sid=sid, turn=1, seq=seq, pcm=pcm, sr=8000,
                                         last=True, final=final, marks=marks))
        await wait_for(lambda: call.heard.audio_s() >= 3.6 - 1e-6, what="the reply audio")
        got = b"".join(m for _, m in call.heard.media)
        assert got == g711.encode(b"".join(reply_pcm), "ulaw")  # exactly the reply
        # marks come back as the audio plays (real time), none flushed
        await wait_for(lambda: len(call.heard.marks_sent_back) >= 4, timeout=3,
                       what="marks of the first 1.2 s")
        assert not call.heard.marks_flushed
        # ~1.5 s played (into the second piece): the caller talks over it
        await asyncio.sleep(max(0.0, 1.5 - (time.time() - call.heard.first_media_at)))
        said_at = time.time()
        await gw.bus.emit(SpeechStarted(sid=sid, turn=2, at_s=2.0))
        await wait_for(lambda: call.heard.clears, timeout=3, what="clear")
        assert call.heard.clears[0] - said_at < 0.3, "clear later than 300 ms"
        assert call.heard.marks_flushed, "the unplayed marks come back on clear"
        for _ in range(100):
            heard = (await gw.bus.prefs(sid)).get("heard:1")
            if heard is not None:
                break
            await asyncio.sleep(0.02)
        assert heard == "First piece. Second piece."  # the third was never played
        assert not call.violations
    finally:
        await call.hang_up()
    assert call.close_code == 1000


async def test_whole_reply_heard_keeps_the_history(gw):
    """A reply played to its end is not cut: its end mark comes back before any barge-in."""
    call = await signed_call(gw)
    try:
        sid = (await opened(gw)).sid
        await call.silence(0.2)
        await gw.bus.emit(Transcript(sid=sid, turn=1, text="Hi", end_s=0.2),
                          ReplyText(sid=sid, turn=1, seq=0, text="Short.", final=True),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=tone(0.4), sr=8000,
                                     last=True, final=True))
        await wait_for(lambda: any(n == "1:end" for _, n in call.heard.marks_sent_back),
                       what="the end mark")
        await gw.bus.emit(SpeechStarted(sid=sid, turn=2, at_s=1.0))
        await call.silence(0.3)
        assert not call.heard.clears
        assert "heard:1" not in await gw.bus.prefs(sid)
    finally:
        await call.hang_up()


async def test_reply_at_another_rate_is_resampled(gw):
    call = await signed_call(gw)
    try:
        sid = (await opened(gw)).sid
        await gw.bus.emit(ReplyAudio(sid=sid, turn=1, seq=0, pcm=bytes(22050 * 2), sr=22050,
                                     last=True, final=True))
        await wait_for(lambda: call.heard.audio_s() > 0.9, what="reply audio")
        assert abs(call.heard.audio_s() - 1.0) < 0.02
    finally:
        await call.hang_up()


async def test_malformed_messages_counted_and_the_call_lives(gw):
    call = await signed_call(gw)
    try:
        sid = (await opened(gw)).sid
        before = metrics.REJECTED.labels("telephony_bad_json")._value.get()
        await call.ws.send("not json")
        await call.ws.send(json.dumps({"event": "media", "streamSid": "MZnot-this-one",
                                       "media": {"payload": ""}}))
        await call.ws.send(json.dumps({"event": "media", "streamSid": call.stream_sid,
                                       "media": {"payload": "%%%"}}))
        await call.speak(to_phone(np.zeros(3200, np.int16)))
        await wait_for(lambda: metrics.REJECTED.labels("telephony_bad_json")._value.get()
                       > before, what="the count")
        assert metrics.REJECTED.labels("telephony_wrong_stream")._value.get() >= 1
        assert metrics.REJECTED.labels("telephony_bad_media")._value.get() >= 1
        for _ in range(100):  # the good audio still arrives
            if any(isinstance(f, Audio) for f in await stream_frames(gw.redis, keys.audio(sid))):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("audio after malformed messages lost")
        assert not call.closed.is_set()
    finally:
        await call.hang_up()


async def test_many_malformed_messages_end_the_call(gw):
    call = await signed_call(gw)
    await opened(gw)
    for _ in range(12):
        await call.ws.send("{")
    await asyncio.wait_for(call.closed.wait(), 5)
    assert call.close_code == 1008
    await call.close()


async def test_twiml_webhook(gw):
    """The voice webhook answers Twilio-signed requests with a <Connect><Stream> to this
    gateway (no query string: Twilio refuses one) and an action that reconnects a dropped
    stream, at most twice; anything unsigned is refused."""
    url = gw.http + "/telephony/twilio/twiml"
    form = {"CallSid": "CA" + "3" * 32, "AccountSid": ACCOUNT, "From": "+14158675309",
            "To": "+18005551212"}
    async with httpx.AsyncClient() as client:
        r = await client.post(url, data=form,
                              headers={"X-Twilio-Signature": signature(AUTH_TOKEN, url, form)})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
        root = ET.fromstring(r.text)
        connect = root.find("Connect")
        stream = connect.find("Stream")
        assert stream.get("url") == gw.http.replace("http", "ws") + "/telephony/twilio"
        assert "?" not in stream.get("url")
        assert connect.get("action") == url + "?reconnect=1"
        again = url + "?reconnect=2"
        r = await client.post(again, data=form, headers={
            "X-Twilio-Signature": signature(AUTH_TOKEN, again, form)})
        assert ET.fromstring(r.text).find("Hangup") is not None
        for headers in ({}, {"X-Twilio-Signature": signature("other-token", url, form)},
                        {"X-Twilio-Signature": signature(AUTH_TOKEN, url, {**form, "To": "x"})}):
            r = await client.post(url, data=form, headers=headers)
            assert r.status_code == 403 and r.json()["error"] == "unauthorized"
    assert stream_twiml("wss://h/telephony/twilio", {"a": 'x"<'}).count("<Parameter") == 1


@pytest.mark.parametrize("how", ["no credential", "bad signature", "signature of another url",
                                 "other account", "wrong token parameter"])
async def test_unsigned_or_wrong_calls_refused(gw, how):
    kw: dict = {"headers": {}}
    if how == "bad signature":
        kw = {"headers": {"X-Twilio-Signature": signature("not-the-token", gw.call_url)},
              "account_sid": ACCOUNT}
    elif how == "signature of another url":
        kw = {"auth_token": AUTH_TOKEN, "signed_url": gw.call_url + "/x", "account_sid": ACCOUNT}
    elif how == "other account":
        kw = {"auth_token": AUTH_TOKEN, "account_sid": "AC" + "9" * 32}
    elif how == "wrong token parameter":
        kw = {"parameters": {"token": "not-a-key"}}
    call = await TwilioCall.open(gw.call_url, **kw)
    await asyncio.wait_for(call.closed.wait(), 5)
    assert (call.close_code, call.close_reason) == (1008, "unauthorized")
    assert not call.heard.media and not call.violations
    assert not await stream_frames(gw.redis, keys.SESSIONS)
    await call.close()


async def test_token_parameter_accepted(gw):
    """Without a signature, a key in <Parameter name="token"> opens the call."""
    call = await TwilioCall.open(gw.call_url, api_key=TEST_API_KEY)
    try:
        assert (await opened(gw)).in_sr == 8000
    finally:
        await call.hang_up()
    assert call.close_code == 1000


# --- the real stack: real models, real speech at 8 kHz μ-law --------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_phone_call_on_the_real_stack(redis_url, workers, tmp_path):
    """A call as Twilio makes one, on JFK's speech made 8 kHz μ-law: it is answered with
    spoken audio (marks returned as it plays), and speaking over the reply brings a
    ``clear`` well within 300 ms of the VAD hearing the speech start; the history keeps
    only what the caller heard of the reply."""
    import redis.asyncio as aioredis

    from s2s.gateway.telephony.socket import resume_ticket
    from tests.conftest import gateway_process

    for stage in ("vad", "stt", "llm", "tts"):
        workers.start(stage)
    redis = aioredis.from_url(redis_url)
    jfk = load_pcm16(DATA / "jfk.wav")
    first, second = to_phone(jfk[int(5.2 * 16000):int(7.9 * 16000)]), \
        to_phone(jfk[int(8.0 * 16000):])
    try:
        with gateway_process(redis_url, tmp_path) as (http, _):
            for stage in ("vad", "stt", "llm", "tts"):
                await asyncio.to_thread(workers.wait_ready, stage, 1, 300)
            call = await TwilioCall.open(http.replace("http", "ws") + "/telephony/twilio",
                                         api_key=TEST_API_KEY)
            try:
                pos = await call.speak(first)
                deadline = time.monotonic() + 90
                while not call.heard.media:  # silence, as a phone line carries, until the reply
                    assert time.monotonic() < deadline and not call.closed.is_set(), \
                        "no reply to the call"
                    pos = await call.silence(0.1, pos)
                sid = (await redis.get(keys.ticket(resume_ticket(
                    "twilio", call.account_sid, call.call_sid)))).decode()
                await call.speak(second, pos)  # the caller talks over the reply
                deadline = time.monotonic() + 10
                while not call.heard.clears:
                    assert time.monotonic() < deadline, "no clear after the barge-in"
                    await call.silence(0.1)
                assert not call.violations
                assert call.heard.marks_sent_back, "no mark came back as the reply played"
                # the VAD's speech start of the barge-in: its entry's time in Redis
                started = [(int(eid.split(b"-")[0]) / 1000, f)
                           for eid, f in [(e, decode(d[FIELD])) for e, d in
                                          await redis.xrange(keys.out(sid))]
                           if isinstance(f, SpeechStarted)]
                vad_at = max(at for at, _ in started)
                assert call.heard.clears[0] - vad_at < 0.3, \
                    f"clear {call.heard.clears[0] - vad_at:.3f} s after the VAD's speech start"
                prefs = await gw_prefs(redis, sid)
                heard = [v for k, v in prefs.items() if k.startswith("heard:")]
                assert heard, "the history was not cut to what was heard"
            finally:
                await call.hang_up()
    finally:
        await redis.aclose()


async def gw_prefs(redis, sid: str) -> dict:
    raw = await redis.hgetall(keys.prefs(sid))
    return {k.decode(): v.decode() for k, v in raw.items()}
