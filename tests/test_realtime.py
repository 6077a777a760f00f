"""/v1/realtime with the official `openai` SDK, against a real gateway on a real Redis.

The pipeline stages are played by the test (frames XADDed to the session's streams, as
tests/test_gateway.py does), so the protocol is checked without models; the test with
the real models is in tests/test_realtime_e2e.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import websockets

from s2s import config, keys
from s2s.frames import (Audio, ReplyAudio, ReplyText, SessionOpen, SpeechStarted, Transcript)
from s2s.gateway import g711

from tests.conftest import AUTH_SETTINGS, TEST_API_KEY
from tests.test_gateway import running_gateway, stream_frames

openai = pytest.importorskip("openai")


@pytest.fixture
async def rt(redis_url):
    settings = config.load({"redis_url": redis_url, "max_message_bytes": 64000,
                            "max_audio_rate": 4.0, "max_sessions": 5, **AUTH_SETTINGS},
                           environ={})
    async with running_gateway(settings) as gw:
        client = openai.AsyncOpenAI(api_key=TEST_API_KEY, base_url=gw.http + "/v1",
                                    websocket_base_url=gw.http.replace("http", "ws") + "/v1")
        yield type("RT", (), {"client": client, "bus": gw.bus, "redis": gw.redis,
                              "ws": gw.http.replace("http", "ws") + "/v1/realtime"})
        await client.close()


async def events_until(conn, kind: str, timeout: float = 10.0) -> list:
    got = []
    async with asyncio.timeout(timeout):
        while True:
            got.append(await conn.recv())
            if got[-1].type == kind:
                return got


async def session_id(rt) -> str:
    while not (opens := await stream_frames(rt.redis, keys.SESSIONS)):
        await asyncio.sleep(0.02)
    assert isinstance(opens[-1], SessionOpen) and opens[-1].in_sr == 24000
    return opens[-1].sid


async def audio_seconds(rt, sid: str) -> float:
    return sum(f.seconds for f in await stream_frames(rt.redis, keys.audio(sid))
               if isinstance(f, Audio))


async def play_turn(rt, sid: str, turn: int, text: str, reply: list[str], pcm: bytes):
    marks = {"speech_end": time.time()}
    await rt.bus.emit(SpeechStarted(sid=sid, turn=turn, at_s=0.2),
                      Transcript(sid=sid, turn=turn, text=text, start_s=0.2, end_s=1.0,
                                 marks=marks))
    for seq, piece in enumerate(reply):
        final = seq == len(reply) - 1
        await rt.bus.emit(ReplyText(sid=sid, turn=turn, seq=seq, text=piece, final=final),
                          ReplyAudio(sid=sid, turn=turn, seq=seq, pcm=pcm, sr=24000, last=True,
                                     final=final, marks=marks))


async def test_spoken_turn_events(rt):
    reply_pcm = (np.arange(2400, dtype=np.int16) * 7).tobytes()
    async with rt.client.realtime.connect(model="s2s") as conn:
        created = await events_until(conn, "session.created")
        assert created[-1].session.audio.input.format.rate == 24000
        await conn.session.update(session={"type": "realtime", "instructions": "Be brief.",
                                           "audio": {"input": {"format": {"type": "audio/pcm",
                                                                          "rate": 24000}}}})
        updated = await events_until(conn, "session.updated")
        assert updated[-1].session.instructions == "Be brief."
        speech = np.full(24000, 300, np.int16).tobytes()  # 1 s at 24 kHz, in 100 ms deltas
        for i in range(0, len(speech), 4800):
            await conn.input_audio_buffer.append(audio=base64.b64encode(speech[i:i + 4800]).decode())
        sid = await session_id(rt)
        async with asyncio.timeout(5):
            while await audio_seconds(rt, sid) < 0.99:
                await asyncio.sleep(0.02)
        await play_turn(rt, sid, 1, "Hello there.", ["Hi!", "How are you?"], reply_pcm)
        events = await events_until(conn, "response.done")
    kinds = [e.type for e in events]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
             "response.created", "response.output_item.added", "response.content_part.added",
             "response.output_audio_transcript.delta", "response.output_audio.delta",
             "response.output_audio.done", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    transcript = next(e for e in events
                      if e.type == "conversation.item.input_audio_transcription.completed")
    assert transcript.transcript == "Hello there."
    audio = b"".join(base64.b64decode(e.delta) for e in events
                     if e.type == "response.output_audio.delta")
    assert audio == reply_pcm * 2
    done = events[-1].response
    assert done.status == "completed" and done.usage.output_tokens == 4
    assert done.output[0].content[0].transcript == "Hi! How are you?"


async def test_text_item_and_response_create(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What is the capital of France?"}]})
        added = await events_until(conn, "conversation.item.done")
        assert added[-1].item.content[0].text == "What is the capital of France?"
        sid = await session_id(rt)
        assert not [f for f in await stream_frames(rt.redis, keys.STAGE_STREAMS["llm"])]
        await conn.response.create()
        async with asyncio.timeout(5):
            while not (asked := await stream_frames(rt.redis, keys.STAGE_STREAMS["llm"])):
                await asyncio.sleep(0.02)
        [question] = asked
        assert question.text == "What is the capital of France?" and question.turn == 1
        await rt.bus.emit(ReplyText(sid=sid, turn=1, seq=0, text="Paris.", final=True),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=b"\0\1" * 480, sr=24000,
                                     last=True, final=True))
        events = await events_until(conn, "response.done")
    kinds = [e.type for e in events]
    # typed text is no audio turn: no speech/commit events, and its item is not repeated
    assert "input_audio_buffer.committed" not in kinds
    assert "conversation.item.input_audio_transcription.completed" not in kinds
    assert events[-1].response.output[0].content[0].transcript == "Paris."


async def test_barge_in_cancels_and_truncate(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
        sid = await session_id(rt)
        marks = {"speech_end": time.time()}
        await rt.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1),
                          Transcript(sid=sid, turn=1, text="Tell me a story.", marks=marks),
                          ReplyText(sid=sid, turn=1, seq=0, text="Once upon a time."),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=bytes(48000), sr=24000,
                                     last=True, marks=marks),
                          ReplyText(sid=sid, turn=1, seq=1, text="There was a king."))
        events = await events_until(conn, "response.output_audio_transcript.delta")
        events += await events_until(conn, "response.output_audio.delta")
        item_id = next(e for e in events if e.type == "response.output_item.added").item.id
        # the user talks over the reply: the response ends as cancelled
        await rt.bus.emit(SpeechStarted(sid=sid, turn=2, at_s=3.0))
        events = await events_until(conn, "input_audio_buffer.speech_started")
        done = next(e for e in events if e.type == "response.done")
        assert done.response.status == "cancelled"
        assert events.index(done) < len(events) - 1
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=500)
        truncated = await events_until(conn, "conversation.item.truncated")
        assert truncated[-1].audio_end_ms == 500


async def test_response_cancel_advances_the_turn(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.send({"type": "response.cancel"})
        err = await events_until(conn, "error")
        assert err[-1].error.code == "response_cancel_not_active"
        await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(4800)).decode())
        sid = await session_id(rt)
        assert await rt.bus.advance_turn(sid) == 1  # as the VAD does when speech starts
        await rt.bus.emit(SpeechStarted(sid=sid, turn=1),
                          Transcript(sid=sid, turn=1, text="Count to ten."),
                          ReplyText(sid=sid, turn=1, seq=0, text="One, two, three."))
        await events_until(conn, "response.output_audio_transcript.delta")
        await conn.response.cancel()
        done = await events_until(conn, "response.done")
        assert done[-1].response.status == "cancelled"
        assert await rt.bus.current_turn(sid) == 2  # the cancelled turn is superseded


async def test_push_to_talk_commit_flushes_speech_and_silence(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.session.update(session={"type": "realtime",
                                           "audio": {"input": {"turn_detection": None}}})
        assert (await events_until(conn, "session.updated"))[-1].session.audio.input.turn_detection is None
        await conn.input_audio_buffer.append(audio=base64.b64encode(bytes(2400)).decode())
        await conn.input_audio_buffer.commit()
        assert (await events_until(conn, "error"))[-1].error.code == "input_audio_buffer_commit_empty"
        speech = np.full(24000 * 2, 500, np.int16).tobytes()
        await conn.input_audio_buffer.append(audio=base64.b64encode(speech).decode())
        sid = await session_id(rt)
        await asyncio.sleep(0.3)
        assert await audio_seconds(rt, sid) == 0  # held until the commit
        await conn.input_audio_buffer.clear()
        await events_until(conn, "input_audio_buffer.cleared")
        await conn.input_audio_buffer.append(audio=base64.b64encode(speech).decode())
        await conn.input_audio_buffer.commit()
        committed = await events_until(conn, "input_audio_buffer.committed")
        async with asyncio.timeout(5):
            while (sent := await audio_seconds(rt, sid)) < 2.5:
                await asyncio.sleep(0.05)
        assert sent < 3.5  # the 2 s of speech, plus the silence that ends the utterance
        # when the transcript comes, the already committed item is not committed again
        await rt.bus.emit(SpeechStarted(sid=sid, turn=1), Transcript(sid=sid, turn=1, text="Hi."))
        events = await events_until(conn, "conversation.item.done")
        assert "input_audio_buffer.committed" not in [e.type for e in events]
        assert events[-1].item.id == committed[-1].item_id


async def test_telephony_formats(rt):
    tone = (np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440) * 8000).astype(np.int16)
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "audio": {
            "input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcma"}}}})
        await events_until(conn, "session.updated")
        await conn.input_audio_buffer.append(
            audio=base64.b64encode(g711.encode(tone.tobytes(), "ulaw")).decode())
        sid = await session_id(rt)
        async with asyncio.timeout(5):
            while await audio_seconds(rt, sid) < 0.95:  # 1 s at 8 kHz, as 24 kHz PCM
                await asyncio.sleep(0.02)
        got = np.frombuffer(b"".join(f.pcm for f in await stream_frames(rt.redis, keys.audio(sid))
                                     if isinstance(f, Audio)), np.int16)
        assert 0.6 < np.abs(got).mean() / np.abs(tone).mean() < 1.4
        reply = (np.sin(np.arange(24000) / 24000 * 2 * np.pi * 300) * 8000).astype(np.int16)
        await play_turn(rt, sid, 1, "Hi.", ["Hello."], reply.tobytes())
        events = await events_until(conn, "response.done")
    alaw = b"".join(base64.b64decode(e.delta) for e in events
                    if e.type == "response.output_audio.delta")
    assert 7000 < len(alaw) <= 8000  # 1 s at 8 kHz, one byte a sample
    back = np.frombuffer(g711.decode(alaw, "alaw"), np.int16)
    assert 0.6 < np.abs(back).mean() / np.abs(reply).mean() < 1.4


async def test_malformed_events_get_errors_and_the_session_lives(rt):
    async with websockets.connect(rt.ws, compression=None) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created"
        bad = ["not json", "[1, 2]", json.dumps({"type": 5}), json.dumps({"type": "nope"}),
               json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
               json.dumps({"type": "input_audio_buffer.append", "audio": "AA=="}),  # one byte
               json.dumps({"type": "session.update", "session": {"audio": {"input": {
                   "format": {"type": "audio/pcm", "rate": 16000}}}}}),
               json.dumps({"type": "session.update", "session": {"audio": {"input": {
                   "turn_detection": {"type": "server_vad", "threshold": 7}}}}}),
               json.dumps({"type": "session.update", "session": {"bogus": 1}}),
               json.dumps({"type": "conversation.item.create", "item": {"type": "function_call"}}),
               json.dumps({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 1}),
               json.dumps({"type": "response.cancel", "event_id": "evt_1"})]
        for message in bad:
            await ws.send(message)
        await ws.send(b"\x00\x01")
        errors = []
        async with asyncio.timeout(5):
            while len(errors) < len(bad) + 1:
                event = json.loads(await ws.recv())
                assert event["type"] == "error", event
                errors.append(event["error"])
        assert all(e["type"] and e["message"] and e["code"] for e in errors)
        assert errors[len(bad) - 1]["event_id"] == "evt_1"
        # still serving: a valid update is applied
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"instructions": "Still here."}}))
        event = json.loads(await ws.recv())
        assert event["type"] == "session.updated"
        assert event["session"]["instructions"] == "Still here."


def test_g711_matches_the_reference():
    audioop = pytest.importorskip("audioop")
    pcm = np.arange(-32768, 32768, 3, dtype="<i2").tobytes()
    assert g711.encode(pcm, "ulaw") == audioop.lin2ulaw(pcm, 2)
    assert g711.encode(pcm, "alaw") == audioop.lin2alaw(pcm, 2)
    every = bytes(range(256))
    assert g711.decode(every, "ulaw") == audioop.ulaw2lin(every, 2)
    assert g711.decode(every, "alaw") == audioop.alaw2lin(every, 2)


async def test_client_talk_over_realtime(rt):
    """s2s.client.talk(protocol="realtime") (what `s2s bench --protocol realtime` runs)
    measures the same things as on the native protocol."""
    from s2s.client import talk

    reply_pcm = np.arange(2400, dtype=np.int16).tobytes()

    async def pipeline():
        sid = await session_id(rt)
        async with asyncio.timeout(10):
            while await audio_seconds(rt, sid) < 1.3:
                await asyncio.sleep(0.02)
        await rt.bus.emit(SpeechStarted(sid=sid, turn=1, at_s=0.1))
        await play_turn(rt, sid, 1, "Hello there.", ["Hi!", "How are you?"], reply_pcm)

    task = asyncio.create_task(pipeline())
    result = await talk(rt.ws, np.full(16000, 500, np.int16), 16000, realtime=False, speed=4.0,
                        tail_silence_s=3.0, reply_timeout_s=10, protocol="realtime")
    await task
    assert not result.timed_out and not result.errors, result.to_dict()
    assert result.transcript == "Hello there."
    assert result.reply == "Hi! How are you?"
    assert result.audio == reply_pcm * 2 and result.sample_rate == 24000
    assert result.turns[-1].done and result.voice_to_voice_ms is not None


async def test_realtime_needs_the_same_key_as_native(rt):
    """No key, or a wrong one: the same refusal as on /ws (an error event, close 1008),
    and no session is opened."""
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        async with websockets.connect(rt.ws, additional_headers=headers,
                                      compression=None) as ws:
            event = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert event["type"] == "error" and event["error"]["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd.code == 1008
    assert not await stream_frames(rt.redis, keys.SESSIONS)


async def test_instructions_vad_settings_and_truncate_reach_the_session(rt):
    """session.update's instructions and turn detection, and a truncate, become the
    native session's configure/truncate: the prefs the LLM reads, a SessionConfig frame
    in order with the audio for the VAD, what the user heard of a reply."""
    from s2s.frames import SessionConfig

    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "instructions": "Speak like a pirate.",
                                           "audio": {"input": {"turn_detection": {
                                               "type": "server_vad", "threshold": 0.6,
                                               "silence_duration_ms": 700}}}})
        await events_until(conn, "session.updated")
        sid = await session_id(rt)
        async with asyncio.timeout(5):
            while not [f for f in await stream_frames(rt.redis, keys.audio(sid))
                       if isinstance(f, SessionConfig)]:
                await asyncio.sleep(0.02)
        [config] = [f for f in await stream_frames(rt.redis, keys.audio(sid))
                    if isinstance(f, SessionConfig)]
        assert config.vad == {"threshold": 0.6, "min_silence_ms": 700.0, "speech_pad_ms": 100.0}
        assert (await rt.bus.prefs(sid))["instructions"] == "Speak like a pirate."
        await rt.bus.advance_turn(sid)
        await rt.bus.emit(SpeechStarted(sid=sid, turn=1), Transcript(sid=sid, turn=1, text="Hi."),
                          ReplyText(sid=sid, turn=1, seq=0, text="Ahoy there."),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=bytes(48000), sr=24000,
                                     last=True),  # 1 s
                          ReplyText(sid=sid, turn=1, seq=1, text="Welcome aboard.", final=True),
                          ReplyAudio(sid=sid, turn=1, seq=1, pcm=bytes(48000), sr=24000,
                                     last=True, final=True))
        events = await events_until(conn, "response.done")
        item = next(e for e in events if e.type == "response.output_item.added").item.id
        await conn.conversation.item.truncate(item_id=item, content_index=0, audio_end_ms=700)
        await events_until(conn, "conversation.item.truncated")
        async with asyncio.timeout(5):
            while "heard:1" not in (prefs := await rt.bus.prefs(sid)):
                await asyncio.sleep(0.02)
        assert prefs["heard:1"] == "Ahoy there."  # the second sentence began at 1.0 s
