"""The ``tools`` group of ``s2s eval``: did the assistant call the right tool with the
right arguments (or none, when none was needed), and does its spoken answer carry the
tool's result?  The calls are read from the session's conversation in Redis
(``--redis-url``: the stack's; the OpenAI chat format of services/llm/history.py).

Also the latency a tool round trip adds: voice-to-voice of the turns that called a tool
against that of the turns that did not (same run, same machine), beside the tools' own
time (each tool entry of the history carries ``ms``)."""

from __future__ import annotations

import ast
import asyncio
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


# --- the stages alone: ``python -m s2s.bench.eval_tools`` -------------------------------
# The tools group's audio through the real STT stage (with and without its tool bias) and
# the real LLM stage with the example tools, without a gateway or VAD: WER, the right
# call, the answer, and where a tool turn's time goes (decision, tool, answer), in a
# minute or two instead of a stack's eval.  A tool turn's first answer chunk against a
# turn that calls none is the round trip's added time at the LLM stage.

async def stages(bias_modes: list[bool], tools_spec: str, cache_dir: str, only: str = "",
                 overrides: dict | None = None) -> dict:
    import os
    import time
    from pathlib import Path

    from s2s import config, frames, keys
    from s2s.frames import ReplyText, Transcript, Utterance
    from s2s.launcher.redis_server import RedisServer
    from s2s.services.llm.worker import LlmStage
    from s2s.services.stt.worker import SttStage
    from s2s.stage import SessionState
    from s2s.worker import Runtime

    from .eval_set import CONVERSATIONS, Voices
    from .eval_score import wer

    convs = [c for c in CONVERSATIONS if c.group == "tools" and only in c.id]
    voices = Voices(Path(cache_dir))
    audio = {c.id: voices.turn_audio(c.voice, c.turns[0])[0] for c in convs}
    out: dict = {}
    with RedisServer() as server:
        base = {"redis_url": server.url, "metrics_port": 0, **(overrides or {})}
        mcp = tools_spec.startswith(("stdio:", "http"))
        tools = {"llm_mcp_servers" if mcp else "llm_tools": tools_spec}
        llm = LlmStage(config.load({**base, **tools, "llm_tool_filler_ms": 0}, environ={}))
        await asyncio.to_thread(llm.setup)
        rt = Runtime(llm, llm.settings)
        for bias in bias_modes:
            stt = SttStage(config.load({**base, **tools, "stt_tool_bias": bias}, environ={}))
            await asyncio.to_thread(stt.setup)
            stt.state = SessionState(rt.bus)
            rows = []
            for c in convs:
                sid = f"{c.id}-{int(bias)}-{os.getpid()}"
                pcm = audio[c.id]
                utt = Utterance(sid=sid, turn=1, pcm=pcm.tobytes(), sr=16000, start_s=0.0,
                                end_s=len(pcm) / 16000, complete=True)
                heard = [f async for f in stt.process(utt) if isinstance(f, Transcript)]
                text = heard[0].text if heard else ""
                await rt.bus.redis.set(keys.turn(sid), 1)
                started = time.time()
                await rt.run_item(Transcript(sid=sid, turn=1, text=text, complete=True,
                                             marks={"speech_end": started}, out_sr=24000),
                                  started)
                replies = [f for _, fl in await rt.bus.redis.xrange(keys.out(sid))
                           if isinstance(f := frames.decode(fl[b"f"]), ReplyText)]
                said = " ".join(r.text for r in replies if r.text)
                marks = replies[0].marks if replies else {}
                entries = history(server.url, sid) or []
                row = score_turn(c.turns[0], said, entries)
                row.update(id=c.id, voice=c.voice, heard=text, said=said,
                           wer=wer(c.turns[0].pieces[0], text),
                           first_ms=round((marks.get("llm_first", started) - started) * 1000),
                           parts_ms={k: round((v - started) * 1000) for k, v in marks.items()
                                     if k.startswith("tool_")})
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
            out["bias" if bias else "plain"] = {"rows": rows, "summary": stage_summary(rows)}
            print(format_stage_summary(("bias" if bias else "plain"), out["bias" if bias
                                                                         else "plain"]["summary"]))
        await rt.bus.close()
        await llm.tools.registry.close()
    return out


def stage_summary(rows: list[dict]) -> dict:
    need = [r for r in rows if r["tool_expected"] != "none"]
    none = [r for r in rows if r["tool_expected"] == "none"]
    exact = [r for r in need if r["wer"] == 0]
    called = [r for r in need if r.get("tool_called") not in ("none", None)]
    plain = [r for r in rows if r.get("tool_called") == "none"]

    def p50(values):
        values = sorted(values)
        return values[len(values) // 2] if values else None

    parts = {}
    for key in ("tool_decided", "tool_done"):
        parts[key] = p50([r["parts_ms"][key] for r in called if key in r["parts_ms"]])
    return {"wer": round(statistics.mean(r["wer"] for r in rows), 3),
            "wer_need_tool": round(statistics.mean(r["wer"] for r in need), 3),
            "heard_exactly": f"{len(exact)}/{len(need)}",
            "right_tool_and_args": round(sum(r["tool_ok"] for r in need) / len(need), 3),
            "right_when_heard_exactly": f"{sum(r['tool_ok'] for r in exact)}/{len(exact)}",
            "right_tool": round(sum(r["name_ok"] for r in need) / len(need), 3),
            "no_call_when_none_needed": round(sum(r["tool_ok"] for r in none) / len(none), 3)
            if none else None,
            "answer_carries_result": round(sum(r["result_said"] for r in need) / len(need), 3),
            "first_ms_p50_with_tool": p50([r["first_ms"] for r in called]),
            "first_ms_p50_without": p50([r["first_ms"] for r in plain]),
            "tool_ms_p50": p50([r["tool_ms"] for r in called if r.get("tool_ms") is not None]),
            "parts_ms_p50": parts}


def format_stage_summary(label: str, s: dict) -> str:
    return f"[{label}] " + ", ".join(f"{k}={v}" for k, v in s.items())


def main(argv: list[str] | None = None) -> None:
    import argparse
    import asyncio as aio
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description="The tools group through the STT and LLM "
                                     "stages alone (no gateway, no VAD).")
    parser.add_argument("--bias", choices=["on", "off", "both"], default="both",
                        help="the STT stage's tool bias (stt_tool_bias)")
    parser.add_argument("--tools", default=f"stdio:{sys.executable} examples/voice_tools/server.py",
                        help="an S2S_LLM_MCP_SERVERS entry or an S2S_LLM_TOOLS entry")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "s2s" / "eval-audio"))
    parser.add_argument("--only", default="", help="only requests whose id contains this")
    parser.add_argument("--json", help="write the rows and summaries here")
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a setting of both stages, e.g. llm_tool_none_bias=0")
    args = parser.parse_args(argv)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.bias]
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers and booleans as such
        except ValueError:
            overrides[key] = value
    out = aio.run(stages(modes, args.tools, args.cache_dir, args.only, overrides))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
