"""Replies that answer (issue 19): a reply never copies an earlier reply of the session.
The model test run the real LLM stage
(transformers, SmolLM2-135M) through a real Redis and the worker runtime."""

from __future__ import annotations

import pytest

from s2s import config
from s2s.bench.eval_replies import REPLY_SESSIONS, parse_variant
from s2s.bench.eval_set import JFK_TEXT
from s2s.bench.reply_metrics import repeats_earlier
from s2s.services.llm.backends import earlier_replies
from s2s.services.llm.backends.batch import NgramBan
from s2s.services.llm.backends.vllm_engine import word_runs
from s2s.services.llm.tools.render import plain
from s2s.services.llm.worker import LlmStage
from s2s.worker import Runtime
from tests.test_llm import ask, check_reply


# --- what a reply may not say again (no model) -------------------------------------------
def test_the_ban_covers_runs_of_earlier_replies_only():
    ban = NgramBan([[1, 2, 3, 4, 5], [7, 8, 9]], 3)
    assert ban.after([9, 1, 2]) == {3}          # "1 2" said: "3" would repeat the run
    assert ban.after([2, 3]) == {4}
    assert ban.after([7, 8]) == {9}
    assert ban.after([2]) == set()              # too short to continue a run
    assert ban.after([5, 1]) == set()           # "5 1" was never said
    assert not NgramBan([[1, 2, 3]], 0) and NgramBan([[1, 2, 3]], 0).after([1, 2]) == set()


def test_earlier_replies_are_the_session_s_not_the_tool_examples():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What should I cook?"},
                {"role": "assistant", "content": "Boil water. Add tea. Enjoy your dinner."},
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "tool_call_id": "a", "name": "get_time", "content": "14:05"},
                {"role": "user", "content": "What time is it?"}]
    assert earlier_replies(plain(messages)) == ["Boil water. Add tea. Enjoy your dinner."]
    assert word_runs(earlier_replies(messages), 4) == [
        "Boil water. Add tea.", "water. Add tea. Enjoy", "Add tea. Enjoy your",
        "tea. Enjoy your dinner."]
    assert word_runs(["Too short."], 4) == [] and word_runs(["a b c d"], 0) == []


def test_the_bench_sessions_are_long_and_varied():
    assert len(REPLY_SESSIONS) >= 20
    assert all(len(c.turns) >= 6 for c in REPLY_SESSIONS)
    turns = [t for c in REPLY_SESSIONS for t in c.turns]
    assert sum(bool(t.keywords) for t in turns) >= 40     # factual turns, scored
    assert sum(t.text.endswith(".") for t in turns) >= 60  # statements, for echoes
    assert parse_variant("p:llm_system_prompt=Be brief, kind.;llm_history_turns=2") == \
        ("p", {"llm_system_prompt": "Be brief, kind.", "llm_history_turns": 2})


# --- the real stage ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage():
    # the default settings, as users get them, but no hold: these turns are whole
    stage = LlmStage(config.load({"metrics_port": 0, "llm_turn_hold_ms": 0,
                                  "llm_statement_hold_ms": 0}, environ={}))
    stage.setup()
    yield stage
    stage.backend.close()


@pytest.fixture
async def runtime(stage, redis_url):
    rt = Runtime(stage, config.load({"redis_url": redis_url, "metrics_port": 0}, environ={}))
    yield rt
    await rt.bus.close()


async def converse(rt: Runtime, sid: str, texts: list[str], first_turn: int = 0) -> list[str]:
    said = []
    for turn, text in enumerate(texts, first_turn):
        outcome, got, _ = await ask(rt, sid, turn, text)
        assert outcome == "ok"
        said.append(check_reply(got).strip())
        await rt.bus.advance_turn(sid)
    return said


DINNER = "Boil water. Add tea. Enjoy your dinner."  # the issue's copied first answer


@pytest.mark.slow
async def test_the_issue_s_session_no_longer_copies_its_first_answer(runtime):
    # the session as the issue heard it: its first answer stored, then the turns that
    # each got that answer again
    await runtime.stage.state.save("copy", {"history": [
        {"role": "user", "content": "What should I cook for dinner tonight?", "turn": 0},
        {"role": "assistant", "content": DINNER, "turn": 0}]})
    await runtime.bus.advance_turn("copy")
    texts = [JFK_TEXT, "How many legs does a spider have?", "How do I make a cup of tea?",
             "Thanks, that helps.", "What is the capital of France?", "Good night."]
    said = await converse(runtime, "copy", texts, first_turn=1)
    earlier = [DINNER]
    for text, reply in zip(texts, said):
        assert reply and not repeats_earlier(reply, earlier), (text, reply, earlier)
        earlier.append(reply)
    # the facts survive: the ban leaves the question's own words and new answers free
    assert "paris" in said[4].lower(), said[4]
    # what was spoken is what the session remembers (its last exchanges: older ones trimmed)
    stored = [m["content"] for m in (await runtime.stage.state.load("copy"))["history"]
              if m["role"] == "assistant"]
    assert stored and stored == said[-len(stored):]

