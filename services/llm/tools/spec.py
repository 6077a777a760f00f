"""What a tool is: a name, a description, a JSON schema for its arguments, whether
running it twice is harmless (``idempotent``), and how to run it (``run``; None for a
client tool, which the client runs and answers with a ``function_call_output``).

A Python callable becomes a tool by its signature (pydantic makes the schema) and its
docstring; ``@tool(idempotent=True, examples=[...])`` adds what a signature cannot say."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names
MAX_DESCRIPTION = 1024
MAX_OUTPUT_CHARS = 4000  # what a tool returns goes into the prompt: kept short

Runner = Callable[[dict], Awaitable[str]]


class ToolError(Exception):
    """A tool that cannot be loaded, or whose call failed (the reply apologises)."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    idempotent: bool = False          # running it twice (a worker died mid-call) is harmless
    run: Runner | None = None         # None: a client tool
    source: str = "config"            # config, mcp or client
    examples: list[dict] = field(default_factory=list)  # [{"request", "arguments"}]: few-shot

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ToolError(f"tool name {self.name!r} must match {NAME.pattern}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise ToolError(f"tool {self.name}: parameters must be a JSON schema of an object")
        self.description = (self.description or "").strip()[:MAX_DESCRIPTION]
        self.parameters = {"type": "object", "properties": {}, **self.parameters}

    @property
    def client(self) -> bool:
        return self.run is None

    def openai(self) -> dict:
        """The Chat Completions ``tools`` entry."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


def tool(idempotent: bool = False, name: str | None = None, description: str | None = None,
         examples: list[dict] | None = None) -> Callable[[Callable], Callable]:
    """Mark a Python function as a tool, saying what its signature cannot."""
    def mark(fn: Callable) -> Callable:
        fn.__s2s_tool__ = {"idempotent": idempotent, "name": name, "description": description,
                           "examples": examples or []}
        return fn
    return mark


def from_callable(fn: Callable, source: str = "config") -> Tool:
    """A tool from a Python function (sync functions run in a thread)."""
    import pydantic

    meta = getattr(fn, "__s2s_tool__", {})
    fields: dict[str, Any] = {}
    # eval_str: a module with `from __future__ import annotations` names its types as text
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if p.annotation is not p.empty else str
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(fn) or ""

    async def run(arguments: dict) -> str:
        checked = model.model_validate(arguments).model_dump()
        if inspect.iscoroutinefunction(fn):
            result = await fn(**checked)
        else:
            result = await asyncio.to_thread(fn, **checked)
        return as_text(result)

    return Tool(name=meta.get("name") or fn.__name__,
                description=meta.get("description") or doc.split("\n\n")[0],
                parameters=schema, idempotent=bool(meta.get("idempotent")), run=run,
                source=source, examples=list(meta.get("examples") or []))


def as_text(result: Any) -> str:
    """A tool's result as the text the model reads."""
    text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False,
                                                                default=str)
    return text[:MAX_OUTPUT_CHARS]
