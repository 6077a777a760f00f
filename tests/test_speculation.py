"""Speculative turns (vad_speculate_ms): the VAD sends the utterance at a short pause,
the gateway holds the turn's output until the full min silence confirms it, and a
user who goes on supersedes it (new turn) without anything of it being played.

The VAD tests run the real silero model on real (synthesized and recorded) speech
without Redis; the end-to-end tests run every stage and a gateway on a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s2s.frames import Audio, SessionOpen, TurnStatus, Utterance
from s2s.services.vad.worker import CHUNK, SPECULATIONS, SR
from tests.conftest import DATA, load_pcm16
from tests.test_vad import T0, make_stage, stream, utterances

pytestmark = pytest.mark.slow

GAP_S = 0.2  # a pause longer than vad_speculate_ms (120) and shorter than the min silence


def espeak_pcm(text: str) -> np.ndarray:
    from s2s.bench.eval_set import espeak, trim_silence

    return trim_silence(espeak("en-us", text))


def piper_pcm(text: str) -> np.ndarray:
    """``text`` spoken by the bundled Piper voice, 16 kHz int16, silence trimmed."""
    from s2s.bench.eval_set import piper_speech, trim_silence

    return trim_silence(piper_speech([text])[0])


@pytest.fixture(scope="module")
def france():
    """'What is the capital ... of the country France?': a pause mid-question, then the
    rest ('... of France?' alone, tiny.en hears as 'a France')."""
    silence = lambda s: np.zeros(int(s * SR), np.int16)  # noqa: E731
    first, second = piper_pcm("What is the capital"), piper_pcm("of the country France?")
    return {"paused": np.concatenate([silence(0.5), first, silence(GAP_S), second, silence(1)]),
            # the same words without the pause (tiny.en hears Piper's "capital of France?"
            # as "of friends" under some paddings: 8 of 40; this, 40 of 40)
            "plain": np.concatenate([silence(0.5),
                                     piper_pcm("What is the capital of the country France?"),
                                     silence(1)])}


@pytest.fixture(scope="module")
def spec_stage():
    return make_stage(vad_speculate_ms=150)


def counts() -> tuple[float, float]:
    return (SPECULATIONS.labels("used")._value.get(), SPECULATIONS.labels("wasted")._value.get())


def kinds(outputs) -> list[str]:
    return [f"{type(o).__name__}:{o.status}" if isinstance(o, TurnStatus) else type(o).__name__
            for o, _ in outputs]


async def test_a_pause_mid_question_is_speculated_then_superseded(spec_stage, france):
    used, wasted = counts()
    outputs = await stream(spec_stage, france["paused"])
    assert kinds(outputs) == ["SpeechStarted", "TurnStatus:tentative", "Utterance",
                              "TurnStatus:tentative", "Utterance", "TurnStatus:committed"]
    turn = outputs[0][0].turn
    early, final = utterances(outputs)
    assert early.speculative and final.speculative
    # the speculation was superseded: the whole thought went on in a new turn
    assert (early.turn, final.turn, outputs[-1][0].turn) == (turn, turn + 1, turn + 1)
    assert spec_stage.state.turn == turn + 1
    assert final.start_s == early.start_s and final.end_s > early.end_s + GAP_S
    pad = spec_stage.settings.vad_speech_pad_ms / 1000
    assert len(final.pcm) / 2 / SR == pytest.approx(final.end_s - final.start_s + 2 * pad,
                                                    abs=0.01)
    # sent after 150-182 ms of silence; confirmed at the min silence (audio time)
    s = spec_stage.settings
    spec_at, commit_at = outputs[4][1], outputs[5][1]
    assert 0.15 <= spec_at - final.end_s <= 0.15 + 0.04 + CHUNK / SR
    assert s.vad_min_silence_ms / 1000 <= commit_at - final.end_s <= \
        s.vad_min_silence_ms / 1000 + 0.04
    assert counts() == (used + 1, wasted + 1)


async def test_speculation_sends_the_same_utterances_earlier(spec_stage):
    """On jfk.wav (pauses inside the thought), every confirmed speculative utterance is
    the utterance the VAD sends without speculation, at least 100 ms sooner."""
    plain = make_stage()
    pcm = np.concatenate([load_pcm16(DATA / "jfk.wav"), np.zeros(SR, np.int16)])
    ref = [(o, t) for o, t in await stream(plain, pcm) if isinstance(o, Utterance)]
    outputs = await stream(spec_stage, pcm)
    used = []
    for i, (o, t) in enumerate(outputs):
        if isinstance(o, TurnStatus) and o.status == "committed":
            utt, sent = next((u, ut) for u, ut in reversed(outputs[:i])
                             if isinstance(u, Utterance))
            assert utt.turn == o.turn and utt.speculative
            used.append((utt, sent, t))
    assert len(used) == len(ref) == 4
    for (utt, sent, confirmed), (r, decided) in zip(used, ref):
        assert (utt.start_s, utt.end_s, utt.pcm, utt.complete) == \
            (r.start_s, r.end_s, r.pcm, r.complete)
        assert confirmed == pytest.approx(decided) and sent <= decided - 0.1
    # each utterance was announced as tentative, in its own turn, just before it
    for i, (o, _) in enumerate(outputs):
        if isinstance(o, Utterance):
            prev = outputs[i - 1][0]
            assert isinstance(prev, TurnStatus) and prev.status == "tentative" \
                and prev.turn == o.turn


async def test_the_turn_model_verdict_travels_on_the_speculative_utterance(spec_stage, france):
    if spec_stage.turn_model is None:
        pytest.skip("no end-of-turn model installed (scripts/install.sh)")
    outputs = await stream(spec_stage, france["plain"])
    (utt,) = utterances(outputs)
    assert utt.speculative and utt.complete is True  # a finished question


async def _takeover(stage, pcm: np.ndarray, cut: int, sid: str):
    """Feed ``pcm`` to one owner up to sample ``cut``, then resume in a new owner the
    way the session runtime does: from the latest snapshot at or before its
    ``replay_from``, with the newest snapshot under ``latest``."""
    opened = SessionOpen(sid=sid, in_sr=SR, out_sr=24000)
    step = SR // 50
    outputs: list = []

    async def feed(session, lo, hi):
        for i in range(lo, hi, step):
            end = min(i + step, hi)
            frame = Audio(sid=sid, pcm=pcm[i:end].tobytes(), sr=SR,
                          marks={"recv": T0 + end / SR})
            outputs.extend([(o, end / SR) async for o in stage.process(frame, session)])
            marks.append((end, json.loads(json.dumps(stage.snapshot(session)))))

    first = stage.open_session(opened)
    marks = [(0, json.loads(json.dumps(stage.snapshot(first))))]
    await feed(first, 0, cut)
    latest = marks[-1][1]
    pos, snap = [(p, m) for p, m in marks if p <= latest["replay_from"]][-1]
    second = stage.open_session(opened, {**snap, "latest": latest})
    await feed(second, pos, len(pcm))
    return outputs


@pytest.mark.parametrize("after_ms", [-40, 0, 60, 120, 140])
async def test_a_takeover_mid_speculation_neither_loses_nor_repeats_the_turn(
        spec_stage, after_ms):
    """The owner dies around the speculation (ms after it was sent; negative: before).
    The speech starts at 1.37 s, so the new owner replays on another 32 ms chunk grid
    than the dead one's (its events there fall up to a chunk either side: with this
    espeak audio, -40 ms gives a speculation re-lived but never sent, 120 and 140 ms a
    confirmation the new owner's grid puts before the takeover point)."""
    pcm = np.concatenate([np.zeros(int(1.37 * SR), np.int16),
                          espeak_pcm("What is the capital of France?"), np.zeros(SR, np.int16)])
    whole = await stream(spec_stage, pcm, sid="whole")
    assert kinds(whole) == ["SpeechStarted", "TurnStatus:tentative", "Utterance",
                            "TurnStatus:committed"]
    spec_at = whole[1][1]
    cut = int((spec_at + after_ms / 1000) * SR) // (SR // 50) * (SR // 50)
    outputs = await _takeover(spec_stage, pcm, cut, f"cut{after_ms}")
    got = kinds(outputs)
    # one utterance of the question, in one turn, and one confirmation of it (or, when
    # the owner died before the speculation went out, the plain utterance instead)
    assert got in (kinds(whole), ["SpeechStarted", "Utterance"]), got
    utt = utterances(outputs)[0]
    assert len({o.turn for o, _ in outputs}) == 1
    ref = utterances(whole)[0]
    # (on the new owner's chunk grid: within a chunk or two)
    assert utt.start_s == pytest.approx(ref.start_s, abs=CHUNK / SR)
    assert utt.end_s == pytest.approx(ref.end_s, abs=2 * CHUNK / SR)
    if got[-1] == "TurnStatus:committed":
        assert utt.speculative


async def test_speculation_off_or_longer_than_the_min_silence_sends_plain_utterances(france):
    for stage in (make_stage(vad_speculate_ms=0), make_stage(vad_speculate_ms=400)):
        outputs = await stream(stage, france["plain"])
        assert kinds(outputs) == ["SpeechStarted", "Utterance"]
        assert not utterances(outputs)[0].speculative


# --- end to end: every stage and a gateway on a real Redis ---------------------------------
from tests.test_e2e import logs, stack  # noqa: E402,F401  (the module's stack fixture)


def vad_speculations(stack) -> dict[str, float]:
    """``s2s_speculations_total`` by outcome, from the VAD worker's own /metrics."""
    import httpx
    import redis

    members = redis.Redis.from_url(stack.workers.redis_url).zrange("s2s:workers", 0, -1)
    (url,) = [m.decode().split("|", 2)[2] for m in members if m.startswith(b"vad|")]
    text = httpx.get(url.rstrip("/") + "/metrics", timeout=5).text
    out = {"used": 0.0, "wasted": 0.0}
    for line in text.splitlines():
        if line.startswith("s2s_speculations_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def _talk(stack, pcm: np.ndarray, **kwargs):
    import asyncio

    from s2s.client import talk

    return asyncio.run(talk(kwargs.pop("url", stack.url), pcm, SR, reply_timeout_s=90,
                            **kwargs))


def test_a_question_with_a_pause_gets_one_reply_and_nothing_of_the_speculation(stack, france):
    before = vad_speculations(stack)
    result = _talk(stack, france["paused"])
    after = vad_speculations(stack)
    assert not result.timed_out, logs(stack)
    # the pause was speculated on and superseded, then the whole thought confirmed
    assert after["wasted"] >= before["wasted"] + 1 and after["used"] == before["used"] + 1
    heard = [t for t in result.turns if t.transcript or t.reply or t.audio]
    assert len(heard) == 1, [t.to_dict() for t in result.turns]
    (turn,) = heard
    assert "france" in turn.transcript.lower() and "capital" in turn.transcript.lower()
    assert turn.done and turn.audio and turn.reply.strip() and not turn.interrupted
    # the client never got anything of the superseded turn, nor an interrupt for it
    kinds = [e["type"] for e in result.events]
    assert "interrupt" not in kinds, kinds
    assert all(e.get("turn") == turn.turn for e in result.events
               if e["type"] in ("transcript", "reply_text", "audio_start", "audio_chunk",
                                "reply_done")), result.events
    assert kinds.count("audio_start") == 1 and kinds.count("transcript") == 1


def test_a_plain_question_is_answered_and_counted_used(stack, france):
    before = vad_speculations(stack)
    result = _talk(stack, france["plain"])
    after = vad_speculations(stack)
    assert not result.timed_out, logs(stack)
    (turn,) = [t for t in result.turns if t.audio]
    assert "paris" in turn.reply.lower(), (turn.transcript, turn.reply, result.errors)
    assert after["used"] == before["used"] + 1 and after["wasted"] == before["wasted"]
    assert turn.done and result.voice_to_voice_ms is not None and result.voice_to_voice_ms > 0


def test_a_realtime_endpoint_session_gets_the_speculative_turn(stack, france):
    """The paused question over /v1/realtime: one user item (the one its speech_started
    announced, though the transcript comes in the superseding turn) and one response."""
    url = stack.url.rsplit("/ws", 1)[0] + "/v1/realtime"
    before = vad_speculations(stack)
    result = _talk(stack, france["paused"], url=url, protocol="realtime")
    assert not result.timed_out, logs(stack)
    after = vad_speculations(stack)
    assert after["used"] == before["used"] + 1 and after["wasted"] >= before["wasted"] + 1
    assert "france" in result.transcript.lower(), (result.transcript, result.errors)
    assert result.reply.strip() and result.audio, result.to_dict()
    turns = [t.to_dict() for t in result.turns]
    assert len(result.turns) == 1 and result.turns[0].transcript and result.turns[0].audio, turns
    assert "interrupt" not in [e["type"] for e in result.events]
