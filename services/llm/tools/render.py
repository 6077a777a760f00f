"""Tool calls and results for a chat template that knows no tools (SmolLM2's): each
result is told inside the user message it answers ("[get_time: 14:05 in Tokyo]"), and
a call that said nothing is left out, so a small model reads the result as a fact
of the question and says it.  Two example exchanges in front of the conversation show it
how (without them SmolLM2-135M often answers "I'm not equipped to check that")."""

from __future__ import annotations


ANSWER_EXAMPLES = [
    {"role": "user", "content": "Has my order 55 arrived?\n"
                                "[lookup_order: Order 55 was delivered on Friday.]"},
    {"role": "assistant", "content": "Yes, order 55 was delivered on Friday."},
    {"role": "user", "content": "How far is the moon?\n"
                                "[distance: The moon is 384,400 km away.]"},
    {"role": "assistant", "content": "The moon is 384,400 kilometers away."},
]


def plain(messages: list[dict]) -> list[dict]:
    out = _plain(messages)
    if any(m["role"] == "tool" for m in messages):  # after the system prompt
        at = 1 if out and out[0]["role"] == "system" else 0
        out[at:at] = [dict(m) for m in ANSWER_EXAMPLES]
    return out


def _plain(messages: list[dict]) -> list[dict]:
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
