"""VadStage on real speech, without Redis: frames go straight into process()."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from s2s import config
from s2s.audio import rms_dbfs
from s2s.frames import Audio, FrameError, SessionOpen, SpeechStarted, Transcript, Utterance, decode
from s2s.services.vad.worker import CHUNK, SR, SileroVad, VadStage, silero_model_path
from tests.conftest import DATA, JFK_TEXT, load_pcm16
from tests.test_stt import wer

pytestmark = pytest.mark.slow  # loads the silero model

T0 = 1_700_000_000.0  # wall time of session sample 0 in these tests


class FakeState:
    def __init__(self):
        self.turn = 0

    async def advance_turn(self, sid: str) -> int:
        self.turn += 1
        return self.turn

    async def current_turn(self, sid: str) -> int:
        return self.turn


def make_stage(**overrides) -> VadStage:
    """Speculation off unless asked for: these tests check where utterances end (the
    speculative path is compared against this one in tests/test_speculation.py)."""
    overrides.setdefault("vad_speculate_ms", 0)
    stage = VadStage(config.load(overrides, environ={}))
    stage.setup()
    stage.state = FakeState()
    return stage


@pytest.fixture(scope="module")
def stage():
    return make_stage()


@pytest.fixture(scope="module")
def pieces():
    """Continuation off: every utterance is just the speech between two pauses."""
    return make_stage(vad_continue_ms=0)


async def stream(stage: VadStage, pcm: np.ndarray, sr: int = SR, frame_ms: int = 20,
                 sid: str = "s1"):
    """Feed ``pcm`` in live-sized frames; [(output, audio time it was decided at)]."""
    session = stage.open_session(SessionOpen(sid=sid, in_sr=sr, out_sr=24000))
    step = sr * frame_ms // 1000
    outputs = []
    for i in range(0, len(pcm), step):
        end = min(i + step, len(pcm))
        frame = Audio(sid=sid, pcm=pcm[i:end].tobytes(), sr=sr, marks={"recv": T0 + end / sr})
        async for out in stage.process(frame, session):
            outputs.append((out, end / sr))
    return outputs


def utterances(outputs) -> list[Utterance]:
    return [o for o, _ in outputs if isinstance(o, Utterance)]


def offline_segments(pcm: np.ndarray, s: config.Settings) -> list[tuple[float, float]]:
    """Silero's own offline logic over per-chunk probabilities of the whole file.
    It measures a pause at the *start* of its chunk, the stream at the end of the chunk
    just heard, so silero's counterpart of our min silence is one chunk shorter."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    import onnxruntime as ort
    model = ort.InferenceSession(str(silero_model_path()), providers=["CPUExecutionProvider"])
    audio = pcm.astype(np.float32) / 32768
    state, context, probs = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32), []
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[i:i + CHUNK]])[None]
        p, state = model.run(None, {"input": x, "state": state, "sr": np.array(SR, np.int64)})
        probs.append(float(p[0, 0]))
        context = x[0, -64:]
    segs = get_speech_timestamps_from_probs(
        probs, SR, threshold=s.vad_threshold, min_speech_duration_ms=s.vad_min_speech_ms,
        min_silence_duration_ms=s.vad_min_silence_ms - CHUNK * 1000 // SR, speech_pad_ms=0,
        audio_length_samples=len(audio))
    return [(seg["start"] / SR, seg["end"] / SR) for seg in segs]


async def test_lecture_utterances_match_offline_segmentation(pieces):
    stage = pieces
    pcm = load_pcm16(DATA / "lecture.wav")
    outputs = await stream(stage, pcm)
    utts = utterances(outputs)
    reference = offline_segments(pcm, stage.settings)
    assert len(utts) >= 8, "a minute of lecture has many pauses"
    # every streamed utterance is one offline segment, boundaries within 2 chunks
    tolerance = 2 * CHUNK / SR
    assert len(utts) == len(reference)
    for utt, (start, end) in zip(utts, reference):
        assert abs(utt.start_s - start) <= tolerance, (utt.start_s, start)
        assert abs(utt.end_s - end) <= tolerance or end == pytest.approx(len(pcm) / SR), \
            (utt.end_s, end)
    # and the cuts lie in real pauses: quieter than the speech around them
    audio = pcm.astype(np.float32) / 32768
    speech_db = np.median([rms_dbfs(audio[int(u.start_s * SR):int(u.end_s * SR)]) for u in utts])
    for utt in utts[:-1]:
        pause = audio[int(utt.end_s * SR):int((utt.end_s + 0.25) * SR)]
        assert rms_dbfs(pause) < speech_db - 10, utt.end_s


async def test_jfk_utterances_turns_marks_and_decision_delay(pieces):
    stage = pieces
    s = stage.settings
    pcm = np.concatenate([load_pcm16(DATA / "jfk.wav"), np.zeros(SR, np.int16)])
    outputs = await stream(stage, pcm)
    utts = utterances(outputs)
    # the README's speech spans: 0.3–2.3, 3.3–4.4, 5.4–7.7, 8.2–11.0 s
    truth = [(0.3, 2.3), (3.3, 4.4), (5.4, 7.7), (8.2, 11.0)]
    assert len(utts) == len(truth)
    pad = s.vad_speech_pad_ms / 1000
    for utt, (start, end) in zip(utts, truth):
        assert start - 0.15 <= utt.start_s <= start + 0.15
        assert end - 0.5 <= utt.end_s <= end + 0.1
        assert utt.sr == SR and utt.out_sr == 24000
        assert len(utt.pcm) / 2 / SR == pytest.approx(utt.end_s - utt.start_s + 2 * pad, abs=0.01)
        assert utt.marks["speech_end"] == pytest.approx(T0 + utt.end_s, abs=1e-3)
        assert "vad_sent" in utt.marks
    # SpeechStarted (new turn) precedes each utterance, which carries that turn
    kinds = [type(o).__name__ for o, _ in outputs]
    assert kinds == ["SpeechStarted", "Utterance"] * 4
    started = [o for o, _ in outputs if isinstance(o, SpeechStarted)]
    first = started[0].turn
    assert [o.turn for o in started] == [u.turn for u in utts] == list(range(first, first + 4))
    for sp, utt in zip(started, utts):
        assert sp.at_s == pytest.approx(utt.start_s)
    # end of speech decided within min silence + 40 ms (32 ms chunks, 20 ms frames)
    for out, decided in outputs:
        if isinstance(out, Utterance):
            delay = decided - out.end_s
            assert s.vad_min_silence_ms / 1000 <= delay <= s.vad_min_silence_ms / 1000 + 0.04


async def test_jfk_pauses_mid_thought_are_continued(stage):
    """Default settings: each piece after a pause is an utterance of its own turn, but
    starts at the thought's start, so the last one holds the whole sentence."""
    s = stage.settings
    jfk = load_pcm16(DATA / "jfk.wav")
    outputs = await stream(stage, np.concatenate([jfk, np.zeros(SR, np.int16)]))
    utts = utterances(outputs)
    started = [o for o, _ in outputs if isinstance(o, SpeechStarted)]
    assert [type(o).__name__ for o, _ in outputs] == ["SpeechStarted", "Utterance"] * 4
    first = started[0].turn
    assert [o.turn for o in started] == [u.turn for u in utts] == list(range(first, first + 4))
    pad = s.vad_speech_pad_ms / 1000
    for sp, utt, (start, end) in zip(started, utts, [(0.3, 2.3), (3.3, 4.4), (5.4, 7.7),
                                                     (8.2, 11.0)]):
        assert start - 0.15 <= sp.at_s <= start + 0.15       # where this piece began
        assert utt.start_s == utts[0].start_s                 # the utterance: the thought's
        assert end - 0.5 <= utt.end_s <= end + 0.1
        assert utt.marks["speech_end"] == pytest.approx(T0 + utt.end_s, abs=1e-3)
        assert len(utt.pcm) / 2 / SR == pytest.approx(utt.end_s - utt.start_s + 2 * pad, abs=0.01)
    last = utts[-1]
    assert 0.15 <= last.start_s <= 0.45 and 10.5 <= last.end_s <= 11.1
    lo = round((last.start_s - pad) * SR)  # the audio itself, pauses included (±1 of rounding)
    np.testing.assert_allclose(np.frombuffer(last.pcm, np.int16), jfk[lo:lo + len(last.pcm) // 2],
                               atol=1)
    # and the whole thought is transcribed as well as the whole file
    from s2s.services.stt.worker import SttStage

    stt = SttStage(config.load({}, environ={}))
    stt.setup()
    heard = [t async for t in stt.process(last)]
    assert len(heard) == 1 and wer(JFK_TEXT, heard[0].text) <= 0.10, heard
    assert heard[0].complete and heard[0].start_s == last.start_s


async def test_a_thought_is_capped_at_max_length():
    stage = make_stage(vad_max_utterance_s=6.0)
    utts = utterances(await stream(stage, np.concatenate([load_pcm16(DATA / "jfk.wav"),
                                                          np.zeros(SR, np.int16)])))
    # 0.3–4.4 s continue; at 5.4 s the thought would pass 6 s: it is cut there, and
    # speech after that cut starts a new thought
    assert all(u.end_s - u.start_s <= 6.0 + 1e-6 for u in utts)
    assert utts[-1].start_s > 5.0 and utts[1].start_s == utts[0].start_s


async def test_other_input_rates_give_the_same_utterances(stage):
    at16 = [(u.start_s, u.end_s) for u in utterances(
        await stream(stage, load_pcm16(DATA / "jfk.wav")))]
    for sr in (8000, 44100, 48000):
        got = [(u.start_s, u.end_s) for u in utterances(
            await stream(stage, load_pcm16(DATA / "jfk.wav", sr), sr=sr, sid=f"r{sr}"))]
        assert len(got) == len(at16), sr
        for (a, b), (c, d) in zip(got, at16):
            assert abs(a - c) <= 0.07 and abs(b - d) <= 0.07, (sr, got, at16)


async def test_silence_and_noise_make_no_utterance(stage):
    rng = np.random.default_rng(0)
    silence = np.zeros(5 * SR, np.int16)
    noise = (rng.normal(0, 0.1, 5 * SR) * 32767).astype(np.int16)
    hum = (0.3 * np.sin(2 * np.pi * 50 * np.arange(5 * SR) / SR) * 32767).astype(np.int16)
    for pcm in (silence, noise, hum):
        assert await stream(stage, pcm) == []


async def test_long_speech_is_cut_at_max_length():
    stage = make_stage(vad_max_utterance_s=3.0)
    utts = utterances(await stream(stage, load_pcm16(DATA / "lecture.wav")))
    pad = stage.settings.vad_speech_pad_ms / 1000
    assert max(u.end_s - u.start_s for u in utts) <= 3.0 + 1e-6
    assert max(len(u.pcm) / 2 / SR for u in utts) <= 3.0 + 2 * pad + 1e-6
    # a continued monologue opens a new turn for each piece
    assert [u.turn for u in utts] == sorted(set(u.turn for u in utts))


async def test_bad_frames_are_rejected_and_the_session_goes_on(stage):
    session = stage.open_session(SessionOpen(sid="bad", in_sr=16000))
    speech = load_pcm16(DATA / "jfk.wav")[:3 * SR]

    async def run(frame):
        return [o async for o in stage.process(frame, session)]

    with pytest.raises(ValueError, match="8000 Hz"):  # a rate unlike the session's
        await run(Audio(sid="bad", pcm=speech[:160].tobytes(), sr=8000))
    with pytest.raises(ValueError, match="expected audio"):
        await run(Transcript(sid="bad", text="hi"))
    with pytest.raises(ValueError, match="bad audio frame"):  # minutes in one frame
        await run(Audio(sid="bad", pcm=np.zeros(11 * SR, np.int16).tobytes(), sr=16000))
    # malformed bytes never reach the stage: the decoder rejects them
    raw = {"kind": "audio", "sid": "bad", "pcm": b"\0\0", "sr": 16000}
    for data, why in ((b"\x00garbage", "."),
                      (msgspec.msgpack.encode({**raw, "pcm": b"\0\0\0"}), "16-bit"),
                      (msgspec.msgpack.encode({**raw, "sr": 12345}), "sample rate"),
                      (msgspec.msgpack.encode({**raw, "sr": "16000"}), "int"),
                      (msgspec.msgpack.encode({**raw, "pcm": bytes(200)}), "exceeds")):
        with pytest.raises(FrameError, match=why):
            decode(data, max_bytes=100)
    # the session still works after all that
    outs = []
    for i in range(0, len(speech), 320):
        outs += await run(Audio(sid="bad", pcm=speech[i:i + 320].tobytes(), sr=16000))
    outs += await run(Audio(sid="bad", pcm=np.zeros(SR, np.int16).tobytes(), sr=16000))
    assert any(isinstance(o, Utterance) for o in outs)


async def test_snapshot_restore_keeps_positions_on_the_session_timeline(stage):
    """A takeover: the new owner's session, opened from the dead owner's (JSON) snapshot,
    goes on with the session's audio positions instead of restarting at 0."""
    import json

    for sr in (16000, 48000):
        pcm = np.concatenate([load_pcm16(DATA / "jfk.wav", sr), np.zeros(sr, np.int16)])
        whole = await stream(stage, pcm, sr=sr, sid=f"w{sr}")
        opened = SessionOpen(sid=f"t{sr}", in_sr=sr, out_sr=24000)
        cut = 3 * sr + sr // 50 * 7  # 3.14 s: in the pause after "fellow Americans"
        first = stage.open_session(opened)
        outputs = []
        step = sr // 50

        async def feed(session, lo, hi):
            for i in range(lo, hi, step):
                end = min(i + step, hi)
                frame = Audio(sid=opened.sid, pcm=pcm[i:end].tobytes(), sr=sr,
                              marks={"recv": T0 + end / sr})
                outputs.extend([o async for o in stage.process(frame, session)])

        await feed(first, 0, cut)
        snap = json.loads(json.dumps(stage.snapshot(first)))
        assert snap["in_samples"] == cut
        second = stage.open_session(opened, snap)  # a fresh model, at the same position
        assert second.now_s == pytest.approx(cut / sr)
        await feed(second, cut, len(pcm))
        got = [o for o in outputs if isinstance(o, Utterance)]
        ref = utterances(whole)
        # before the cut: the same; after: the same pieces at the same positions (the
        # thought restarts at the takeover, so the continuation starts at 3.3 s, not 0.3)
        assert len(got) == len(ref) == 4
        assert (got[0].start_s, got[0].end_s) == (ref[0].start_s, ref[0].end_s)
        after = got[1:]
        assert all(cut / sr < u.start_s for u in after)
        assert {u.start_s for u in after} == {after[0].start_s}
        assert after[0].start_s == pytest.approx(3.3, abs=0.15)
        for u, r in zip(after, ref[1:]):
            assert u.end_s == pytest.approx(r.end_s, abs=0.07), (sr, u.end_s, r.end_s)
            assert u.marks["speech_end"] == pytest.approx(T0 + u.end_s, abs=1e-3)
        started = [o.at_s for o in outputs if isinstance(o, SpeechStarted)]
        ref_started = [o.at_s for o, _ in whole if isinstance(o, SpeechStarted)]
        assert started == pytest.approx(ref_started, abs=0.07)
    # no snapshot / an empty one: a fresh session at 0; a malformed one is refused
    assert stage.open_session(SessionOpen(sid="x"), {}).now_s == 0
    for bad in ({"in_samples": "9"}, {"in_sr": 0, "in_samples": 1, "samples_16k": 1},
                {"in_sr": 16000, "in_samples": -1, "samples_16k": 0}):
        with pytest.raises(ValueError, match="bad VAD snapshot"):
            stage.open_session(SessionOpen(sid="x"), bad)


async def test_a_takeover_goes_on_in_the_turn_the_dead_owner_reached():
    """The dead owner advanced the turn after its last snapshot (killed between the two),
    and the replay re-lives that speech start without sending it: the utterance must
    carry the session's current turn, not the snapshot's (it would be dropped as stale:
    a turn lost to a VAD kill in the chaos run)."""
    stage = make_stage()
    pcm = np.concatenate([load_pcm16(DATA / "jfk.wav"), np.zeros(SR, np.int16)])
    opened = SessionOpen(sid="late", in_sr=SR, out_sr=24000)
    dead = stage.open_session(opened)
    before = stage.snapshot(dead)  # the resume point: before the speech
    cut = int(1.5 * SR)            # inside "And so my fellow Americans"
    for i in range(0, cut, SR // 50):
        [o async for o in stage.process(Audio(sid="late", pcm=pcm[i:i + SR // 50].tobytes(),
                                              sr=SR, marks={"recv": T0}), dead)]
    latest = stage.snapshot(dead)
    assert latest["turn"] == stage.state.turn == 1 and latest["replay_from"] == 0
    stage.state.turn += 1          # ...its next advance, after that snapshot was written
    second = stage.open_session(opened, {**before, "latest": latest})
    outputs = []
    for i in range(0, int(3.2 * SR), SR // 50):  # re-read from the start, as the runtime does
        frame = Audio(sid="late", pcm=pcm[i:i + SR // 50].tobytes(), sr=SR, marks={"recv": T0})
        outputs += [o async for o in stage.process(frame, second)]
    assert not [o for o in outputs if isinstance(o, SpeechStarted)]  # re-lived, not sent
    utts = [o for o in outputs if isinstance(o, Utterance)]
    assert utts and utts[0].turn == 2 and utts[0].start_s < 0.5, utts


def test_model_is_silero_v5_with_state_and_context():
    vad = SileroVad()
    names = {i.name for i in vad.session.get_inputs()}
    assert names == {"input", "state", "sr"}
    # streaming in pieces gives the probabilities of one pass over the whole signal
    audio = load_pcm16(DATA / "jfk.wav")[:40 * CHUNK].astype(np.float32) / 32768
    whole, _ = vad.probs(audio, vad.new_state())
    state, parts = vad.new_state(), []
    for lo, hi in ((0, 7), (7, 8), (8, 40)):
        p, state = vad.probs(audio[lo * CHUNK:hi * CHUNK], state)
        parts.append(p)
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)
    assert whole.max() > 0.9 and whole[:5].max() < 0.5


async def test_a_session_config_changes_that_sessions_endpointing(stage):
    """SessionConfig (the Realtime API's turn detection) applies to its session only, from
    where it stands in the audio on, and survives a takeover (it is in the snapshot)."""
    from s2s.frames import SessionConfig

    jfk = load_pcm16(DATA / "jfk.wav")
    default = utterances(await stream(stage, jfk, sid="plain"))
    session = stage.open_session(SessionOpen(sid="patient", in_sr=SR, out_sr=24000))
    outputs = [o async for o in stage.process(
        SessionConfig(sid="patient", vad={"min_silence_ms": 1500.0}), session)]
    assert outputs == [] and session.min_silence == int(1.5 * SR)
    step = SR // 50
    for i in range(0, len(jfk), step):
        frame = Audio(sid="patient", pcm=jfk[i:i + step].tobytes(), sr=SR,
                      marks={"recv": T0 + (i + step) / SR})
        async for out in stage.process(frame, session):
            outputs.append(out)
    patient = [o for o in outputs if isinstance(o, Utterance)]
    # JFK pauses about a second between phrases: 1.5 s of silence hears one utterance
    assert len(patient) < len(default), ([u.end_s for u in patient], [u.end_s for u in default])
    restored = stage.open_session(SessionOpen(sid="patient", in_sr=SR), stage.snapshot(session))
    assert restored.min_silence == int(1.5 * SR)
    assert stage.open_session(SessionOpen(sid="other", in_sr=SR)).min_silence == \
        int(stage.settings.vad_min_silence_ms * SR / 1000)
