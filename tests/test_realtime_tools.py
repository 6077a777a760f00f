"""Realtime function tools with the official `openai` SDK against a real gateway on a
real Redis: session.update tools reach the LLM's session prefs; a call the LLM makes
(a ToolCall frame, played here as tests/test_realtime.py plays the stages) reaches the
client as the GA protocol's function_call events; the client's function_call_output
and response.create reach the LLM stream as a ToolOutput turn; what is not served is
refused with an error event.  The flow with the real model is in tests/test_tools_llm.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from s2s import keys
from s2s.frames import ReplyAudio, ReplyText, ToolCall, ToolOutput, Transcript

from tests.test_gateway import stream_frames
from tests.test_realtime import events_until, rt, session_id  # noqa: F401  (fixture)

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


async def llm_inputs(rt, count: int) -> list:
    async with asyncio.timeout(5):
        while len(got := await stream_frames(rt.redis, keys.STAGE_STREAMS["llm"])) < count:
            await asyncio.sleep(0.02)
    return got


async def answer(rt, sid: str, turn: int, text: str) -> None:
    """The LLM and TTS stages' part of a spoken reply."""
    await rt.bus.emit(ReplyText(sid=sid, turn=turn, seq=0, text=text, final=True),
                      ReplyAudio(sid=sid, turn=turn, seq=0, pcm=b"\0\1" * 480, sr=24000,
                                 last=True, final=True))


async def test_function_call_round_trip(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER],
                                           "tool_choice": "auto"})
        updated = await events_until(conn, "session.updated")
        assert updated[-1].session.tools[0].name == "get_weather"
        sid = await session_id(rt)
        async with asyncio.timeout(5):  # the native configure reaches the LLM's prefs
            while not (prefs := await rt.bus.prefs(sid)).get("tools"):
                await asyncio.sleep(0.02)
        assert json.loads(prefs["tools"])[0]["parameters"] == WEATHER["parameters"]
        assert prefs["tool_choice"] == "auto"

        await conn.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "What's the weather in Paris?"}]})
        await conn.response.create()
        [question] = await llm_inputs(rt, 1)
        assert isinstance(question, Transcript) and question.turn == 1
        # the LLM calls the client's tool; the reply closes with nothing said
        await rt.bus.emit(ToolCall(sid=sid, turn=1, call_id="call_abc", name="get_weather",
                                   arguments='{"city": "Paris"}'),
                          ReplyText(sid=sid, turn=1, seq=0, text="", final=True),
                          ReplyAudio(sid=sid, turn=1, seq=0, pcm=b"", sr=24000, last=True,
                                     final=True))
        events = await events_until(conn, "response.done")
        kinds = [e.type for e in events]
        i = kinds.index("response.created")
        assert kinds[i:] == ["response.created", "response.output_item.added",
                             "conversation.item.added",
                             "response.function_call_arguments.delta",
                             "response.function_call_arguments.done",
                             "response.output_item.done", "conversation.item.done",
                             "response.done"]
        done = events[kinds.index("response.function_call_arguments.done")]
        assert (done.call_id, done.name, json.loads(done.arguments)) == \
            ("call_abc", "get_weather", {"city": "Paris"})
        [item] = events[-1].response.output
        assert item.type == "function_call" and item.call_id == "call_abc"
        assert events[-1].response.status == "completed"

        # the client runs it and asks for the answer
        await conn.conversation.item.create(item={"type": "function_call_output",
                                                  "call_id": "call_abc",
                                                  "output": '{"sky": "sunny", "c": 24}'})
        echoed = await events_until(conn, "conversation.item.done")
        assert echoed[-1].item.type == "function_call_output"
        assert echoed[-1].item.call_id == "call_abc"
        await conn.response.create()
        _, result = await llm_inputs(rt, 2)
        assert isinstance(result, ToolOutput) and result.turn == 2
        assert [(o.call_id, o.output) for o in result.outputs] == \
            [("call_abc", '{"sky": "sunny", "c": 24}')]
        await answer(rt, sid, 2, "It is sunny and 24 degrees in Paris.")
        events = await events_until(conn, "response.done")
        assert events[-1].response.output[0].content[0].transcript == \
            "It is sunny and 24 degrees in Paris."
        assert any(e.type == "response.output_audio.delta" for e in events)


async def test_unsupported_tool_requests_are_refused(rt):
    async with rt.client.realtime.connect(model="s2s") as conn:
        await events_until(conn, "session.created")
        refusals = [
            ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "http://x"}]},
             "unsupported_value"),
            ({"tools": [{**WEATHER, "name": "bad name!"}]}, "invalid_value"),
            ({"tools": [{**WEATHER, "parameters": {"type": "object",
                                                    "properties": {"a": {"type": 7}}}}]},
             "invalid_value"),
            ({"tool_choice": "sometimes"}, "invalid_value"),
        ]
        for session, code in refusals:
            await conn.session.update(session={"type": "realtime", **session})
            [error] = [e for e in await events_until(conn, "error") if e.type == "error"]
            assert error.error.code == code, (session, error)
        await conn.send({"type": "response.create", "response": {"tools": [WEATHER]}})
        error = (await events_until(conn, "error"))[-1]
        assert error.error.code == "unsupported_value" and error.error.param == "response.tools"
        await conn.conversation.item.create(item={"type": "function_call", "name": "x",
                                                  "call_id": "c1", "arguments": "{}"})
        error = (await events_until(conn, "error"))[-1]
        assert error.error.code == "unsupported_item"
        # nothing reached the pipeline, and the session still serves a valid update
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER]})
        assert (await events_until(conn, "session.updated"))[-1].session.tools[0].name == \
            "get_weather"
    assert not await stream_frames(rt.redis, keys.STAGE_STREAMS["llm"])
