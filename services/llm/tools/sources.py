"""The deployment's own tools (``S2S_LLM_TOOLS``, comma-separated):

* ``package.module:function`` a Python callable by import path (``spec.from_callable``);
  ``package.module:TOOLS`` a list of callables;
* ``entrypoint:NAME`` the callable (or list) registered under NAME in the ``s2s.tools``
  entry-point group of an installed package;
* ``http://…`` / ``https://…`` an HTTP tool endpoint: ``GET URL`` answers
  ``{"tools": [{"name", "description", "parameters", "idempotent", "examples"}]}`` and
  ``POST URL/NAME`` with the arguments as a JSON object answers the result (JSON, or
  ``{"output": …}``); a status >= 400 is a failed call.
"""

from __future__ import annotations

import importlib
import json
from importlib.metadata import entry_points
from typing import Any, Callable

import httpx

from .spec import Tool, ToolError, as_text, from_callable

ENTRY_POINT_GROUP = "s2s.tools"
HTTP_TIMEOUT_S = 10.0


def specs(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


async def load(spec: str) -> list[Tool]:
    """The tools one ``S2S_LLM_TOOLS`` entry names (ToolError says what is wrong)."""
    if spec.startswith(("http://", "https://")):
        return await http_tools(spec)
    if spec.startswith("entrypoint:"):
        name = spec.partition(":")[2]
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ToolError(f"no entry point {name!r} in group {ENTRY_POINT_GROUP!r}: install "
                            "the package that declares it")
        return _callables(found[0].load(), spec)
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ToolError(f"S2S_LLM_TOOLS entry {spec!r}: use module:function, "
                        "entrypoint:NAME or an http(s) URL")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ToolError(f"S2S_LLM_TOOLS entry {spec!r}: {e}") from None
    return _callables(obj, spec)


def _callables(obj: Any, spec: str) -> list[Tool]:
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    if not items or not all(callable(i) for i in items):
        raise ToolError(f"{spec!r} is not a callable or a list of callables")
    return [from_callable(fn) for fn in items]


async def http_tools(url: str) -> list[Tool]:
    base = url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
            r = await client.get(base)
            r.raise_for_status()
            listed = r.json()["tools"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ToolError(f"cannot list the tools at {base} ({e})") from None
    return [Tool(name=t["name"], description=t.get("description", ""),
                 parameters=t.get("parameters") or {"type": "object", "properties": {}},
                 idempotent=bool(t.get("idempotent")), run=_http_runner(base, t["name"]),
                 examples=list(t.get("examples") or [])) for t in listed]


def _http_runner(base: str, name: str) -> Callable:
    async def run(arguments: dict) -> str:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
            try:
                r = await client.post(f"{base}/{name}", json=arguments)
            except httpx.HTTPError as e:
                raise ToolError(f"{name}: {e}") from None
        if r.status_code >= 400:
            raise ToolError(f"{name} answered {r.status_code}: {r.text[:200]}")
        try:
            body = r.json()
        except ValueError:
            return as_text(r.text)
        return as_text(body["output"] if isinstance(body, dict) and "output" in body else body)
    return run


def dumps(arguments: dict) -> str:
    return json.dumps(arguments, ensure_ascii=False, sort_keys=True)
