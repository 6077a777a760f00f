"""Realtime function tools (the GA protocol; docs/realtime.md, "Function tools").

* ``session.update`` ``tools`` (function tools only) and ``tool_choice`` reach the LLM as
  the session's client tools (native ``configure``); an ``mcp`` tool is refused.
* A call the assistant makes (native ``tool_call``) becomes a ``function_call`` output
  item of the turn's response: ``response.output_item.added``, ``conversation.item.added``,
  ``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``,
  ``conversation.item.done``; ``response.done`` lists it.
* The client's ``function_call_output`` items wait for ``response.create``, which sends
  them (with any typed text) as one native ``tool_output``: a turn the assistant answers."""

from __future__ import annotations

import uuid
from typing import Any

from .errors import Reject
from .tool_messages import MAX_OUTPUT_CHARS, tool_choice, tools

MAX_PENDING = 16  # outputs waiting for response.create


def new_item_id() -> str:
    return "item_" + uuid.uuid4().hex[:20]


def configured_tools(session: dict, current: list[dict], choice: Any, bad) -> tuple[list, Any]:
    """(tools, tool_choice) after a session.update; ``bad`` makes the UnsupportedConfig."""
    new_tools, new_choice = current, choice
    if "tools" in session:
        listed = session["tools"]
        if isinstance(listed, list) and any(isinstance(t, dict) and t.get("type") == "mcp"
                                            for t in listed):
            raise bad("tools", "mcp tools are not served here: the deployment attaches MCP "
                      "servers itself (S2S_LLM_MCP_SERVERS)", "unsupported_value")
        try:
            new_tools = tools(listed, "invalid_value")
        except Reject as r:
            raise bad("tools", str(r.message)) from None
    if "tool_choice" in session:
        try:
            name = tool_choice(session["tool_choice"], [t["name"] for t in new_tools],
                               "invalid_value")
        except Reject as r:
            raise bad("tool_choice", str(r.message)) from None
        new_choice = name if name in ("auto", "none", "required") else \
            {"type": "function", "name": name}
    return new_tools, new_choice


def native_configure(config) -> dict:
    """The native ``configure`` fields for the session's tools."""
    choice = config.tool_choice
    return {"tools": config.tools,
            "tool_choice": choice if isinstance(choice, str) else dict(choice)}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "function_call",
            "status": status, "call_id": call_id, "name": name, "arguments": arguments}


async def function_call(rt: Any, msg: dict) -> None:
    """A native ``tool_call``: a function_call item of the turn's response."""
    response = rt._response_for(msg["turn"])
    await response.start(rt)
    item_id, call_id = new_item_id(), msg["call_id"]
    name, arguments = msg["name"], msg["arguments"]
    index = len(response.outputs)
    done = call_item(item_id, call_id, name, arguments, "completed")
    response.outputs.append({"item": done})
    ids = {"response_id": response.id, "item_id": item_id, "output_index": index,
           "call_id": call_id}
    previous = rt.last_item or None
    await rt.emit("response.output_item.added", response_id=response.id, output_index=index,
                  item=call_item(item_id, call_id, name, "", "in_progress"))
    await rt.emit("conversation.item.added", previous_item_id=previous,
                  item=call_item(item_id, call_id, name, "", "in_progress"))
    await rt.emit("response.function_call_arguments.delta", delta=arguments, **ids)
    await rt.emit("response.function_call_arguments.done", arguments=arguments, name=name, **ids)
    await rt.emit("response.output_item.done", response_id=response.id, output_index=index,
                  item=done)
    await rt.emit("conversation.item.done", previous_item_id=previous, item=done)
    rt.last_item = item_id


async def call_output(rt: Any, item: dict, eid: str | None) -> None:
    """A client's ``function_call_output`` item: kept for the next response.create."""
    call_id, output = item.get("call_id"), item.get("output", "")
    if not isinstance(call_id, str) or not isinstance(output, str):
        await rt.error("invalid_value", "a function_call_output needs a string call_id and "
                       "a string output", eid, "item.call_id")
        return
    if len(output) > MAX_OUTPUT_CHARS:
        await rt.error("invalid_value", f"output over {MAX_OUTPUT_CHARS} characters", eid,
                       "item.output")
        return
    if len(rt.tool_outputs) >= MAX_PENDING:
        await rt.error("buffer_too_large", f"more than {MAX_PENDING} function_call_output "
                       "items without a response.create", eid, "item")
        return
    item_id = item.get("id") if isinstance(item.get("id"), str) else new_item_id()
    full = {"id": item_id[:64], "object": "realtime.item", "type": "function_call_output",
            "status": "completed", "call_id": call_id, "output": output}
    await rt.emit("conversation.item.added", previous_item_id=rt.last_item or None, item=full)
    await rt.emit("conversation.item.done", previous_item_id=rt.last_item or None, item=full)
    rt.last_item = full["id"]
    rt.tool_outputs.append({"call_id": call_id, "output": output})
