"""The voice side of a tool call, with the real model and real Redis through the worker
runtime (the deployment's tools of tests/tool_fixtures.py; the session's tool_choice
names the tool, so the model's part is the arguments and the spoken answer):
a slow call gets the filler once; a failed or timed-out call gets an apology; a user
who barges in cancels the follow-up, not the call, whose result is kept; a turn run
again (its worker died after the call) does not call again."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from s2s import frames, keys
from s2s.frames import ReplyText, Transcript
from s2s.worker import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_llm import llm_settings  # noqa: E402

FILLER = "Let me check."
APOLOGY = "Sorry, I could not get that done right now."


@pytest.fixture(scope="module")
def stage():
    from s2s.services.llm.worker import LlmStage

    st = LlmStage(llm_settings("redis://unused", "transformers",
                               llm_tools="tests.tool_fixtures:TOOLS", llm_tool_filler_ms=300,
                               llm_tool_filler=FILLER, llm_tool_timeout_s=2.0))
    st.setup()
    return st


@pytest.fixture
async def rt(stage, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("S2S_TEST_TOOL_LOG", str(tmp_path / "calls.log"))
    stage.settings.redis_url = settings.redis_url
    runtime = Runtime(stage, stage.settings)
    runtime.calls_log = tmp_path / "calls.log"
    yield runtime
    await runtime.bus.close()


def ran(rt) -> list[str]:
    return rt.calls_log.read_text().splitlines() if rt.calls_log.exists() else []


async def replies(rt, sid: str, turn: int) -> list[ReplyText]:
    got = [frames.decode(f[b"f"]) for _, f in await rt.bus.redis.xrange(keys.out(sid))]
    return [f for f in got if isinstance(f, ReplyText) and f.turn == turn]


async def ask(rt, sid: str, turn: int, text: str, tool: str) -> str:
    await rt.bus.set_prefs(sid, tool_choice=tool)
    await rt.bus.redis.set(keys.turn(sid), turn)
    frame = Transcript(sid=sid, turn=turn, text=text, marks={"speech_end": time.time()})
    return await rt.run_item(frame, time.time())


async def history(rt, sid: str) -> list[dict]:
    return json.loads(await rt.bus.redis.get(keys.ctx(sid)))["history"]


@pytest.mark.slow
async def test_slow_call_gets_the_filler_once_then_the_answer(rt, monkeypatch):
    monkeypatch.setenv("S2S_TEST_TOOL_SLEEP", "1.5")
    assert await ask(rt, "slow", 1, "Do you have any raincoats in stock?", "check_stock") == "ok"
    got = await replies(rt, "slow", 1)
    texts = [r.text for r in got]
    print("\n", texts)
    assert texts[0] == FILLER and texts.count(FILLER) == 1
    assert [r.seq for r in got] == list(range(len(got))) and got[-1].final
    assert "17" in " ".join(texts[1:])  # the result, said after the filler
    assert len(ran(rt)) == 1


@pytest.mark.slow
async def test_fast_call_gets_no_filler(rt):
    assert await ask(rt, "fast", 1, "Do you have lamps in stock?", "check_stock") == "ok"
    got = await replies(rt, "fast", 1)
    assert FILLER not in [r.text for r in got] and got[-1].final and len(ran(rt)) == 1


@pytest.mark.slow
async def test_failed_and_timed_out_calls_get_an_apology(rt, monkeypatch):
    assert await ask(rt, "broken", 1, "Look up the blue chair.", "broken_lookup") == "ok"
    got = await replies(rt, "broken", 1)
    assert got[-1].final and got[-1].text == APOLOGY
    result = [m for m in await history(rt, "broken") if m["role"] == "tool"]
    assert result[0]["content"].startswith("error: ") and "down" in result[0]["content"]

    monkeypatch.setenv("S2S_TEST_TOOL_SLEEP", "3")  # over llm_tool_timeout_s (2 s)
    assert await ask(rt, "late", 1, "Do you have socks in stock?", "check_stock") == "ok"
    texts = [r.text for r in await replies(rt, "late", 1)]
    assert texts[0] == FILLER and texts[-1] == APOLOGY


@pytest.mark.slow
async def test_barge_in_cancels_the_follow_up_and_keeps_the_call(rt, monkeypatch):
    import asyncio

    monkeypatch.setenv("S2S_TEST_TOOL_SLEEP", "1.0")
    sid = "barge"
    run = asyncio.create_task(ask(rt, sid, 1, "Please order a pizza for me.", "place_order"))
    while not ran(rt):  # the call is running
        await asyncio.sleep(0.05)
    await rt.bus.advance_turn(sid)  # the user speaks: turn 2 supersedes the reply
    assert await run == "stale"
    await asyncio.sleep(1.5)  # the call itself ends and is recorded
    assert not any(r.final for r in await replies(rt, sid, 1))  # no follow-up answer
    key = [k for k in await rt.bus.redis.keys(f"s2s:stage:{{{sid}}}:llm-call:*")]
    record = json.loads(await rt.bus.redis.get(key[0]))
    assert record["status"] == "done" and "5521" in record["output"]
    assert ran(rt) == ["place_order pizza"]


@pytest.mark.slow
async def test_turn_run_again_does_not_call_again(rt):
    """As when a worker died after the call, before its answer was sent: the next
    worker's run of the same turn finds the finished call (same deterministic id)."""
    sid = "again"
    assert await ask(rt, sid, 1, "Please order a pizza for me.", "place_order") == "ok"
    first = await history(rt, sid)
    await rt.bus.redis.delete(keys.out(sid))
    assert await ask(rt, sid, 1, "Please order a pizza for me.", "place_order") == "ok"
    second = await history(rt, sid)
    assert ran(rt) == ["place_order pizza"]  # one real order
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "assistant"]
    assert first[2]["content"] == second[2]["content"] and "5521" in second[2]["content"]
    assert (await replies(rt, sid, 1))[-1].final  # the re-run answered the turn
