"""Fuzz (issue 10, item 8), CI-sized: the frame decoder never raises anything but
``FrameError`` (property tests, thousands of examples); hostile entries into every stage
stream and into live sessions' audio streams, and hostile WebSocket clients into the
gateway (native and Realtime), kill no process, are each counted by the reason the tool
itself expected, and leave a canary session of the same entry point answered.  ``python -m s2s.bench.fuzz``
runs the same with >= 10^5 inputs per entry point."""

from __future__ import annotations

import asyncio
import math
import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2s.bench.fuzz import CLIENT_TARGETS, TARGETS, Fuzzer, Result, expected, hostile, table
from s2s.bench.stack import Stack
from s2s.frames import (REASONS, Audio, FrameError, Notice, ReplyAudio, ReplyText, SessionEnd,
                        SessionOpen, SpeechStarted, Transcript, Utterance, decode, encode)
from s2s.stage import Stage

FIELDS = ["kind", "sid", "v", "turn", "seq", "marks", "pcm", "sr", "in_sr", "out_sr", "text",
          "language", "confidence", "start_s", "end_s", "complete", "final", "chunk", "last",
          "event", "message", "at_s"]
KINDS = ["open", "audio", "end", "speech", "utt", "transcript", "reply", "reply_audio",
         "notice", "nope", ""]
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() |
           st.text(max_size=30) | st.binary(max_size=64) | st.sampled_from(
               [8000, 16000, 16001, 22050, 48000, 0, -1, 2**53, 2**53 - 1, "16000", 1e12, 1e13,
                "a" * 65, "x" * 20001]))
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(
    st.text(max_size=8) | st.just("k" * 65), scalars, max_size=3)
GOOD = [SessionOpen(sid="a"), Audio(sid="a", pcm=b"\1\0\2\0", sr=16000), SessionEnd(sid="a"),
        SpeechStarted(sid="a", turn=3, at_s=1.5), Utterance(sid="a", pcm=b"\0\0", sr=16000),
        Transcript(sid="a", text="hello", marks={"t": 1.0}), ReplyText(sid="a", text="hi"),
        ReplyAudio(sid="a", pcm=b"\0\0", sr=22050, chunk=2), Notice(sid="a", event="error")]


def check(data: bytes) -> None:
    """decode's whole contract: a FrameError with a known reason, or a frame that is
    every bit valid (finite numbers, and it survives its own round trip)."""
    try:
        frame = decode(data, max_bytes=1 << 16)
    except FrameError as e:
        assert e.reason in REASONS, e.reason
        return
    assert decode(encode(frame)) == frame
    for value in [*frame.marks.values(), *(getattr(frame, f, 0.0) for f in
                                           ("start_s", "end_s", "at_s", "confidence"))]:
        assert math.isfinite(value)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_frame_error(data):
    check(data)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=10), st.sampled_from(KINDS),
       st.booleans())
def test_msgpack_of_any_shape_only_ever_raises_frame_error(fields, kind, with_kind):
    if with_kind:
        fields["kind"] = kind
    try:
        data = msgspec.msgpack.encode(fields)
    except Exception:  # e.g. a lone surrogate: not encodable, so not sendable either
        return
    check(data)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(GOOD), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                       max_size=4), st.integers(0, 10**6) | st.none())
def test_corrupted_valid_frames_only_ever_raise_frame_error(frame, flips, cut):
    data = bytearray(encode(frame))
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    check(bytes(data[:cut % (len(data) + 1)] if cut is not None else data))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(TARGETS[:5]), st.integers(0, 2**32))
def test_the_bench_generator_agrees_with_the_decoder(target, seed):
    """Every input the bench sends is classified (never an exception), and without
    ``valid`` it is never a frame the target would accept."""
    cat, data = hostile(target, "victim", random.Random(seed))
    assert expected(target, data, "victim") in REASONS + ("invalid_audio",), cat


# --- the stack: real VAD and STT workers, scripted LLM/TTS stages, the real gateway -------
class ScriptedLlm(Stage):
    """Answers a transcript at once (the runtime's decode and checks are the point)."""
    name = "llm"

    async def process(self, frame: Transcript):
        yield ReplyText(sid=frame.sid, turn=frame.turn, text=f"You said: {frame.text[:60]}",
                        final=True, out_sr=frame.out_sr, marks=dict(frame.marks))


class ScriptedTts(Stage):
    """Answers a reply text with 100 ms of silence."""
    name = "tts"

    async def process(self, frame: ReplyText):
        yield ReplyAudio(sid=frame.sid, turn=frame.turn, seq=frame.seq, pcm=bytes(4410),
                         sr=22050, last=True, final=frame.final, marks=dict(frame.marks))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stages = {"vad": "vad", "stt": "stt", "llm": "tests.test_fuzz:ScriptedLlm",
              "tts": "tests.test_fuzz:ScriptedTts"}
    with Stack(stages, logdir=tmp_path_factory.mktemp("stack"),
               env={"S2S_CLAIM_IDLE_S": "3"}) as s:
        yield s


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", TARGETS)
def test_hostile_inputs_are_counted_and_hurt_no_one(stack, target):
    async def go():
        fz = Fuzzer(stack.redis.url, stack.ws_url, seed=hash(target) % 1000, valid=3,
                    canary_timeout=90, alive=stack.dead)
        try:
            return await fz.run(target, 400)
        finally:
            await fz.close()

    res = asyncio.run(go())
    print(table([res]))
    assert res.sent == 400
    assert res.crashes == [] and stack.dead() == []
    assert res.canary_ok, res.canary
    if target in CLIENT_TARGETS:
        # every error event a client was told is a rejection counted by that reason (a
        # client that was closed early misses some events, so counted >= told)
        assert res.expected and res.counted
        assert all(res.counted.get(code, 0) >= n for code, n in res.expected.items()), res.row()
    else:
        # each rejection counted by the reason this test expected, no more, no less
        assert res.counted == dict(res.expected), res.row()
        assert res.stage_errors == 0, res.row()


async def test_a_failed_gateway_canary_is_a_result_not_an_exception(settings, tmp_path):
    """The canary's failure paths (refused at the hello, nothing listening) each give
    canary_ok False and the reason; they used to raise UnboundLocalError (``heard``)."""
    from s2s.launcher.redis_server import free_port
    from tests.test_gateway import running_gateway

    async def canary(ws_url: str) -> tuple[bool, str]:
        fz = Fuzzer(settings.redis_url, ws_url, canary_timeout=20)
        try:
            return await fz._canary("gateway")
        finally:
            await fz.close()

    async with running_gateway(settings) as gw:
        # the page URL of `s2s up` with a key this gateway does not know
        ok, why = await canary(f"{gw.http}/#key=not-a-key")
    assert not ok and why.startswith("refused: unauthorized"), why
    assert "not-a-key" not in why
    ok, why = await canary(f"ws://127.0.0.1:{free_port()}/ws")
    assert not ok and why.startswith("cannot connect: "), why
    res = Result("gateway", canary_ok=ok, canary=why)
    assert "FAILED: cannot connect" in table([res])
