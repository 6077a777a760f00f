"""Answer when the thought sounds done, recover when it wasn't (issue 19).

The hold after the user's speech scales with the end-of-turn uncertainty
(services/llm/turn_end.py); the LLM's own end-of-turn probability comes from the real
SmolLM2 model; a user who goes on with an answered thought stops the reply, is told
``turn_resumed``, and the whole thought gets one reply (a real stack on a real Redis)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from s2s import config
from s2s.services.llm.turn_end import LLM_DONE, TurnEnd

SR = 16000


# --- the hold -------------------------------------------------------------------------------
def hold(audio, llm, complete=True, asks=False) -> float:
    return TurnEnd(audio, llm, complete, asks, 0.5).hold_ms(1500, 1200)


def test_a_turn_both_models_call_done_is_answered_at_once():
    assert hold(0.95, 0.9) == 0
    assert hold(0.5, LLM_DONE) == 0


def test_the_hold_grows_with_the_doubt_of_either_model():
    holds = [hold(0.95, LLM_DONE * f) for f in (0.9, 0.6, 0.2, 0.0)]
    assert holds == sorted(holds) and 0 < holds[0] < holds[-1] == 1500
    assert hold(0.2, 0.95) > 0 and hold(0.95, LLM_DONE / 2) > 0


def test_questions_are_answered_now_and_dangling_words_wait_longest():
    assert hold(0.01, 0.01, complete=False, asks=True) == 0
    # the audio model heard an end, but the words go on ("and the"): the whole hold
    assert hold(0.9, None, complete=False) == 1500
    # the audio model said incomplete: its probability scales the hold, not a fixed one
    assert 0 < hold(0.3, 0.9, complete=False) < 1500


def test_without_any_model_the_words_keep_the_fixed_holds():
    assert hold(None, None) == 1200 and hold(None, None, complete=False) == 1500
    assert hold(None, 0.9) == 0 and hold(0.9, None) == 0  # one model alone decides


# --- the LLM's own probability --------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    from s2s.services.llm.backends.hf import TransformersBackend

    backend = TransformersBackend(config.load(environ={}))
    backend.setup()
    yield backend
    backend.close()


def chat(text: str, system: str = "You are a helpful assistant.") -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


@pytest.mark.slow
def test_the_llm_hears_a_finished_message_from_one_that_goes_on(llm):
    async def p(text: str) -> float:
        return await llm.end_of_turn(chat(text))

    async def run():
        return [await p(t) for t in ("What is the capital of France?",
                                     "I went to the store and", "My phone number is")]
    done, dangling, unfinished = asyncio.run(run())
    assert 0 <= dangling < done <= 1 and unfinished < done, (done, dangling, unfinished)


@pytest.mark.slow
def test_the_probe_leaves_its_keys_and_values_for_the_reply(llm):
    messages = chat("I need to buy milk.")

    async def run():
        p = await llm.end_of_turn(messages)
        ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        layers, cached = llm.prefix.lookup(list(ids))
        reply = "".join([piece async for piece in llm.stream(messages, 20, 0.0)])
        return p, len(ids), cached, reply
    p, prompt, cached, reply = asyncio.run(run())
    assert 0 <= p <= 1 and reply.strip()
    # everything up to the user's text was computed by the probe: the reply's prefill
    # only adds the assistant opener
    assert prompt - cached <= 6, (prompt, cached)


# --- the VAD: the probability travels, a resumed thought opens its turn sooner ------------
@pytest.mark.slow
async def test_the_audio_probability_travels_and_a_resumed_thought_starts_sooner():
    from s2s.frames import SpeechStarted
    from tests.test_speculation import piper_pcm
    from tests.test_vad import make_stage, stream, utterances

    stage = make_stage()
    s = stage.settings
    pause = np.zeros(int(0.8 * SR), np.int16)
    pcm = np.concatenate([np.zeros(SR // 4, np.int16), piper_pcm("I need a taxi to the airport."),
                          pause, piper_pcm("Tomorrow at six in the morning."), pause])
    outputs = await stream(stage, pcm)
    first, whole = utterances(outputs)
    for utt in (first, whole):
        assert utt.turn_prob is not None and 0 <= utt.turn_prob <= 1
        assert utt.complete == (utt.turn_prob >= s.vad_turn_threshold)
    assert whole.start_s == first.start_s  # the continuation carries the whole thought
    starts = [(o, at) for o, at in outputs if isinstance(o, SpeechStarted)]
    (new, new_at), (resumed, resumed_at) = starts
    assert not new.continues and resumed.continues
    # decided after vad_resume_min_speech_ms of speech instead of vad_min_speech_ms when
    # the pause was called done (a reply may be heard), else after the usual min speech
    # (audio positions: a chunk of 32 ms and a 20 ms frame of slack, no wall clock)
    assert new_at - new.at_s >= s.vad_min_speech_ms / 1000
    quick = s.vad_resume_min_speech_ms if first.complete else s.vad_min_speech_ms
    assert resumed_at - resumed.at_s <= (quick + 32 + 20) / 1000


def test_the_endpointer_opens_a_resumed_thought_after_less_speech():
    """VadSession.step on chunk probabilities (no model): a new thought opens its turn
    after vad_min_speech_ms; speech going on with the last utterance's thought says so
    (SpeechStarted.continues), and opens it after vad_resume_min_speech_ms when that
    pause was called done (the stage sets answered_at), else after the usual min speech."""
    from s2s.frames import SessionOpen
    from s2s.services.vad.worker import CHUNK, VadSession

    s = config.load({"vad_speculate_ms": 0}, environ={})
    session = VadSession(SessionOpen(sid="s", in_sr=SR), s)
    chunks = iter(range(0, 10**9, CHUNK))

    def run(prob: float, seconds: float) -> list[tuple[tuple, float]]:
        events = []
        for _ in range(int(seconds * SR / CHUNK)):
            at = next(chunks)
            events += [(e, (at + CHUNK) / SR) for e in session.step(at, prob)]
        return events

    run(0.0, 0.5)
    (speech, opened_at), = run(0.9, 1.0)
    (utt, _), = run(0.0, 0.6)                      # a pause longer than the min silence
    (going_on, going_on_at), = run(0.9, 1.0)       # ... the thought goes on (not called done)
    (utt, _), = run(0.0, 0.6)
    session.answered_at = utt[2]                   # this pause was called done
    (resumed, resumed_at), = run(0.9, 1.0)         # ... and the thought goes on again
    assert speech[0] == going_on[0] == resumed[0] == "speech" and utt[0] == "utt"
    assert speech[2] is False and going_on[2] is True and resumed[2] is True
    assert opened_at - speech[1] / SR >= s.vad_min_speech_ms / 1000
    assert going_on_at - going_on[1] / SR >= s.vad_min_speech_ms / 1000
    assert resumed_at - resumed[1] / SR <= (s.vad_resume_min_speech_ms + 32) / 1000
    run(0.0, s.vad_continue_ms / 1000 + 0.5)       # a pause beyond the continuation window
    (new, _), = run(0.9, 1.0)
    assert new[2] is False


# --- end to end: the user goes on while the early reply plays -------------------------------
@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """vad, stt, llm, tts and a gateway.  The thought may be continued for 8 s, so that
    a slow reply on a loaded machine still starts within the window."""
    import httpx
    import redis

    from tests.conftest import Workers, gateway_process

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("resume")
    workers = Workers(redis_server.url, tmp)
    try:
        for stage in ("vad", "stt", "llm", "tts"):
            workers.start(stage, env={"S2S_VAD_CONTINUE_MS": "8000"})
        with gateway_process(redis_server.url, tmp) as (http, gateway):
            for stage in ("vad", "stt", "llm", "tts"):
                workers.wait_ready(stage, timeout=240)
            assert httpx.get(f"{http}/healthz", timeout=5).status_code == 200
            yield type("Stack", (), {"url": http.replace("http", "ws", 1) + "/ws",
                                     "redis_url": redis_server.url, "logs": tmp})
    finally:
        workers.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(900)  # four workers and a gateway start on a shared 2-core machine
def test_going_on_over_an_early_reply_stops_it_and_answers_the_whole_thought_once(stack):
    import redis

    from s2s.bench.resume_stop import resume_over_reply
    from tests.test_speculation import piper_pcm

    first = np.concatenate([np.zeros(SR // 4, np.int16),
                            piper_pcm("I would like to book a table for two.")])
    rest = piper_pcm("At the Italian place on Friday night.")
    r = asyncio.run(resume_over_reply(stack.url, first, rest, after_s=0.3))
    assert not r.timed_out and r.first_turn is not None, r.events
    (resumed,) = r.of_type("turn_resumed")
    assert resumed["replaced_turn"] == r.first_turn < resumed["turn"]
    interrupts = r.of_type("interrupt")
    assert interrupts and interrupts[0]["turn"] == resumed["turn"]
    # nothing more of the early reply reached the client after its interrupt
    assert r.old_audio_after_interrupt == 0
    # one reply to the whole thought, heard after the interrupt
    (final,) = r.final_turns
    said = " ".join(e["text"] for e in r.of_type("transcript") if e["turn"] == final).lower()
    assert "table" in said and "friday" in said, r.of_type("transcript")
    assert r.of_type("audio_start")[-1]["turn"] == final
    # the history holds the whole thought once and no answer to the fragment
    keys = redis.Redis.from_url(stack.redis_url).keys("s2s:ctx:*")
    (ctx,) = [json.loads(redis.Redis.from_url(stack.redis_url).get(k)) for k in keys]
    users = [m for m in ctx["history"] if m["role"] == "user"]
    assert len(users) == 1 and "table" in users[0]["content"].lower() \
        and "friday" in users[0]["content"].lower(), ctx
    assert [m["turn"] for m in ctx["history"] if m["role"] == "assistant"] == [final], ctx
