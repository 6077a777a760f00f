"""SttStage with the bundled faster-whisper tiny.en on real speech; the incremental
decode of continued thoughts with the real VAD's cuts and a real Redis."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from s2s import config, keys
from s2s.audio import pcm16_to_float
from s2s.bench.bench_vad_stt import vad_utterances
from s2s.bench.wer import wer
from s2s.bus import Bus
from s2s.frames import Utterance
from s2s.services.stt.batching import BATCHED, Job, MicroBatcher, group_similar
from s2s.services.stt.incremental import Thought, prefix_of
from s2s.services.stt.worker import DECODES, DROPPED, Heard, SttStage, drop_reason, is_loop, \
    looks_complete, stopped_early
from s2s.stage import SessionState
from tests.conftest import DATA, JFK_TEXT, load_pcm16

SR = 16000


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


@pytest.mark.slow
async def test_a_decode_that_stops_after_the_first_phrase_is_redone(stt):
    """A lecture's last words, a 1.3 s pause, then jfk.wav (one continued thought, as a
    chaos run spoke it): on its short window whisper wrote only "much of political" for
    14 s of speech.  Too few words for the audio: decoded again on the 30 s window."""
    lecture = load_pcm16(DATA / "lecture.wav")[:12 * SR]
    pcm = np.concatenate([lecture[-2 * SR:], np.zeros(int(1.3 * SR), np.int16),
                          load_pcm16(DATA / "jfk.wav")])
    out = await transcribe(stt, utterance(pcm, start_s=0.0, end_s=len(pcm) / SR))
    # the lecture's last words come first, with or without an ellipsis before jfk.wav's
    tail = " ".join(out[0].text.split("...")[-1].split()[-len(JFK_TEXT.split()):])
    assert len(out) == 1 and wer(JFK_TEXT, tail) <= 0.1, out[0].text
    assert stopped_early("much of political", 14.3)
    assert not stopped_early("Paris.", 3.0) and not stopped_early("one two three", 4.0)


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
    cpu = SttStage(config.load({"device": "cpu", "stt_cpu_batch_size": 3}, environ={}))
    one = SttStage(config.load({"device": "cpu", "stt_cpu_batch_size": 1}, environ={}))
    cuda = SttStage(config.load({"device": "cuda", "stt_batch_size": 6}, environ={}))
    assert (cpu.concurrency, one.concurrency, cuda.concurrency) == (3, 1, 6)


# --- incremental STT: a thought continued after pauses -----------------------------------

@pytest.fixture(scope="module")
def jfk_pieces() -> list[Utterance]:
    """jfk.wav as the real VAD sends it: one thought, sent again longer after each pause."""
    pieces = vad_utterances("jfk.wav")
    assert len(pieces) >= 3 and len({u.start_s for u in pieces}) == 1
    return pieces


def decodes(how: str) -> float:
    return DECODES.labels(how)._value.get()


def counts() -> dict[str, float]:
    return {h: decodes(h) for h in ("whole", "incremental", "redone", "same", "miss")}


def worker(stt: SttStage, state: SessionState | None) -> SttStage:
    """Another STT worker with the same loaded model (and its own batcher)."""
    other = SttStage(stt.settings)
    other.whisper = stt.whisper
    other.batcher = None  # the unbatched path: one decode per call
    if state is not None:
        other.state = state
    return other


def with_turn(u: Utterance, turn: int, pcm: bytes | None = None) -> Utterance:
    return Utterance(sid="s1", turn=turn, pcm=pcm if pcm is not None else u.pcm, sr=u.sr,
                     start_s=u.start_s, end_s=u.end_s, marks=dict(u.marks))


@pytest.mark.slow
async def test_continued_thought_decodes_from_the_last_pause_on_any_worker(stt, settings,
                                                                          jfk_pieces):
    """Pieces of one thought alternate between two workers sharing only Redis: every piece
    after the first is decoded incrementally, and the transcripts are as accurate as
    whole decodes of the same pieces."""
    bus = Bus(settings)
    try:
        state = SessionState(bus)
        a, b = worker(stt, state), worker(stt, state)
        whole = worker(stt, None)
        whole.settings = config.load({"stt_incremental": False}, environ={})
        before = counts()
        texts, whole_texts = [], []
        for i, u in enumerate(jfk_pieces):
            out = await transcribe((a, b)[i % 2], with_turn(u, i + 1))
            texts.append(out[0].text)
            whole_texts.append((await transcribe(whole, with_turn(u, i + 1)))[0].text)
        after = counts()
        # every piece decoded once (no redo); the later ones from a pause on, not whole
        assert after["whole"] + after["incremental"] - before["whole"] - before["incremental"] \
            == 2 * len(jfk_pieces)
        assert after["incremental"] - before["incremental"] >= 1
        assert after["redone"] == before["redone"]
        assert wer(JFK_TEXT, texts[-1]) <= 0.10, texts[-1]
        for text, reference in zip(texts, whole_texts):  # each piece, not only the last
            assert wer(reference, text) <= 0.2, (reference, text)
        record = Thought.loads(await bus.redis.get(keys.stage_state("s1", "stt")))
        assert record is not None and record.samples * 2 == len(jfk_pieces[-1].pcm)
        assert 0 < record.base < record.samples and record.base_text
        assert await bus.redis.ttl(keys.stage_state("s1", "stt")) > 0  # expires with the session
    finally:
        await bus.close()


@pytest.mark.slow
async def test_the_next_start_moves_only_when_two_decodes_agree_on_the_seam(stt, jfk_pieces):
    """The words before a pause, counted by this decode and by the last: if they differ
    (a word doubled or lost at the cut), the next piece starts from the same pause."""
    w = worker(stt, None)
    await transcribe(w, with_turn(jfk_pieces[0], 1))
    await transcribe(w, with_turn(jfk_pieces[1], 2))
    good = w.local["s1"]
    assert good.base > 0 and good.base_text  # the first two agreed: it moved
    # as if the last decode had heard one word more before its end than this one will
    w.local["s1"] = Thought(**{**good.__dict__, "text": good.text + " uh"})
    await transcribe(w, with_turn(jfk_pieces[2], 3))
    stuck = w.local["s1"]
    assert (stuck.base, stuck.base_text) == (good.base, good.base_text)
    assert stuck.samples * 2 == len(jfk_pieces[2].pcm)
    out = await transcribe(w, with_turn(jfk_pieces[-1], 4))
    assert wer(JFK_TEXT, out[0].text) <= 0.10, out[0].text


@pytest.mark.slow
async def test_a_record_that_does_not_match_the_audio_is_not_used(stt, settings, jfk_pieces):
    """A miss costs only time: other audio under the same thought start (a VAD takeover
    cut it differently), a malformed record, or none at all -> a whole decode."""
    bus = Bus(settings)
    try:
        w = worker(stt, SessionState(bus))
        first, last = jfk_pieces[0], jfk_pieces[-1]
        await transcribe(w, with_turn(first, 1))
        changed = bytearray(last.pcm)
        changed[100:104] = b"\x10\x00\x10\x00"  # two samples differ inside the known prefix
        before = counts()
        out = await transcribe(w, with_turn(last, 2, bytes(changed)))
        assert decodes("miss") == before["miss"] + 1 and decodes("whole") == before["whole"] + 1
        assert wer(JFK_TEXT, out[0].text) <= 0.10, out[0].text
        for junk in (b"{not json", b'{"start_s": 0.35}', b'{"start_s": 0.35, "sr": 16000, '
                     b'"samples": -5, "crc": 1, "text": "x", "base": 0}'):
            await bus.redis.set(keys.stage_state("s1", "stt"), junk)
            before = counts()
            out = await transcribe(w, with_turn(last, 3))
            assert decodes("whole") == before["whole"] + 1, junk
            assert wer(JFK_TEXT, out[0].text) <= 0.10, out[0].text
    finally:
        await bus.close()


@pytest.mark.slow
async def test_a_redelivered_utterance_is_not_decoded_again(stt, jfk_pieces):
    w = worker(stt, None)
    first = await transcribe(w, with_turn(jfk_pieces[1], 2))
    before = counts()
    again = await transcribe(w, with_turn(jfk_pieces[1], 2))
    assert decodes("same") == before["same"] + 1 and decodes("whole") == before["whole"]
    assert again[0].text == first[0].text


def test_prefix_needs_the_same_audio():
    pcm = np.arange(1000, dtype=np.int16).tobytes()
    t = Thought.loads(Thought(start_s=1.0, sr=SR, samples=400, crc=__import__("zlib").crc32(
        pcm[:800]), text="hi").dumps())
    assert prefix_of(t, pcm, SR, 1.0) is t
    assert prefix_of(t, pcm, SR, 2.0) is None                         # another thought
    assert prefix_of(t, pcm, 8000, 1.0) is None                       # another rate
    assert prefix_of(t, pcm[:600], SR, 1.0) is None                   # less audio than known
    assert prefix_of(t, b"\x01" + pcm[1:], SR, 1.0) is None           # other audio
    assert Thought.loads(b"") is None and Thought.loads(b"[1]") is None
    assert Thought.loads(b'{"start_s": 1, "sr": 16000, "samples": 4, "crc": 0, "text": "a", '
                         b'"base": 9}') is None                        # base past the end


# --- stale work and batching ------------------------------------------------------------

@pytest.mark.slow
def test_superseded_job_skips_the_decoder(stt, jfk_pieces):
    audio = pcm16_to_float(jfk_pieces[0].pcm)
    live, stale = Job(audio), Job(audio)
    stale.stop.set()
    assert stt.whisper.decode_jobs([stale]) == [None]
    heard = stt.whisper.decode_jobs([live])[0]
    assert heard is not None and wer("and so my fellow americans", heard.text) <= 0.25


@pytest.mark.slow
async def test_a_cancelled_stage_call_marks_its_job_stopped(stt, jfk_pieces):
    """What the runtime does to a superseded turn's work: cancel it.  The job's stop is
    set, so a batch not yet at its decoder skips it."""
    jobs = []
    w = worker(stt, None)
    original = w.whisper.decode_jobs

    class Spy:  # the real decode, noting which jobs it was given
        def __call__(self, js):
            jobs.extend(js)
            return original(js)
    w.batcher = MicroBatcher(Spy(), 1, w.run_blocking)
    task = asyncio.create_task(w.heard(pcm16_to_float(jfk_pieces[0].pcm)))
    while not jobs:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert jobs[0].stop.is_set()


def test_group_similar_keeps_short_utterances_apart_from_long_ones():
    def job(seconds, prompt=""):
        return Job(np.zeros(int(seconds * SR), np.float32), prompt)
    jobs = [job(10), job(4), job(4.5), job(1), job(1.5), job(5, "before"), job(4.2, "x")]
    groups = group_similar(jobs, 4)
    assert groups[0] == [3, 4]                 # the shortest first: all under 2 s
    assert [1, 2] in groups and [6, 5] in groups  # similar lengths; prompted ones apart
    assert groups[-1] == [0]                   # 10 s alone, last
    assert sorted(i for g in groups for i in g) == list(range(len(jobs)))
    assert all(len(g) <= 2 for g in group_similar([job(3)] * 5, 2))


@pytest.mark.slow
async def test_waiting_utterances_are_batched_and_heard_the_same(stt):
    """Three sessions' utterances of similar length wait together: one batch, and each
    transcript is what a decode on its own gives."""
    jfk = load_pcm16(DATA / "jfk.wav")
    lecture = load_pcm16(DATA / "lecture.wav")
    pieces = [jfk[int(0.3 * SR):int(4.5 * SR)], lecture[int(9.3 * SR):int(13.5 * SR)],
              jfk[int(5.3 * SR):int(9.5 * SR)]]
    alone = [(await transcribe(worker(stt, None), Utterance(
        sid=f"a{i}", pcm=p.tobytes(), sr=SR)))[0].text for i, p in enumerate(pieces)]
    w = worker(stt, None)
    w.batcher = MicroBatcher(w.whisper.decode_jobs, 4, w.run_blocking, 0.01, group_similar)
    before = BATCHED._value.get()
    outs = await asyncio.gather(*[transcribe(w, Utterance(sid=f"b{i}", pcm=p.tobytes(), sr=SR))
                                  for i, p in enumerate(pieces)])
    assert BATCHED._value.get() == before + 3
    for (out,), text in zip(outs, alone):
        assert wer(text, out.text) <= 0.1, (text, out.text)


@pytest.mark.slow
async def test_a_short_utterance_is_not_held_behind_a_long_one(stt):
    """Two sessions wait together, one with 15 s of speech and one with 2 s: they are not
    batched, and the short one's transcript comes first."""
    lecture = load_pcm16(DATA / "lecture.wav")
    jfk = load_pcm16(DATA / "jfk.wav")
    w = worker(stt, None)
    w.batcher = MicroBatcher(w.whisper.decode_jobs, 4, w.run_blocking, 0.01, group_similar)
    done: list[str] = []

    async def one(sid, pcm):
        out = await transcribe(w, Utterance(sid=sid, pcm=pcm.tobytes(), sr=SR))
        done.append(sid)
        return out[0].text
    before = BATCHED._value.get()
    long_text, short_text = await asyncio.gather(
        one("long", lecture[int(9.3 * SR):int(24.3 * SR)]),
        one("short", jfk[int(0.2 * SR):int(2.4 * SR)]))
    assert done == ["short", "long"] and BATCHED._value.get() == before
    assert wer("and so my fellow americans", short_text) <= 0.25, short_text
    assert "political philosophy" in long_text.lower(), long_text


@pytest.mark.slow
def test_words_before_a_pause_are_found_alone_and_in_a_batch(stt, jfk_pieces):
    """The word alignment that prepares the next piece: the words before the first pause
    of jfk.wav's second piece, for one utterance and for each member of a batch."""
    audio = pcm16_to_float(jfk_pieces[1].pcm)
    split_s = len(jfk_pieces[0].pcm) / 2 / SR
    alone = stt.whisper.decode_jobs([Job(audio, split_s=split_s)])[0].aligner()
    batch = stt.whisper.decode_jobs([Job(audio, split_s=split_s), Job(audio[:], split_s=split_s),
                                     Job(audio)])
    assert wer("and so my fellow americans", alone) <= 0.2, alone
    assert [h.aligner() for h in batch[:2]] == [alone, alone] and batch[2].aligner is None


@pytest.mark.slow
def test_prompted_utterances_batch_together(stt, jfk_pieces):
    """Continued thoughts of two sessions (previous text of different lengths) share one
    batch; previous text cannot be mixed with none in one."""
    audio = pcm16_to_float(jfk_pieces[-1].pcm)[int(4.6 * SR):]
    heard = stt.whisper.decode_jobs([Job(audio, "And so my fellow Americans, ask not"),
                                     Job(audio, "ask not")])
    for h in heard:
        assert wer("what your country can do for you ask what you can do for your country",
                   h.text) <= 0.2, h.text
    with pytest.raises(ValueError):
        stt.whisper.decode_jobs([Job(audio, "ask not"), Job(audio)])


@pytest.mark.slow
async def test_tool_bias_leads_whisper_to_the_words_the_tools_expect():
    """With the example tools' names, descriptions and unit enum as its prompt
    (stt_tool_bias), tiny.en hears the units of a conversion it mishears without ("How
    many leaders are in Fort Gatland?"); a request it hears either way stays as it was."""
    from s2s.bench.eval_set import espeak

    tools = "examples.voice_tools.tools:TOOLS"
    plain = SttStage(config.load({"llm_tools": tools}, environ={}))
    biased = SttStage(config.load({"llm_tools": tools, "stt_tool_bias": True}, environ={}))
    plain.setup()
    biased.setup()
    units = utterance(espeak("en-us", "How many liters are in four gallons?"))
    heard_plain = (await transcribe(plain, units))[0].text.lower()
    heard = (await transcribe(biased, units))[0].text.lower()
    assert "liters" not in heard_plain and "gallons" not in heard_plain
    assert "liters" in heard and "gallons" in heard
    jfk = utterance(load_pcm16(DATA / "jfk.wav", 16000))
    assert wer(JFK_TEXT, (await transcribe(biased, jfk))[0].text) < 0.1
