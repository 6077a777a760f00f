"""Speak or call: the decision in front of a reply, for backends whose model knows no
tool protocol (the bundled SmolLM2-135M): the model writes one JSON object under a
grammar (xgrammar on transformers, vLLM's guided decoding), either ``{"name": "none"}``
(then it speaks, with its usual prompt) or ``{"name": TOOL, "arguments": {...}}`` with
arguments valid against that tool's schema, whatever the model would have liked to write.

A model this small follows examples better than instructions, and the nearest ones most:
the prompt lists the tools, then shows the tools' own ``examples`` and a few requests that
need none, then again the two most like the request (shared words), just before it.
Only the user's last message is shown, its spoken numbers as digits (numbers.py).  The
model's prior for speaking is strong: the choice leans away from "none" by
``llm_tool_none_bias`` (a logit bias on the tokens that begin it; docs/tools.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

import jsonschema

from .numbers import write_numbers
from .registry import ToolSet
from .spec import Tool

log = logging.getLogger("s2s.llm.tools")
MAX_TOKENS = 96   # the decision's JSON, at most: a call cut short is no call
NONE_EXAMPLES = ["Hi there, how are you?", "What is the largest ocean on Earth?",
                 "Tell me a fun fact.", "Who painted the Mona Lisa?", "Thanks, that helps a lot.",
                 "Can you recommend a good book?"]
NEAREST = 2       # examples most like the request, repeated just before it
WORD = re.compile(r"[a-z0-9']+")


@dataclass
class Call:
    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def openai(self) -> dict:
        """The ``tool_calls`` entry of an assistant message (OpenAI chat format)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


def call_id(sid: str, turn: int, index: int, name: str, arguments: dict) -> str:
    """The same call of the same turn gets the same id on every worker: a re-run after a
    crash finds its record (calls.py) instead of calling again."""
    key = json.dumps([sid, turn, index, name, arguments], sort_keys=True)
    return "call_" + hashlib.sha1(key.encode()).hexdigest()[:20]


def schema(tools: list[Tool], must_call: bool) -> dict:
    options = [] if must_call else [{"type": "object", "properties": {"name": {"const": "none"}},
                                     "required": ["name"], "additionalProperties": False}]
    for t in tools:
        options.append({"type": "object",
                        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _signature(t: Tool) -> str:
    return f"{t.name}({', '.join(t.parameters.get('properties', {}))})"


def _line(t: Tool) -> str:
    """A tool for the prompt, short and by example: its signature, its description's
    first line, the values its schema allows (enums), and its first example request."""
    values: list[str] = []
    for prop in t.parameters.get("properties", {}).values():
        values += [str(v) for v in prop.get("enum", []) if str(v) not in values]
    line = f"- {_signature(t)}: {t.description.splitlines()[0] if t.description else ''}"
    if values:
        line += f" One of: {', '.join(values)}."
    example = next((ex["request"] for ex in t.examples
                    if isinstance(ex, dict) and isinstance(ex.get("request"), str)), "")
    return line + (f' Example: "{example}"' if example else "")


def messages(toolset: ToolSet, request: str) -> list[dict]:
    tools = toolset.offered()
    lines = "\n".join(_line(t) for t in tools)
    system = ("Pick the tool that answers the user's request, with its arguments taken from "
              "the request. Pick \"none\" for anything else (greetings, chat, general "
              f"questions).\nTools:\n{lines}\n- none: no tool")
    out = [{"role": "system", "content": system}]
    shots: list[tuple[str, str]] = []
    for t in tools:
        for ex in t.examples:
            if isinstance(ex, dict) and isinstance(ex.get("request"), str):
                shots.append((ex["request"], json.dumps(
                    {"name": t.name, "arguments": ex.get("arguments", {})}, ensure_ascii=False)))
    if not toolset.must_call:
        shots += [(q, '{"name": "none"}') for q in NONE_EXAMPLES]
    # a small model answers like the examples nearest to it: the ones most like this
    # request are shown again just before it; every example before them comes in a fixed
    # order, so that part of the prompt is the same for every request and its keys/values
    # are reused (the prefix cache): only the last examples and the request are new
    nearest = sorted(shots, key=lambda shot: _likeness(shot[0], request))[-NEAREST:]
    shots = shots + nearest
    for question, answer in shots:
        out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    out.append({"role": "user", "content": request})
    return out


def _likeness(a: str, b: str) -> float:
    wa, wb = set(WORD.findall(a.lower())), set(WORD.findall(b.lower()))
    return len(wa & wb) / max(1, len(wa | wb))


async def decide(backend, toolset: ToolSet, request: str, sid: str, turn: int,
                 none_bias: float = 0.0) -> list[Call]:
    """The calls the model makes for ``request`` (empty: it speaks).  ``none_bias``: how
    far (logits) the choice leans away from "none" (settings.llm_tool_none_bias)."""
    tools = toolset.offered()
    if not tools:
        return []
    rules = schema(tools, toolset.must_call)
    request = write_numbers(request)
    text = ""
    lean = {"none": -none_bias} if none_bias and not toolset.must_call else None
    stream = backend.stream(messages(toolset, request), MAX_TOKENS, 0.0, json_schema=rules,
                            bias=lean)
    try:
        async for piece in stream:
            text += piece
    finally:
        await stream.aclose()
    try:
        chosen = json.loads(text)
        jsonschema.validate(chosen, rules)
    except (ValueError, jsonschema.ValidationError) as e:
        # only a decision cut at MAX_TOKENS gets here: the grammar allows nothing else
        log.warning("tool decision unusable (%s): %r", str(e)[:80], text[:200])
        return []
    if chosen.get("name", "none") == "none":
        return []
    arguments = chosen.get("arguments", {})
    return [Call(call_id(sid, turn, 0, chosen["name"], arguments), chosen["name"], arguments)]


def valid(call: Call, toolset: ToolSet) -> str | None:
    """Why ``call`` is not a valid call of this tool set (None: it is)."""
    tool = toolset.tools.get(call.name)
    if tool is None:
        return f"no tool named {call.name!r}"
    try:
        jsonschema.validate(call.arguments, tool.parameters)
    except jsonschema.ValidationError as e:
        return f"arguments of {call.name}: {e.message}"
    except jsonschema.SchemaError as e:
        return f"the schema of {call.name} is invalid: {e.message}"
    return None
