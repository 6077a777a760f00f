"""VAD and STT worker processes over a real Redis: sessions in, transcripts out, bad
input rejected and counted, and a VAD worker's sessions survive its SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request

import msgspec
import numpy as np
import pytest
import redis

from s2s import keys
from s2s.bus import Bus
from s2s.frames import Audio, FrameError, SessionEnd, SessionOpen, SpeechStarted, Transcript, decode
from tests.conftest import DATA, load_pcm16

pytestmark = pytest.mark.slow

LAST_WORDS = "ask what you can do for your country"


def frames_in(client: redis.Redis, stream: str) -> list:
    """The valid frames of a stream (the tests plant bad ones too)."""
    out = []
    for _, fields in client.xrange(stream):
        try:
            out.append(decode(fields[b"f"]))
        except FrameError:
            pass
    return out


def transcripts(client: redis.Redis, sid: str) -> list[Transcript]:
    return [f for f in frames_in(client, keys.out(sid)) if isinstance(f, Transcript)]


async def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise TimeoutError(f"not within {timeout}s: {what}")


async def send_live(bus: Bus, sid: str, pcm: np.ndarray, sr: int, speed: float = 1.0) -> None:
    """Send audio as a client would: 20 ms frames, in real time (5 frames per write)."""
    step, t0 = sr // 50, time.monotonic()
    for i in range(0, len(pcm), 5 * step):
        await bus.emit(*[Audio(sid=sid, pcm=pcm[j:j + step].tobytes(), sr=sr,
                               marks={"recv": time.time()})
                         for j in range(i, min(i + 5 * step, len(pcm)), step)])
        await asyncio.sleep(max(0.0, t0 + (i + 5 * step) / sr / speed - time.monotonic()))


def metric(client: redis.Redis, stage: str, name: str, **labels) -> float:
    """A counter of the (live) worker of ``stage``, read from its /metrics."""
    total = 0.0
    for member in client.zrangebyscore(keys.WORKERS, time.time() - 5, "+inf"):
        kind, _, url = member.decode().split("|", 2)
        if kind != stage:
            continue
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + "{") and want in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def jfk_with_tail(sr: int) -> np.ndarray:
    return np.concatenate([load_pcm16(DATA / "jfk.wav", sr), np.zeros(sr, np.int16)])


async def test_sessions_through_redis_and_bad_input(workers, settings):
    client = redis.Redis.from_url(settings.redis_url)
    vad = workers.start("vad")
    workers.start("stt")
    workers.wait_ready("vad")
    workers.wait_ready("stt")
    bus = Bus(settings)
    try:
        await bus.emit(SessionOpen(sid="a", in_sr=16000, out_sr=24000),
                       SessionOpen(sid="b", in_sr=48000))
        # bad input, in the stream of session a and in the shared streams
        raw = {"kind": "audio", "sid": "a", "pcm": b"\0\0", "sr": 16000}
        bad = [b"\x00garbage", msgspec.msgpack.encode({**raw, "pcm": b"\0\0\0"}),
               msgspec.msgpack.encode({**raw, "sr": 12345}),
               msgspec.msgpack.encode({**raw, "sid": "b"}),
               msgspec.msgpack.encode({**raw, "pcm": bytes(5 * 1024 * 1024)})]
        for data in bad:
            client.xadd(keys.audio("a"), {b"f": data})
        await bus.emit(Audio(sid="a", pcm=bytes(320), sr=8000))  # not the session's rate
        client.xadd(keys.SESSIONS, {b"f": b"\x93garbage"})
        client.xadd(keys.STAGE_STREAMS["stt"], {b"f": msgspec.msgpack.encode(
            {"kind": "utt", "sid": "a", "pcm": b"\0", "sr": 16000})})

        await asyncio.gather(send_live(bus, "a", jfk_with_tail(16000), 16000),
                             send_live(bus, "b", jfk_with_tail(48000), 48000))
        for sid in ("a", "b"):
            done = await wait_until(
                lambda: [t for t in transcripts(client, sid) if "country" in t.text.lower()
                         and t.end_s > 10], 15, f"last transcript of session {sid}")
            t = done[-1]
            assert LAST_WORDS in re.sub(r"[^a-z ]", "", t.text.lower()), t.text
            assert t.marks["stt_done"] >= t.marks["vad_sent"] >= t.marks["speech_end"]
            assert t.marks["vad_sent"] - t.marks["speech_end"] < 1.0
            speech = [f for f in frames_in(client, keys.out(sid)) if isinstance(f, SpeechStarted)]
            assert len(speech) == 4 and t.turn == speech[-1].turn
        # (the STT worker deleted the utterances it acknowledged: their transcripts tell)
        said = [t for sid in ("a", "b") for t in transcripts(client, sid)]
        assert {t.sid for t in said} == {"a", "b"}
        assert {t.out_sr for t in said if t.sid == "a"} == {24000}
        # every bad frame was counted, and the workers are still alive
        # (by reason: s2s.frames.REASONS; the garbage entries decode to a non-map)
        vad_bad = {r: metric(client, "vad", "s2s_bad_frames_total", reason=r)
                   for r in ("wrong_type", "odd_length", "bad_rate", "wrong_session",
                             "too_large", "invalid_audio")}
        assert vad_bad == {"wrong_type": 2, "odd_length": 1, "bad_rate": 1, "wrong_session": 1,
                           "too_large": 1, "invalid_audio": 1}
        assert metric(client, "stt", "s2s_bad_frames_total", reason="odd_length") == 1
        assert vad.poll() is None
        assert json.loads(client.get(keys.vad_state("a")))["in_sr"] == 16000
        await bus.emit(SessionEnd(sid="a"))
        await wait_until(lambda: client.xpending(keys.SESSIONS, "vad")["pending"] == 1, 5,
                         "session a released")
        # an ended session's snapshot is dropped (a reopened session starts anew)
        assert client.exists(keys.vad_state("a")) == 0 and client.exists(keys.vad_pos("a"))
    finally:
        await bus.close()
        client.close()


async def test_vad_worker_killed_mid_session_is_replaced(workers, settings):
    client = redis.Redis.from_url(settings.redis_url)
    procs = [workers.start("vad"), workers.start("vad"), workers.start("stt")]
    workers.wait_ready("vad", count=2)
    workers.wait_ready("stt")
    bus = Bus(settings)
    try:
        await bus.emit(SessionOpen(sid="k"))
        pcm = jfk_with_tail(16000)
        cut = int(3.0 * 16000)  # after "and so my fellow Americans"
        await send_live(bus, "k", pcm[:cut], 16000)
        await wait_until(lambda: transcripts(client, "k"), 10, "first transcript")

        pending = client.xpending_range(keys.SESSIONS, "vad", "-", "+", 10)
        owner_pid = int(pending[0]["consumer"].decode().split("-")[-2])
        owner = next(p for p in procs if p.pid == owner_pid)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        killed_at = time.monotonic()

        sending = asyncio.create_task(send_live(bus, "k", pcm[cut:], 16000))

        def owner_now() -> str:
            entries = client.xpending_range(keys.SESSIONS, "vad", "-", "+", 10)
            return entries[0]["consumer"].decode() if entries else ""
        await wait_until(lambda: f"-{owner_pid}-" not in owner_now(), 5, "takeover")
        assert time.monotonic() - killed_at < 5  # claim_idle_s is 1.0 here
        await sending
        done = await wait_until(
            lambda: [t for t in transcripts(client, "k") if t.end_s > 6], 10,
            "a transcript after the takeover")
        assert any(LAST_WORDS in re.sub(r"[^a-z ]", "", t.text.lower()) for t in done), done
        assert metric(client, "vad", "s2s_stage_claimed_total") >= 1
        # positions go on on the session's audio timeline across the takeover (the new
        # owner restored the dead one's snapshot), they do not restart at 0; and the
        # thought in progress at the takeover (the pause at the cut may still be
        # continued) is re-read from its start, so the last transcript covers it whole:
        # the speech is at 0.3-2.2, 3.3-4.4, 5.4-7.7 and 8.2-11.0 s of the session's audio
        said = transcripts(client, "k")
        before = [t for t in said if t.end_s < cut / 16000]
        after = [t for t in said if t not in before]
        assert before and after, [(t.start_s, t.end_s) for t in said]
        assert abs(after[-1].start_s - before[0].start_s) <= 0.3, \
            [(t.start_s, t.end_s) for t in said]
        assert abs(after[-1].end_s - 11.0) <= 0.5, [(t.start_s, t.end_s) for t in said]
        assert abs(done[-1].end_s - 11.0) <= 0.5  # what the client sees
        started = [f.at_s for f in frames_in(client, keys.out("k"))
                   if isinstance(f, SpeechStarted)]
        assert started == sorted(started) and started[0] < 0.5 and started[-1] > 8.0, started
        # the snapshot follows the audio: every sample sent has been counted
        # (the latest one: the state a new owner resumes from may lie before, see above)
        await wait_until(lambda: json.loads(client.get(keys.vad_state("k")) or b"{}")
                         .get("latest", {}).get("in_samples") == len(pcm), 5,
                         "the snapshot at the end")
    finally:
        await bus.close()
        client.close()
