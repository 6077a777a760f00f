"""Validation of a client's tools (docs/tools.md): the function tools a session declares
(native ``configure`` ``tools``, Realtime ``session.update`` ``tools``), its
``tool_choice``, and the results it sends back (native ``tool_output``).  No I/O: each
function returns the checked value or raises ``Reject``."""

from __future__ import annotations

import json
import re

from s2s.frames import MAX_TOOL_OUTPUTS

from .errors import Reject

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_TOOLS = 32
MAX_TOOLS_JSON = 32_000    # characters of all tool definitions together
MAX_DESCRIPTION = 1024
MAX_OUTPUT_CHARS = 4000    # one result: it goes into the prompt


def tools(value: object, code: str = "bad_configure") -> list[dict]:
    """Function tools ``{"type": "function", "name", "description", "parameters"}``."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise Reject(code, f'"tools" must be a list of at most {MAX_TOOLS} function tools')
    out, names = [], set()
    for t in value:
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise Reject(code, f"only function tools are served (not {str(kind)[:20]!r})")
        name, params = t.get("name"), t.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise Reject(code, "each tool needs a unique name matching [A-Za-z0-9_-]{1,64}")
        desc = t.get("description", "")
        if not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION:
            raise Reject(code, f"tool {name}: description must be a string of at most "
                         f"{MAX_DESCRIPTION} characters")
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise Reject(code, f"tool {name}: parameters must be a JSON schema of an object")
        _check_schema(name, params, code)
        names.add(name)
        out.append({"type": "function", "name": name, "description": desc, "parameters": params})
    if len(json.dumps(out)) > MAX_TOOLS_JSON:
        raise Reject(code, f"tools over {MAX_TOOLS_JSON} characters of JSON")
    return out


def _check_schema(name: str, schema: dict, code: str) -> None:
    import jsonschema  # only when a client declares tools

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise Reject(code, f"tool {name}: invalid JSON schema: {e.message[:120]}") from None


def tool_choice(value: object, names: list[str], code: str = "bad_configure") -> str:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "name": NAME}`` (a
    declared tool's name; the deployment's own tools count too, checked by the LLM)."""
    if value in ("auto", "none", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function" and \
            isinstance(value.get("name"), str) and NAME.match(value["name"]):
        return value["name"]
    raise Reject(code, '"tool_choice" must be auto, none, required or '
                 '{"type": "function", "name": NAME}')


def outputs(obj: dict) -> tuple[list[dict], str]:
    """A ``tool_output`` message: ``outputs`` [{call_id, output}] and optional ``text``."""
    items, text = obj.get("outputs"), obj.get("text", "")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_TOOL_OUTPUTS:
        raise Reject("bad_tool_output", f'"outputs" must list 1 to {MAX_TOOL_OUTPUTS} results')
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("call_id"), str) or \
                not CALL_ID.match(item["call_id"]) or not isinstance(item.get("output", ""), str):
            raise Reject("bad_tool_output", 'each result needs a "call_id" (of a call this '
                         'session got) and a string "output"')
        if len(item.get("output", "")) > MAX_OUTPUT_CHARS:
            raise Reject("message_too_large", f"a tool output over {MAX_OUTPUT_CHARS} characters")
        out.append({"call_id": item["call_id"], "output": item.get("output", "")})
    if not isinstance(text, str) or len(text) > MAX_OUTPUT_CHARS:
        raise Reject("bad_tool_output", '"text" must be a string')
    return out, text.strip()
