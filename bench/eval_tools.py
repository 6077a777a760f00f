"""The ``tools`` group of ``s2s eval``: did the assistant call the right tool with the
right arguments (or none, when none was needed), and does its spoken answer carry the
tool's result?  The calls are read from the session's conversation in Redis
(``--redis-url``: the stack's; the OpenAI chat format of services/llm/history.py).

Also the latency a tool round trip adds: voice-to-voice of the turns that called a tool
against that of the turns that did not (same run, same machine), beside the tools' own
time (each tool entry of the history carries ``ms``)."""

from __future__ import annotations

import ast
import json
import operator
import re
import statistics
from typing import Any

from .eval_set import Turn

UNIT_ALIASES = {"km": "kilometer", "kilometre": "kilometer", "mi": "mile", "m": "meter",
                "metre": "meter", "ft": "foot", "feet": "foot", "in": "inch", "cm": "centimeter",
                "centimetre": "centimeter", "kg": "kilogram", "lb": "pound", "lbs": "pound",
                "l": "liter", "litre": "liter", "gal": "gallon", "c": "celsius",
                "f": "fahrenheit", "degrees celsius": "celsius",
                "degrees fahrenheit": "fahrenheit", "inches": "inch"}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg}


def history(redis_url: str, sid: str) -> list[dict] | None:
    """The session's conversation as the LLM stage keeps it (None: not readable)."""
    if not redis_url or not sid:
        return None
    import redis

    from s2s import keys

    try:
        client = redis.Redis.from_url(redis_url)
        raw = client.get(keys.ctx(sid))
        client.close()
        return json.loads(raw)["history"] if raw else []
    except (redis.RedisError, ValueError, KeyError):
        return None


def _unit(u: Any) -> str:
    u = str(u).strip().lower()
    u = UNIT_ALIASES.get(u, u)
    return u[:-1] if u.endswith("s") and u not in ("celsius",) else u


def _value(expression: Any) -> float | None:
    text = str(expression).lower().replace("x", "*").replace("times", "*") \
        .replace("plus", "+").replace("minus", "-").replace("divided by", "/")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError
    try:
        return float(ev(ast.parse(text, mode="eval")))
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError):
        return None


def args_match(expected: dict, got: Any) -> bool:
    if not isinstance(got, dict):
        return False
    for key, want in expected.items():
        have = got.get(key)
        if key == "expression":
            if _value(have) is None or abs(_value(have) - want) > 1e-6:
                return False
        elif key.endswith("_unit"):
            if _unit(have) != _unit(want):
                return False
        elif isinstance(want, (int, float)):
            try:
                if abs(float(have) - want) > 1e-6:
                    return False
            except (TypeError, ValueError):
                return False
        elif re.sub(r"\W", "", str(have).lower()) != re.sub(r"\W", "", str(want).lower()):
            return False
    return True


def carries(reply: str, result: str) -> bool:
    """Does the spoken reply say the result: its numbers (times, amounts, order numbers)
    or, without any, most of its words?"""
    from .eval import norm_words

    said = " ".join(norm_words(reply))
    numbers = re.findall(r"\d+(?:[.:]\d+)?", result)
    if numbers:
        return all(" ".join(norm_words(n.replace(":", " ").replace(".", " "))) in said
                   for n in numbers)
    words = [w for w in norm_words(result) if len(w) > 3]
    return bool(words) and sum(w in said.split() for w in words) >= 0.6 * len(words)


def score_turn(turn: Turn, reply: str, entries: list[dict] | None) -> dict:
    if entries is None:
        return {"tool_expected": turn.tool, "tool_called": None}
    calls = [c for m in entries for c in m.get("tool_calls") or []]
    results = [m for m in entries if m.get("role") == "tool"]
    names = [c["function"]["name"] for c in calls]
    try:
        args = json.loads(calls[0]["function"]["arguments"]) if calls else None
    except ValueError:
        args = None
    out = {"tool_expected": turn.tool, "tool_called": names[0] if names else "none",
           "arguments": args, "result": results[0]["content"] if results else None,
           "tool_ms": results[0].get("ms") if results else None}
    if turn.tool == "none":
        out["tool_ok"] = not calls
    else:
        out["tool_ok"] = names[:1] == [turn.tool] and args_match(turn.args, args)
        out["name_ok"] = names[:1] == [turn.tool]
        out["result_said"] = bool(results) and not results[0]["content"].startswith("error") \
            and carries(reply, results[0]["content"])
    return out


def summarize(results: list[dict]) -> dict | None:
    turns = [t for c in results if c["group"] == "tools" for t in c["turns"]
             if t.get("tool_called") is not None]
    if not turns:
        return None
    need = [t for t in turns if t["tool_expected"] != "none"]
    none = [t for t in turns if t["tool_expected"] == "none"]

    def p50(values):
        values = sorted(v for v in values if v is not None)
        return round(values[len(values) // 2]) if values else None

    called = [t for t in turns if t["tool_called"] not in ("none", None)]
    v2v_tool = p50(t["voice_to_voice_ms"] for t in called)
    v2v_plain = p50(t["voice_to_voice_ms"] for t in turns if t["tool_called"] == "none")
    tool_ms = p50(t.get("tool_ms") for t in called)
    return {
        "requests_needing_a_tool": len(need), "requests_needing_none": len(none),
        "right_tool_and_args": round(sum(t["tool_ok"] for t in need) / len(need), 3)
        if need else None,
        "right_tool": round(sum(t["name_ok"] for t in need) / len(need), 3) if need else None,
        "no_call_when_none_needed": round(sum(t["tool_ok"] for t in none) / len(none), 3)
        if none else None,
        "answer_carries_result": round(sum(t["result_said"] for t in need) / len(need), 3)
        if need else None,
        "v2v_p50_ms_with_tool": v2v_tool, "v2v_p50_ms_without": v2v_plain,
        "tool_p50_ms": tool_ms,
        "added_by_round_trip_ms": v2v_tool - v2v_plain
        if v2v_tool is not None and v2v_plain is not None else None}


def format_summary(s: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v * 100:.0f}%"
    return "\n".join([
        "| tools | right tool + args | right tool | no call when none needed | answer carries "
        "result | v2v p50 with / without a call | tool p50 | added by the round trip |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['requests_needing_a_tool']} + {s['requests_needing_none']} requests | "
        f"{pct(s['right_tool_and_args'])} | {pct(s['right_tool'])} | "
        f"{pct(s['no_call_when_none_needed'])} | {pct(s['answer_carries_result'])} | "
        f"{s['v2v_p50_ms_with_tool']} / {s['v2v_p50_ms_without']} ms | {s['tool_p50_ms']} ms | "
        f"{s['added_by_round_trip_ms']} ms |"])
