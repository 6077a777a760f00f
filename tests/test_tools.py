"""Tool sources and the tool records, without a model: the example MCP server over
stdio and streamable HTTP through the official SDK, Python callables by import path and
entry point, an HTTP tool endpoint, the history's OpenAI chat format, and the client
tools' validation at the gateway."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from s2s import config
from s2s.gateway import tool_messages
from s2s.gateway.errors import Reject
from s2s.services.llm import history
from s2s.services.llm.tools import ToolError, ToolRegistry
from s2s.services.llm.tools.decide import Call, call_id, valid
from s2s.services.llm.tools.render import ANSWER_EXAMPLES, plain

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "examples" / "voice_tools" / "server.py"
NAMES = ["get_time", "convert_units", "calculate", "lookup_order"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry(**fields) -> ToolRegistry:
    return ToolRegistry(config.load(fields, environ={}))


async def check_example_tools(reg: ToolRegistry) -> None:
    await reg.start()
    try:
        tools = reg.for_session({}).tools
        assert list(tools) == NAMES
        assert all(t.idempotent and t.examples for t in tools.values())  # from the server
        assert tools["get_time"].parameters["required"] == ["city"]
        assert (await tools["calculate"].run({"expression": "12 * 7"})) == "12 * 7 is 84."
        assert "kilometer" in await tools["convert_units"].run(
            {"value": 5, "from_unit": "mile", "to_unit": "kilometer"})
        assert "shipped" in await tools["lookup_order"].run({"order_id": "4521"})
        with pytest.raises(ToolError, match="no order 999"):
            await tools["lookup_order"].run({"order_id": "999"})
    finally:
        await reg.close()


async def test_example_mcp_server_over_stdio():
    await check_example_tools(registry(llm_mcp_servers=f"stdio:{sys.executable} {SERVER}"))


async def test_example_mcp_server_over_streamable_http():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.2)
        await check_example_tools(registry(llm_mcp_servers=f"http://127.0.0.1:{port}/mcp"))
    finally:
        proc.terminate()
        proc.wait(10)


async def test_python_callables_by_import_path_and_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "s2s_test_tools-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: s2s-test-tools\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[s2s.tools]\nshop = tests.tool_fixtures:TOOLS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("tests.tool_fixtures:TOOLS", "entrypoint:shop"):
        reg = registry(llm_tools=spec)
        await reg.start()
        tools = reg.tools
        assert list(tools) == ["place_order", "check_stock", "broken_lookup"]
        assert not tools["place_order"].idempotent and tools["check_stock"].idempotent
        assert tools["place_order"].parameters["properties"] == {"item": {"type": "string"}}
        assert tools["place_order"].description.startswith("Place an order")
        assert "5521" in await tools["place_order"].run({"item": "pizza"})
    with pytest.raises(ToolError, match="entry point"):
        await registry(llm_tools="entrypoint:nothing-here").start()
    with pytest.raises(ToolError, match="module:function"):
        await registry(llm_tools="no_colon_here").start()


class _Endpoint(BaseHTTPRequestHandler):
    """An HTTP tool endpoint as docs/tools.md describes it."""

    def do_GET(self):
        self._json(200, {"tools": [{"name": "add", "description": "Add two numbers.",
                                    "idempotent": True, "parameters": {
                                        "type": "object", "required": ["a", "b"],
                                        "properties": {"a": {"type": "number"},
                                                       "b": {"type": "number"}}}}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/add") and {"a", "b"} <= set(body):
            self._json(200, {"output": f"{body['a'] + body['b']:g}"})
        else:
            self._json(422, {"error": "bad arguments"})

    def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


async def test_http_tool_endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = registry(llm_tools=f"http://127.0.0.1:{server.server_port}/tools")
        await reg.start()
        add = reg.tools["add"]
        assert add.idempotent and add.parameters["required"] == ["a", "b"]
        assert await add.run({"a": 2, "b": 40}) == "42"
        with pytest.raises(ToolError, match="422"):
            await add.run({"a": 2})
    finally:
        server.shutdown()


def test_client_tools_join_the_sessions_and_are_checked():
    reg = registry()
    weather = {"type": "function", "name": "get_weather", "description": "Weather.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}
    ts = reg.for_session({"tools": json.dumps([weather]), "tool_choice": "required"})
    assert ts.tools["get_weather"].client and ts.must_call
    assert valid(Call("c", "get_weather", {"city": "Oslo"}), ts) is None
    assert "city" in valid(Call("c", "get_weather", {"town": "Oslo"}), ts)
    assert "no tool" in valid(Call("c", "get_time", {}), ts)
    assert not reg.for_session({"tools": json.dumps([weather]), "tool_choice": "none"})
    # the gateway's checks
    assert tool_messages.tools([weather])[0]["name"] == "get_weather"
    for bad in ([{"type": "mcp"}], [{**weather, "name": "a b"}], [weather, weather],
                [{**weather, "parameters": {"type": "array"}}], "x", [weather] * 40):
        with pytest.raises(Reject):
            tool_messages.tools(bad)
    with pytest.raises(Reject):
        tool_messages.outputs({"outputs": [{"call_id": "bad id!", "output": ""}]})
    assert tool_messages.outputs({"outputs": [{"call_id": "call_1", "output": "ok"}],
                                  "text": " and? "}) == ([{"call_id": "call_1",
                                                           "output": "ok"}], "and?")


def test_history_keeps_calls_in_the_openai_chat_format():
    cid = call_id("s", 3, 0, "get_time", {"city": "Oslo"})
    assert cid == call_id("s", 3, 0, "get_time", {"city": "Oslo"})  # the same on any worker
    ctx = history.start_turn(None, 3, "What time is it in Oslo?", 6)
    ctx = history.add_tool_calls(ctx, 3, "", [Call(cid, "get_time", {"city": "Oslo"}).openai()])
    assert history.open_calls(ctx) == {cid: "get_time"}
    ctx = history.add_tool_result(ctx, 3, cid, "get_time", "It is 09:15 in Oslo.", ms=12.3)
    ctx = history.set_reply(ctx, 3, "It is 9:15 in Oslo.")
    msgs = history.messages(ctx, "Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": cid, "type": "function",
         "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]}
    assert msgs[3]["tool_call_id"] == cid and "ms" not in msgs[3]
    assert history.open_calls(ctx) == {}
    # a chat template without tools reads the result inside the question
    told = plain(msgs)[len(ANSWER_EXAMPLES) + 1:]  # after the system prompt and the examples
    assert told[0] == {"role": "user", "content":
                       "What time is it in Oslo?\n[get_time: It is 09:15 in Oslo.]"}
    assert [m["role"] for m in told] == ["user", "assistant"]
    assert plain(msgs[:2]) == msgs[:2]  # no tool in the conversation: no examples
    # the next turn keeps the call and its result
    nxt = history.start_turn(ctx, 4, "Thanks!", 6)
    assert [m["role"] for m in nxt["history"]] == ["user", "assistant", "tool", "assistant", "user"]


def test_spoken_numbers_reach_the_decision_as_digits():
    from s2s.services.llm.tools.numbers import write_numbers

    assert write_numbers("What is one hundred forty four divided by twelve?") == \
        "What is 144 divided by 12?"
    assert write_numbers("How much is fifty five plus twenty-six?") == "How much is 55 plus 26?"
    assert write_numbers("one thousand minus three hundred and five") == "1000 minus 305"
    assert write_numbers("Has my order eight eight one zero shipped?") == \
        "Has my order 8810 shipped?"
    assert write_numbers("I have one dog, two cats.") == "I have 1 dog, 2 cats."
    assert write_numbers("twelve seven") == "12 7"
    assert write_numbers("Hello, how are you?") == "Hello, how are you?"


async def test_stt_bias_is_built_from_what_the_tools_say_of_themselves():
    """Names, descriptions and the values a schema enumerates (the example converter's
    units), never more than whisper's prompt keeps; no tools, no bias."""
    from s2s.services.stt.tool_bias import MAX_WORDS, ToolBias, bias_text

    text = await ToolBias(config.load({"llm_tools": "examples.voice_tools.tools:TOOLS"},
                                      environ={})).prompt({})
    assert text.endswith("celsius, fahrenheit.") and "kilometer" in text
    assert "Lookup order: The status of a customer's order" in text
    assert len(text.split()) <= MAX_WORDS
    # a session's own (client) tools join the deployment's
    client = [{"name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {
                   "sky": {"type": "string", "enum": ["sunny", "cloudy"]}}}}]
    bias = ToolBias(config.load({}, environ={}))
    assert await bias.prompt({}) == ""
    assert await bias.prompt({"tools": json.dumps(client)}) == \
        "Get weather: The weather in a city. sunny, cloudy."
    assert bias_text([]) == ""


def test_a_leaning_word_is_found_among_the_tokens_that_begin_it():
    from s2s.services.llm.backends import prefix_tokens

    vocab = {"n": 0, "no": 1, "none": 2, '"n': 3, "nothing": 4, "Ġnone": 5, "get": 6}
    assert prefix_tokens(vocab, "none") == [0, 1, 2, 3]
