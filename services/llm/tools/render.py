"""Tool calls and results for a chat template that knows no tools (SmolLM2's): each
result is told inside the user message it answers ("[get_time: 14:05 in Tokyo]"), and
a call that said nothing is left out, so a small model reads the result as a fact
of the question and says it."""

from __future__ import annotations


def plain(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            fact = f"[{m.get('name') or 'tool'}: {m['content']}]"
            users = [i for i, o in enumerate(out) if o["role"] == "user"]
            if users:
                i = users[-1]
                out[i] = {"role": "user", "content": f"{out[i]['content']}\n{fact}"}
            else:
                out.append({"role": "user", "content": fact})
        elif m.get("tool_calls"):
            if m.get("content"):
                out.append({"role": "assistant", "content": m["content"]})
        else:
            out.append({"role": m["role"], "content": m["content"] or ""})
    return out
