"""Tool calls in the LLM stage with the real bundled model (SmolLM2-135M, transformers
backend), the real example MCP server (examples/voice_tools/server.py over stdio) and
a real Redis, through the worker runtime: the model chooses between speaking and a
call under a grammar, the call runs, its result is in the session's history in the
OpenAI chat format, and the spoken answer carries it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from s2s import frames, keys
from s2s.frames import ReplyText, ToolCall, ToolOutput, ToolResult, Transcript
from s2s.worker import Runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_llm import llm_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MCP_STDIO = f"stdio:{sys.executable} {ROOT / 'examples/voice_tools/server.py'}"
# a client tool, as a Realtime client declares it in session.update
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


@pytest.fixture(scope="module")
def tool_stage():
    from s2s.services.llm.worker import LlmStage

    stage = LlmStage(llm_settings("redis://unused", "transformers", llm_mcp_servers=MCP_STDIO,
                                  llm_tool_filler_ms=0))
    stage.setup()
    return stage


@pytest.fixture
async def rt(tool_stage, settings):
    tool_stage.settings.redis_url = settings.redis_url
    runtime = Runtime(tool_stage, tool_stage.settings)
    yield runtime
    await runtime.bus.close()


async def out_frames(rt: Runtime, sid: str, turn: int | None = None) -> list:
    got = []
    for _, fields in await rt.bus.redis.xrange(keys.out(sid)):
        f = frames.decode(fields[b"f"])
        if turn is None or f.turn == turn:
            got.append(f)
    return got


async def ask(rt: Runtime, sid: str, turn: int, text: str) -> tuple[str, list]:
    await rt.bus.redis.set(keys.turn(sid), turn)
    frame = Transcript(sid=sid, turn=turn, text=text, marks={"speech_end": time.time()},
                       out_sr=24000)
    outcome = await rt.run_item(frame, time.time())
    return outcome, await out_frames(rt, sid, turn)


def spoken(got: list) -> str:
    replies = [f for f in got if isinstance(f, ReplyText)]
    assert [r.seq for r in replies] == list(range(len(replies)))
    assert replies and replies[-1].final and not any(r.final for r in replies[:-1])
    return " ".join(r.text for r in replies if r.text)


async def history(rt: Runtime, sid: str) -> list[dict]:
    return json.loads(await rt.bus.redis.get(keys.ctx(sid)))["history"]


async def answered_with_a_call(rt: Runtime, sid: str, text: str) -> tuple[str, list, dict]:
    """Ask ``text`` as turn 1: what was said, the history, and the history's first call."""
    outcome, got = await ask(rt, sid, 1, text)
    said = spoken(got)
    h = await history(rt, sid)
    print("\n", said, json.dumps(h)[:600])
    assert outcome == "ok"
    return said, h, next(m for m in h if m.get("tool_calls"))["tool_calls"][0]


@pytest.mark.slow
async def test_model_calls_an_mcp_tool_and_says_the_result(rt):
    said, h, call = await answered_with_a_call(rt, "tokyo", "What time is it in Tokyo?")
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"city": "Tokyo"}
    result = next(m for m in h if m["role"] == "tool")
    assert result["tool_call_id"] == call["id"] and result["content"].startswith("It is ")
    hhmm = result["content"].split()[2]
    assert hhmm.rstrip(".") in said.replace(" ", "") or hhmm[:2] in said
    assert [m["role"] for m in h] == ["user", "assistant", "tool", "assistant"]


@pytest.mark.slow
async def test_a_chat_turn_calls_nothing(rt):
    outcome, got = await ask(rt, "chat", 1, "What is the capital of France?")
    said = spoken(got)
    h = await history(rt, "chat")
    assert outcome == "ok" and "Paris" in said
    assert not any(m.get("tool_calls") or m["role"] == "tool" for m in h)


@pytest.mark.slow
async def test_client_tool_goes_to_the_client_and_its_output_is_answered(rt):
    sid = "client"
    await rt.bus.set_prefs(sid, tools=json.dumps([WEATHER]), tool_choice="get_weather")
    outcome, got = await ask(rt, sid, 1, "What is the weather like in Paris?")
    calls = [f for f in got if isinstance(f, ToolCall)]
    assert outcome == "ok" and len(calls) == 1 and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, WEATHER["parameters"])
    assert spoken(got) == ""  # nothing said: the reply is the call
    await rt.bus.redis.set(keys.turn(sid), 2)
    answer = ToolOutput(sid=sid, turn=2, out_sr=24000, marks={"speech_end": time.time()},
                        outputs=[ToolResult(call_id=calls[0].call_id,
                                            output="Sunny and 24 degrees.")])
    assert await rt.run_item(answer, time.time()) == "ok"
    said = spoken(await out_frames(rt, sid, 2))
    h = await history(rt, sid)
    print("\n", said, h)
    assert [m["role"] for m in h] == ["user", "assistant", "tool", "assistant"]
    assert h[1]["tool_calls"][0]["id"] == calls[0].call_id == h[2]["tool_call_id"]
    assert "24" in said or "sunny" in said.lower()


@pytest.mark.slow
async def test_spoken_numbers_reach_the_calculator_as_arithmetic(rt):
    """"fifteen times four" as a transcript says it, the session's tool_choice naming the
    calculator: the decision reads 15 times 4 (spoken numbers as digits), the
    calculator's schema pattern lets it write only arithmetic, and the answer says the
    result."""
    await rt.bus.set_prefs("calc", tool_choice="calculate")
    said, _, call = await answered_with_a_call(rt, "calc", "What is fifteen times four?")
    assert call["function"]["name"] == "calculate"
    expression = json.loads(call["function"]["arguments"])["expression"].replace(" ", "")
    assert expression in ("15*4", "4*15")
    assert "60" in said
