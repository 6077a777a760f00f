"""A session's conversation as stored in Redis (``s2s:ctx:{sid}``, JSON).

    {"history": [{"role": "user", "content": "...", "turn": 3, "start_s": 0.3, "end_s": 2.3},
                 {"role": "assistant", "content": "...", "turn": 3}, ...]}

Tool calls are kept as the OpenAI chat format keeps them: an assistant entry with
``tool_calls`` (and ``content`` what was said before the call, often ""), then one
``{"role": "tool", "tool_call_id", "name", "content"}`` entry per result, then the
assistant's spoken answer.  A client's tool results arrive in a turn of their own.

Entries carry their turn so that a re-run of a turn (a worker died mid-reply,
another claimed the entry) replaces that turn instead of appending it twice.
User entries carry the session audio span of their speech (older contexts may
lack it).  A transcript that starts inside the previous user message's span is
a *continuation* (the VAD re-sent the thought from its start, pieces and pauses
included): it replaces that message, and drops the reply to it if there is one:
the assistant started too early, the user went on, and the new message already
holds what it answered.  Otherwise a user message whose turn got no reply at all
(superseded before anything was spoken) is kept, and the next user message is
joined to it when the prompt is built, so the model sees the whole sentence.
"""

from __future__ import annotations

from typing import Any


def start_turn(ctx: Any, turn: int, text: str, keep_turns: int,
               start_s: float | None = None, end_s: float | None = None) -> dict:
    """The context with this turn's user message recorded (and older turns trimmed);
    ``start_s``/``end_s`` (session audio positions) detect a continuation."""
    history = [m for m in _history(ctx) if m.get("turn", -1) < turn]
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    if users and start_s is not None and _continues(history[users[-1]], start_s):
        history = history[:users[-1]]  # the message and the early reply to it
    entry = {"role": "user", "content": text, "turn": turn}
    if start_s is not None and end_s is not None:
        entry.update(start_s=start_s, end_s=end_s)
    history.append(entry)
    return {"history": _trim(history, keep_turns)}


def answered_early(ctx: Any, turn: int, start_s: float | None) -> bool:
    """Does a message starting at ``start_s`` continue one that already got a spoken
    reply?  Then the reply came before the user had finished."""
    history = [m for m in _history(ctx) if m.get("turn", -1) < turn]
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    if not users or start_s is None or not _continues(history[users[-1]], start_s):
        return False
    return any(m["role"] == "assistant" and m["content"].strip()
               for m in history[users[-1] + 1:])


def set_reply(ctx: dict, turn: int, text: str) -> dict:
    """Record what was spoken so far of this turn's reply (replacing the last value; the
    turn's tool calls and results stay before it)."""
    history = [m for m in ctx["history"] if not (m["role"] == "assistant" and m["turn"] == turn
                                                 and not m.get("tool_calls"))]
    history.append({"role": "assistant", "content": text, "turn": turn})
    return {"history": history}


def add_tool_calls(ctx: dict, turn: int, said: str, calls: list[dict]) -> dict:
    """This turn's reply calls tools (``calls``: OpenAI ``tool_calls`` entries) after
    saying ``said``: an assistant entry with them replaces what was recorded as said."""
    history = [m for m in ctx["history"] if not (m["role"] == "assistant" and m["turn"] == turn
                                                 and not m.get("tool_calls"))]
    history.append({"role": "assistant", "content": said, "tool_calls": calls, "turn": turn})
    return {"history": history}


def add_tool_result(ctx: dict, turn: int, call_id: str, name: str, output: str,
                    ms: float | None = None) -> dict:
    """A call's result (``ms``: how long the call took, for the eval; not for the model)."""
    history = [m for m in ctx["history"] if not (m["role"] == "tool"
                                                 and m.get("tool_call_id") == call_id)]
    entry = {"role": "tool", "tool_call_id": call_id, "name": name, "content": output,
             "turn": turn}
    if ms is not None:
        entry["ms"] = round(ms, 1)
    history.append(entry)
    return {"history": history}


def unsaid(ctx: dict, turn: int) -> dict:
    """The context without what this turn's reply said so far (a filler, "Let me
    check."): the model's next round continues after the tool results, not after it."""
    return {"history": [m for m in ctx["history"] if not (
        m["role"] == "assistant" and m["turn"] == turn and not m.get("tool_calls"))]}


def start_tool_turn(ctx: Any, turn: int, keep_turns: int) -> dict:
    """A turn that answers a client's tool results (added next): a re-run replaces it."""
    return {"history": _trim([m for m in _history(ctx) if m.get("turn", -1) < turn],
                             keep_turns)}


def open_calls(ctx: dict) -> dict[str, str]:
    """Calls of the history without a result yet: id -> tool name."""
    calls = {c["id"]: c["function"]["name"] for m in ctx["history"]
             for c in m.get("tool_calls") or [] if m["role"] == "assistant"}
    for m in ctx["history"]:
        if m["role"] == "tool":
            calls.pop(m.get("tool_call_id"), None)
    return calls


def apply_heard(ctx: Any, prefs: dict[str, str]) -> Any:
    """The context with each reply the client stopped early (``heard:<turn>`` in the
    session's prefs: a Realtime ``conversation.item.truncate``) cut to what was heard."""
    heard = {}
    for key, text in prefs.items():
        name, _, turn = key.partition(":")
        if name == "heard" and turn.isdigit():
            heard[int(turn)] = text
    if not heard or not isinstance(ctx, dict) or not isinstance(ctx.get("history"), list):
        return ctx
    history = [dict(m, content=heard[m["turn"]])
               if isinstance(m, dict) and m.get("role") == "assistant" and m.get("turn") in heard
               else m for m in ctx["history"]]
    return {**ctx, "history": history}


def messages(ctx: dict, system_prompt: str) -> list[dict]:
    """Chat messages for the model (OpenAI chat format): system prompt, then the history,
    with user messages that got no reply joined to the next one."""
    out: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for m in ctx["history"]:
        if out and out[-1]["role"] == m["role"] == "user":
            out[-1] = {"role": "user", "content": f"{out[-1]['content']} {m['content']}"}
        elif m["role"] == "tool":
            out.append({"role": "tool", "tool_call_id": m.get("tool_call_id", ""),
                        "name": m.get("name", ""), "content": m["content"]})
        elif m.get("tool_calls"):
            out.append({"role": "assistant", "content": m["content"] or None,
                        "tool_calls": m["tool_calls"]})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _continues(previous: dict, start_s: float) -> bool:
    """Did the speech of a message starting at ``start_s`` include ``previous``'s?  A
    continuation starts where the thought (so the previous piece) started; requiring
    that too keeps audio positions that restarted at 0 (a VAD takeover) from matching."""
    start, end = previous.get("start_s"), previous.get("end_s")
    numbers = all(isinstance(v, (int, float)) for v in (start, end))
    return numbers and start <= start_s < end


def _history(ctx: Any) -> list[dict]:
    if isinstance(ctx, dict) and isinstance(ctx.get("history"), list):
        return [m for m in ctx["history"] if isinstance(m, dict)
                and m.get("role") in ("user", "assistant", "tool")
                and isinstance(m.get("content"), str)]
    return []  # nothing stored yet, or something unreadable: start afresh


def _trim(history: list[dict], keep_turns: int) -> list[dict]:
    """Keep at most ``keep_turns`` exchanges (an exchange starts at a user message that
    follows an assistant reply, so a merged run of user messages is one).  Once over,
    the oldest are cut in a block, down to the last half (at least 2), not one by one:
    the prompt then starts the same for several turns, so the model's keys/values of
    the previous turn are reused (prefix cache) instead of re-reading the whole
    conversation every turn once the history is full."""
    starts = [i for i, m in enumerate(history)
              if m["role"] == "user" and (i == 0 or history[i - 1]["role"] == "assistant")]
    if len(starts) > keep_turns:
        keep = max(1, min(keep_turns, 2), (keep_turns + 1) // 2)
        history = history[starts[-keep]:]
    return history
