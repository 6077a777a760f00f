"""SttStage with the bundled faster-whisper tiny.en on real speech (no Redis)."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

from s2s import config
from s2s.frames import Utterance
from s2s.services.stt.worker import (DROPPED, Heard, MicroBatcher, SttStage, drop_reason, is_loop,
                                 looks_complete)
from tests.conftest import DATA, JFK_TEXT, load_pcm16

SR = 16000


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length (case and
    punctuation ignored)."""
    ref = re.findall(r"[a-z0-9']+", reference.lower())
    hyp = re.findall(r"[a-z0-9']+", hypothesis.lower())
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / max(len(ref), 1)


@pytest.fixture(scope="module")
def stt():
    stage = SttStage(config.load({}, environ={}))
    stage.setup()
    return stage


def utterance(pcm: np.ndarray, **kw) -> Utterance:
    return Utterance(sid="s1", turn=3, pcm=pcm.astype(np.int16).tobytes(), sr=SR,
                     marks={"speech_end": 123.0}, **kw)


async def transcribe(stt, utt):
    return [t async for t in stt.process(utt)]


def dropped(reason: str) -> float:
    return DROPPED.labels(reason)._value.get()


def test_wer():
    assert wer("ask not what", "Ask not, what!") == 0
    assert wer("a b c d", "a x c") == 0.5


@pytest.mark.slow
async def test_jfk_transcript(stt):
    out = await transcribe(stt, utterance(load_pcm16(DATA / "jfk.wav"), start_s=0.3, end_s=11.0,
                                          out_sr=24000))
    assert len(out) == 1
    t = out[0]
    assert wer(JFK_TEXT, t.text) <= 0.10, t.text
    assert (t.sid, t.turn, t.language, t.start_s, t.end_s, t.out_sr) == ("s1", 3, "en", 0.3, 11.0,
                                                                        24000)
    assert 0.5 < t.confidence <= 1
    assert t.complete
    assert t.marks["speech_end"] == 123.0 and t.marks["stt_done"] > 123.0


@pytest.mark.slow
async def test_fragments_cut_at_pauses(stt):
    """jfk.wav cut at its pauses: each fragment is transcribed on its own."""
    pcm = load_pcm16(DATA / "jfk.wav")
    expected = ["and so my fellow americans", "ask not", "what your country can do for you",
                "ask what you can do for your country"]
    for (start, end), words in zip([(0.2, 2.4), (3.2, 4.5), (5.3, 7.8), (8.1, 11.0)], expected):
        out = await transcribe(stt, utterance(pcm[int(start * SR):int(end * SR)]))
        assert len(out) == 1 and wer(words, out[0].text) <= 0.25, out


@pytest.mark.slow
async def test_silence_and_noise_make_no_transcript(stt):
    rng = np.random.default_rng(0)
    before = sum(dropped(r) for r in ("empty", "no_speech", "hallucination"))
    for audio in (np.zeros(2 * SR), rng.normal(0, 0.1, 2 * SR), rng.normal(0, 0.002, SR),
                  0.3 * np.sin(2 * np.pi * 50 * np.arange(SR) / SR)):
        assert await transcribe(stt, utterance(np.clip(audio, -1, 1) * 32767)) == []
    assert sum(dropped(r) for r in ("empty", "no_speech", "hallucination")) == before + 4


@pytest.mark.slow
async def test_other_rates_are_resampled(stt):
    pcm = load_pcm16(DATA / "jfk.wav", 8000)
    out = await transcribe(stt, Utterance(sid="s1", pcm=pcm.tobytes(), sr=8000))
    assert wer(JFK_TEXT, out[0].text) <= 0.15, out[0].text


def test_looks_complete_on_what_whisper_wrote_at_real_pauses():
    # from jfk.wav and lecture.wav cut by the VAD at their pauses
    for text in ("And the answer that comes back is...", "capital in the 21st century. I use for a...",
                 "So when I think about normative questions,", "of", "and says how do I get to the",
                 "It was, um", "I was going to"):
        assert not looks_complete(text), text
    for text in ("ask what you can do for your country", "What your country can do for you.",
                 "Well, I wouldn't start from here, Sonny.", "Well good luck with that.",
                 "global wealth tax.", "Where are you from?", "Ask not!"):
        assert looks_complete(text), text


def test_drop_rules():
    def heard(text, lp=-0.3, nsp=0.05):
        return Heard(text, lp, nsp)
    assert drop_reason(heard(""), -20) == "empty"
    assert drop_reason(heard(" . "), -20) == "empty"
    assert drop_reason(heard("[BLANK_AUDIO]"), -20) == "empty"
    assert drop_reason(heard("(music)"), -20) == "empty"
    assert drop_reason(heard("I don't know.", lp=-1.3, nsp=0.9), -30) == "no_speech"
    assert drop_reason(heard("Thank you.", nsp=0.2), -60) == "hallucination"
    assert drop_reason(heard("Thanks for watching!", nsp=0.4), -30) == "hallucination"
    assert drop_reason(heard("you", lp=-0.9, nsp=0.4), -50) == "hallucination"
    # a loud, clear "thank you" is what the user said
    assert drop_reason(heard("Thank you.", nsp=0.05), -25) is None
    assert drop_reason(heard("Ask not!", lp=-0.6, nsp=0.2), -30) is None


def test_loop_detection():
    assert is_loop("when I think about it, when I think about it, when I think about it,")
    assert is_loop("no " * 60)
    assert not is_loop("And so my fellow Americans ask not what your country can do for you.")
    assert not is_loop("no no no")


async def test_micro_batcher_gathers_waiting_items():
    """The GPU path's batching, without a GPU: items waiting together share one call."""
    calls = []

    def fn(items):
        calls.append(list(items))
        return [i * 2 for i in items]

    async def run(f, *args):
        return f(*args)

    batcher = MicroBatcher(fn, 4, run, wait_s=0.01)
    assert await asyncio.gather(*[batcher.submit(i) for i in range(6)]) == [0, 2, 4, 6, 8, 10]
    assert [len(c) for c in calls] == [4, 2]
    lone = asyncio.create_task(batcher.submit(7))  # a cancelled (stale) item is skipped
    await asyncio.sleep(0)
    lone.cancel()
    assert await batcher.submit(8) == 16 and calls[-1] == [8]


def test_concurrency_follows_the_device():
    cpu = SttStage(config.load({"device": "cpu"}, environ={}))
    cuda = SttStage(config.load({"device": "cuda", "stt_batch_size": 6}, environ={}))
    assert (cpu.concurrency, cuda.concurrency) == (1, 6)
