"""The LLM stage with the real model (transformers backend, the CPU default), through
a real Redis and the worker runtime.  The scenario helpers here are shared with
tests/test_llm_vllm.py (vllm and openai backends)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from s2s import config, frames, keys
from s2s.frames import ReplyText, Transcript
from s2s.worker import Runtime

# SmolLM2-135M needs a plain, explicit prompt to answer facts and use the context
SYSTEM = config.Settings().llm_system_prompt  # the default prompt, as users get it


def llm_settings(redis_url: str, backend: str, **extra) -> config.Settings:
    return config.load({"redis_url": redis_url, "metrics_port": 0, "llm_backend": backend,
                        "llm_system_prompt": SYSTEM, "llm_max_tokens": 48, **extra}, environ={})


async def replies(rt: Runtime, sid: str, turn: int | None = None) -> list[ReplyText]:
    out = []
    for _, fields in await rt.bus.redis.xrange(keys.out(sid)):
        f = frames.decode(fields[b"f"])
        if isinstance(f, ReplyText) and (turn is None or f.turn == turn):
            out.append(f)
    return out


async def ask(rt: Runtime, sid: str, turn: int, text: str, complete: bool = True,
              speech_end: float | None = None) -> tuple[str, list[ReplyText], float]:
    """One transcript through the stage as the runtime runs it: outcome, replies, and
    seconds from transcript in to the first chunk out."""
    frame = Transcript(sid=sid, turn=turn, text=text, complete=complete,
                       marks={"speech_end": speech_end or time.time()}, out_sr=24000)
    t0 = time.time()
    outcome = await rt.run_item(frame, t0)
    got = await replies(rt, sid, turn)
    first = got[0].marks["llm_first"] - t0 if got else float("nan")
    return outcome, got, first


def check_reply(got: list[ReplyText]) -> str:
    """The chunks of one reply are well formed; returns the whole text."""
    assert [r.seq for r in got] == list(range(len(got)))
    assert [r.final for r in got] == [False] * (len(got) - 1) + [True]
    assert all(r.text or r.final for r in got)
    assert "llm_first" in got[0].marks and "speech_end" in got[0].marks
    assert all(r.out_sr == 24000 for r in got)
    return " ".join(r.text for r in got)


async def scenario_paris(rt: Runtime) -> dict:
    outcome, got, first = await ask(rt, "paris", 0, "What is the capital of France?")
    text = check_reply(got)
    return {"outcome": outcome, "text": text, "first_chunk_s": first,
            "saved": await rt.stage.state.load("paris")}


async def scenario_context(rt: Runtime) -> dict:
    await ask(rt, "anna", 0, "Hi, my name is Anna.")
    await rt.bus.advance_turn("anna")
    outcome, got, _ = await ask(rt, "anna", 1, "What is my name?")
    _, control, _ = await ask(rt, "nobody", 0, "What is my name?")  # same question, no context
    return {"outcome": outcome, "text": check_reply(got), "control": check_reply(control)}


async def scenario_barge_in(rt: Runtime, max_tokens: int = 200) -> dict:
    """Advance the turn while the reply is being generated: how long until the backend
    stops, and what the history keeps."""
    stage, sid = rt.stage, "rome"
    stage.settings.llm_max_tokens = max_tokens
    try:
        task = asyncio.create_task(ask(rt, sid, 0, "Tell me about the history of Rome."))
        deadline = time.monotonic() + 60
        while not await replies(rt, sid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        running_before = stage.backend.running
        t0 = time.monotonic()
        await rt.bus.advance_turn(sid)
        while stage.backend.running and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.002)
        stop_s = time.monotonic() - t0
        outcome, got, _ = await task
    finally:
        stage.settings.llm_max_tokens = 48
    saved = (await stage.state.load(sid))["history"]
    return {"running_before": running_before, "stop_s": stop_s, "outcome": outcome,
            "sent": " ".join(r.text for r in got), "final_sent": any(r.final for r in got),
            "saved": [m["content"] for m in saved if m["role"] == "assistant"]}


def assert_scenarios(paris: dict, context: dict, barge: dict) -> None:
    assert paris["outcome"] == "ok" and "Paris" in paris["text"], paris
    hist = paris["saved"]["history"]
    assert [m["role"] for m in hist] == ["user", "assistant"] and \
        hist[1]["content"] == paris["text"]
    assert context["outcome"] == "ok" and "Anna" in context["text"], context
    assert "Anna" not in context["control"], context
    assert barge["running_before"] >= 1 and barge["outcome"] == "stale", barge
    assert barge["stop_s"] <= 0.1, f"generation went on {barge['stop_s'] * 1000:.0f} ms"
    assert not barge["final_sent"]
    assert barge["saved"] == [barge["sent"]], barge  # only what was sent is remembered


# --- transformers (CPU default) -----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_stage():
    from s2s.services.llm.worker import LlmStage

    stage = LlmStage(llm_settings("redis://unused", "transformers"))
    stage.setup()  # first run ever: converts the GGUF (~30 s), then < 2 s
    return stage


@pytest.fixture
def hf_runtime(hf_stage, settings):
    hf_stage.settings.redis_url = settings.redis_url
    rt = Runtime(hf_stage, hf_stage.settings)
    yield rt


@pytest.mark.slow
async def test_transformers_answers_remembers_and_stops_on_barge_in(hf_runtime):
    paris = await scenario_paris(hf_runtime)
    context = await scenario_context(hf_runtime)
    barge = await scenario_barge_in(hf_runtime)
    print(f"\nfirst chunk {paris['first_chunk_s'] * 1000:.0f} ms: {paris['text']!r}; "
          f"context: {context['text']!r}; barge-in stop {barge['stop_s'] * 1000:.0f} ms")
    assert_scenarios(paris, context, barge)
    await hf_runtime.bus.close()


@pytest.mark.slow
async def test_pause_mid_sentence_is_held_then_merged(hf_runtime):
    rt, s = hf_runtime, hf_runtime.stage.settings
    hold, s.llm_turn_hold_ms = s.llm_turn_hold_ms, 600
    try:
        # an incomplete transcript waits for the hold; the user goes on meanwhile
        t0 = time.time()
        task = asyncio.create_task(ask(rt, "pause", 0, "What is the capital", complete=False,
                                       speech_end=t0))
        await asyncio.sleep(0.3)
        await rt.bus.advance_turn("pause")
        outcome, got, _ = await task
        assert outcome == "stale" and got == []
        # the continuation is answered as one sentence
        outcome, got, _ = await ask(rt, "pause", 1, "of France?")
        assert outcome == "ok" and "Paris" in check_reply(got)
        hist = (await rt.stage.state.load("pause"))["history"]
        assert [m["content"] for m in hist[:2]] == ["What is the capital", "of France?"]
        # an incomplete transcript nobody continues is answered after the hold
        t0 = time.time()
        await rt.bus.advance_turn("pause")
        outcome, got, _ = await ask(rt, "pause", 2, "Thank you", complete=False, speech_end=t0)
        assert outcome == "ok" and got[0].marks["llm_first"] >= t0 + 0.6
        # a finished statement waits as long as its end-of-turn signals doubt it (the
        # LLM's own probability here): less than words that dangle, never a fixed hold
        held_before = REGISTRY.get_sample_value("s2s_llm_turn_hold_seconds_sum")
        t0 = time.time()
        await rt.bus.advance_turn("statement")
        outcome, got, _ = await ask(rt, "statement", 1, "I need to buy milk.", speech_end=t0)
        held = REGISTRY.get_sample_value("s2s_llm_turn_hold_seconds_sum") - held_before
        assert 0 <= held < 0.6 < s.llm_statement_hold_ms / 1000
        assert outcome == "ok" and got[0].marks["llm_first"] >= t0 + held
    finally:
        s.llm_turn_hold_ms = hold
        await rt.bus.close()


def test_unknown_backend_and_missing_extras_fail_with_a_hint(monkeypatch):
    import builtins

    from s2s.services.llm.backends import BackendUnavailable, create

    with pytest.raises(BackendUnavailable, match="transformers, vllm, openai"):
        create(config.load({"llm_backend": "nope"}, environ={}))
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
        (_ for _ in ()).throw(ImportError("no vllm")) if name == "vllm"
        else real_import(name, *a, **k)))
    with pytest.raises(BackendUnavailable, match="install.sh --vllm"):
        create(config.load({"llm_backend": "vllm"}, environ={})).setup()
    with pytest.raises(BackendUnavailable, match="S2S_LLM_OPENAI_BASE_URL"):
        create(config.load({"llm_backend": "openai",
                            "llm_openai_base_url": "http://127.0.0.1:9/v1"}, environ={})).setup()


@pytest.mark.slow
def test_conversion_cache_is_atomic_and_reused(tmp_path, monkeypatch):
    """A second conversion of the same GGUF reuses the folder; a half-written temp
    folder never becomes the cache."""
    from s2s.services.llm.backends import model_files

    gguf = model_files.bundled_gguf()
    first = model_files.converted(gguf, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_files.converted(gguf, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp folders left


@pytest.mark.slow
def test_held_turns_do_not_block_other_sessions(workers, settings):
    """`python -m s2s worker llm`: transcripts on s2s:llm, replies on s2s:out:{sid}.
    Unfinished sentences wait for the user outside the model's slots: with more held
    turns than the worker has slots, another session's finished question is answered
    while they all still wait (issue 10 item 5)."""
    import redis

    from s2s.services.llm.backends.hf import TransformersBackend

    hold_ms = 6000
    workers.start("llm", env={"S2S_LLM_SYSTEM_PROMPT": SYSTEM, "HF_HUB_OFFLINE": "1",
                              "S2S_LLM_TURN_HOLD_MS": str(hold_ms)})
    workers.wait_ready("llm", timeout=180)
    client = redis.Redis.from_url(settings.redis_url)
    now = time.time()
    held = [f"h{i}" for i in range(TransformersBackend.concurrency + 1)]
    for sid in held:
        client.xadd(keys.STAGE_STREAMS["llm"], {b"f": frames.encode(Transcript(
            sid=sid, turn=0, text="I was wondering whether", complete=False,
            marks={"speech_end": now}))})
    client.xadd(keys.STAGE_STREAMS["llm"], {b"f": frames.encode(Transcript(
        sid="asked", turn=0, text="What is the capital of France?",
        marks={"speech_end": now}))})

    def replies_of(sid: str) -> list[ReplyText]:
        return [f for _, fl in client.xrange(keys.out(sid))
                if isinstance(f := frames.decode(fl[b"f"]), ReplyText)]

    deadline, got = time.monotonic() + 60, []
    while time.monotonic() < deadline and not (got and got[-1].final):
        got = replies_of("asked")
        time.sleep(0.05)
    assert got and got[-1].final and "Paris" in " ".join(r.text for r in got)
    # and the held turns are still answered once their silence has lasted
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(replies_of(sid) for sid in held):
        time.sleep(0.1)
    for sid in held:
        first = replies_of(sid)[0]
        assert first.marks["llm_first"] >= now + hold_ms / 1000
        # the question's answer began while they all still waited (its whole reply may
        # end after their hold on a loaded machine: the marks say what came first)
        assert got[0].marks["llm_first"] < first.marks["llm_first"], "a held turn went first"
