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
from s2s.frames import Audio, ReplyAudio, ReplyText, SpeechStarted, Transcript
from s2s.client.webrtc import WebRTCConnection, calls_url
from s2s.rtc import Resampler

from s2s.gateway.auth import mint_token

from tests.conftest import AUTH_SETTINGS, DATA, ROOT, TEST_API_KEY, TEST_TOKEN_SECRET
from tests.test_gateway import running_gateway, stream_frames

TRACK_RATE = 48000


@pytest.fixture
async def gw(redis_url):
    settings = config.load({"redis_url": redis_url, "max_sessions": 5, "webrtc_max_calls": 3,
                            "principal_max_sessions": 2, **AUTH_SETTINGS}, environ={})
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


def healthz(gw) -> dict:
    with urllib.request.urlopen(gw.http + "/healthz", timeout=10) as r:
        return json.loads(r.read())


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


async def test_barge_in_empties_the_track_and_truncates(gw):
    """The user talks over a long reply: the outgoing track goes silent at once
    (output_audio_buffer.cleared), and the history keeps what was played of it."""
    conn = await WebRTCConnection.open(gw.http + "/", api_key=TEST_API_KEY)
    try:
        events: list[dict] = []
        conn.channel.on("message", lambda raw: events.append(json.loads(raw)))
        sid = await session_sid(gw)
        await speak(conn, 0.3)
        marks = {"speech_end": time.time()}
        await gw.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1),
                          Transcript(sid=sid, turn=1, text="Tell me a story.", marks=marks),
                          ReplyText(sid=sid, turn=1, seq=0, text="Once upon a time."),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=tone(1.0), sr=TRACK_RATE,
                                     last=True, marks=marks),
                          ReplyText(sid=sid, turn=1, seq=1, text="There was a king."),
                          ReplyAudio(sid=sid, turn=1, seq=1, pcm=tone(9.0), sr=TRACK_RATE,
                                     last=True, marks=marks))
        await collect(conn, of_type("audio_start"))
        await asyncio.sleep(1.5)  # the first sentence and half a second of the next played
        assert await gw.bus.advance_turn(sid) == 2  # as the VAD does when speech starts
        await gw.bus.emit(SpeechStarted(sid=sid, turn=2, at_s=2.0))
        await collect(conn, of_type("speech_started"))
        cleared_at = time.monotonic()
        async with asyncio.timeout(5):
            while "output_audio_buffer.cleared" not in [e["type"] for e in events]:
                await asyncio.sleep(0.01)
        truncated = next(e for e in events if e["type"] == "conversation.item.truncated")
        assert 1200 <= truncated["audio_end_ms"] <= 2500, truncated
        # the reply's audio stops reaching the caller: after the network's and the
        # codec's few tens of ms, the track carries silence
        await asyncio.sleep(1.0)
        after = [peak for at, peak in conn.levels if at > cleared_at + 0.15]
        before = [peak for at, peak in conn.levels if cleared_at - 0.5 < at < cleared_at - 0.1]
        assert len(after) >= 30 and max(after) < 50, after
        assert min(before) > 3000, before  # the tone was playing until then
        async with asyncio.timeout(5):
            while not (heard := await gw.redis.hget(keys.prefs(sid), "heard:1")):
                await asyncio.sleep(0.02)
        assert heard.decode() == "Once upon a time. There was a king."
        done = next(e for e in events if e["type"] == "response.done")
        assert done["response"]["status"] == "cancelled"
    finally:
        await conn.close()


async def test_refusals_and_credentials(gw):
    """Wrong or missing credentials, a second call over the principal's limit, a non-SDP
    body and the gateway's call limit get the HTTP status and error of each; a ticket
    works once, as Bearer s2s.ticket.<ticket>."""
    url, _ = calls_url(gw.http)
    from s2s.client import ProtocolError

    with pytest.raises(ProtocolError) as e:
        await WebRTCConnection.open(gw.http, api_key="wrong")
    assert e.value.code == "unauthorized" and "unknown API key" in str(e.value)
    with pytest.raises(ProtocolError) as e:
        await WebRTCConnection.open(gw.http, api_key="")
    assert e.value.code == "unauthorized" and "no credential" in str(e.value)
    status, _, body = await asyncio.to_thread(post, url, b"hello", {
        "Content-Type": "text/plain", "Authorization": f"Bearer {TEST_API_KEY}"})
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    status, _, body = await asyncio.to_thread(post, url, b"not sdp", {
        "Content-Type": "application/sdp", "Authorization": f"Bearer {TEST_API_KEY}"})
    assert status == 400 and body["error"]["code"] == "invalid_sdp"
    status, _, body = await asyncio.to_thread(post, url, b"v=0\r\no=- 1 1 IN IP4 0\r\n", {
        "Content-Type": "application/sdp", "Authorization": f"Bearer {TEST_API_KEY}"})
    assert status == 400 and body["error"]["code"] == "invalid_sdp"

    def ticket() -> str:
        req = urllib.request.Request(gw.http + "/auth/ticket", method="POST",
                                     headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["ticket"]

    t = await asyncio.to_thread(ticket)
    other = mint_token(TEST_TOKEN_SECRET, "other", 600)
    conns = [await WebRTCConnection.open(gw.http, api_key="s2s.ticket." + t)]
    try:
        with pytest.raises(ProtocolError) as e:  # one-time
            await WebRTCConnection.open(gw.http, api_key="s2s.ticket." + t)
        assert e.value.code == "unauthorized"
        conns.append(await WebRTCConnection.open(gw.http, api_key=TEST_API_KEY))
        with pytest.raises(ProtocolError) as e:  # principal_max_sessions: 2
            await WebRTCConnection.open(gw.http, api_key=TEST_API_KEY)
        assert e.value.code == "session_limit" and "HTTP 429" in str(e.value)
        conns.append(await WebRTCConnection.open(gw.http, api_key=other))
        assert len({c.session_id for c in conns}) == 3
        with pytest.raises(ProtocolError) as e:  # webrtc_max_calls: 3
            await WebRTCConnection.open(gw.http, api_key=other)
        assert e.value.code == "too_many_calls" and "HTTP 503" in str(e.value)
        assert e.value.error["retry_after_s"] >= 1
        # hanging up ends the session and frees its call: another is answered
        await conns.pop(0).close()
        async with asyncio.timeout(10):
            while (await asyncio.to_thread(healthz, gw))["sessions"] != 2:
                await asyncio.sleep(0.05)
        conns.append(await WebRTCConnection.open(gw.http, api_key=TEST_API_KEY))
    finally:
        for c in conns:
            await c.close()


async def test_opus_is_the_only_codec(gw):
    """An offer of every codec aiortc has gets Opus alone in the answer; one without Opus
    is refused (400)."""
    from aiortc import RTCPeerConnection, RTCConfiguration
    from aiortc.rtcrtpsender import RTCRtpSender

    url, _ = calls_url(gw.http)
    for only in (None, "audio/PCMU"):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver("audio", direction="sendrecv")
        if only:
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities(
                "audio").codecs if c.mimeType == only])
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        await pc.close()
        assert "PCMU/8000" in offer and ("opus/48000" in offer) == (only is None)
        req = urllib.request.Request(url, data=offer.encode(), method="POST", headers={
            "Content-Type": "application/sdp", "Authorization": f"Bearer {TEST_API_KEY}"})
        if only is None:
            answer = await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read())
            rtpmaps = [ln for ln in answer.decode().splitlines() if ln.startswith("a=rtpmap:")]
            assert rtpmaps and all("opus/48000/2" in ln for ln in rtpmaps), rtpmaps
        else:
            status, _, body = await asyncio.to_thread(post, url, offer.encode(), dict(req.headers))
            assert status == 400 and body["error"]["code"] == "invalid_sdp", body


def local_lags(ref: np.ndarray, got: np.ndarray, rate: int, lag: int, reach: int) -> list:
    """For each 100 ms window of ``ref`` with speech in it: (offset in ``got`` where it
    matches best, within ``reach`` samples of ``lag``; the correlation there; RMS ratio)."""
    width = rate // 10
    out = []
    for i in range(0, len(ref) - width, width):
        seg = ref[i:i + width]
        lo, hi = i + lag - reach, i + lag + reach + width
        if np.abs(seg).max() < 1000 or lo < 0 or hi > len(got):
            continue
        span = got[lo:hi]
        dots = np.correlate(span, seg, mode="valid")
        norms = np.sqrt(np.convolve(span ** 2, np.ones(width), mode="valid"))
        corr = dots / (norms * np.linalg.norm(seg) + 1e-9)
        best = int(np.argmax(corr))
        out.append((lo + best - i, float(corr[best]), float(norms[best] / np.linalg.norm(seg))))
    return out


async def test_call_delivers_the_sent_audio(gw):
    """Real speech sent on a call reaches the session's audio stream as it was sent: at
    the same place in session time (Opus's 6.5 ms look-ahead dropped), no 20 ms frame lost,
    repeated or reordered, at its own level (a mono frame upmixed by aiortc's encoder
    made it 3 dB quieter), and within Opus's own distortion."""
    import soundfile
    import soxr

    speech, rate = soundfile.read(str(DATA / "jfk.wav"), dtype="int16")
    assert rate == 16000
    sent = np.concatenate([np.zeros(rate // 2, np.int16), speech[: rate * 4],
                           np.zeros(rate // 2, np.int16)]).tobytes()
    conn = await WebRTCConnection.open(gw.http + "/", api_key=TEST_API_KEY)
    try:
        sid = await session_sid(gw)
        step = rate // 50 * 2
        start = time.monotonic()
        for i in range(0, len(sent), step):  # paced in real time, as a microphone
            await conn.send_audio(sent[i:i + step])
            await asyncio.sleep(max(0.0, start + (i + step) / 2 / rate - time.monotonic()))
        async with asyncio.timeout(15):  # all but the encoder's and resamplers' hold
            while await audio_seconds(gw, sid) < len(sent) / 2 / rate - 0.06:
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    session_rate = (await stream_frames(gw.redis, keys.SESSIONS))[-1].in_sr
    got = np.frombuffer(b"".join(f.pcm for f in await stream_frames(gw.redis, keys.audio(sid))
                                 if isinstance(f, Audio)), "<i2").astype(np.float64)
    ref = soxr.resample(np.frombuffer(sent, "<i2").astype(np.float64), rate, session_rate,
                        quality="VHQ")
    assert len(ref) - 0.06 * session_rate <= len(got) <= len(ref) + 0.02 * session_rate
    whole = np.correlate(got, ref[: len(got) // 2], mode="valid")  # the delay, whole call
    lag = int(np.argmax(whole))
    assert lag <= session_rate // 2000, lag / session_rate  # Opus's look-ahead taken off
    # searched 2 frames either way: a lost or repeated 20 ms frame shows as a jump of a
    # frame; Opus's own phase changes move a noisy window's best match by a few samples
    windows = local_lags(ref, got, session_rate, lag, reach=session_rate // 25)
    assert len(windows) >= 25, len(windows)       # the speech was compared, not silence
    assert all(abs(found - lag) <= session_rate // 2000 for found, _, _ in windows), \
        [(round((found - lag) / session_rate * 1000, 2)) for found, _, _ in windows]
    corr = sorted(c for _, c, _ in windows)
    assert corr[len(corr) // 2] > 0.95 and corr[0] > 0.8, corr
    levels = sorted(r for _, _, r in windows)
    assert 0.9 < levels[len(levels) // 2] < 1.1, levels


@pytest.mark.parametrize("in_rate,out_rate", [(16000, 48000), (48000, 24000), (48000, 16000)])
def test_resampler_gives_each_frame_out_whole(in_rate, out_rate):
    """The call's resampler holds back only its filter (each 20 ms frame in gives 20 ms
    out, the first under 2 ms short) and changes the speech band by no more than noise."""
    import soundfile
    import soxr

    speech, rate = soundfile.read(str(DATA / "jfk.wav"), dtype="int16")
    x = soxr.resample(speech[: rate * 2], rate, in_rate, quality="VHQ")
    resample = Resampler(in_rate, out_rate)
    step = in_rate // 50
    sizes = [len(resample(x[i:i + step])) for i in range(0, len(x) - step + 1, step)]
    frame = out_rate // 50
    assert frame - out_rate // 500 <= sizes[0] < frame and set(sizes[1:]) == {frame}, sizes[:4]
    resample = Resampler(in_rate, out_rate)
    got = np.concatenate([resample(x[i:i + step]) for i in range(0, len(x), step)])
    ref = soxr.resample(x.astype(np.float64), in_rate, out_rate, quality="VHQ")[: len(got)]
    band = slice(out_rate // 10, len(got) - out_rate // 10)
    err = got[band] - ref[band]
    snr = 10 * np.log10(np.mean(ref[band] ** 2) / np.mean(err ** 2))
    assert snr > 40, snr                           # aligned (no delay added) and faithful
