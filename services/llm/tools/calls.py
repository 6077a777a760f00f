"""Running a call exactly as often as it may run.  Each call's state is recorded in the
session's state in Redis under its own key (``llm-call:<id>``; ids are deterministic,
decide.call_id) before and after it runs, so a worker that takes over a turn whose
worker died mid-call:

* finds a finished call's output and does not call again;
* finds a call that started and never finished: an idempotent tool is called again, any
  other is not (it may have done its work): the reply says that it could not confirm.

The call runs in a task of its own, shielded from the reply: a user who barges in
cancels the reply, not a call half done, whose end is still recorded (the next turn's
history has it)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from .decide import Call
from .spec import Tool, ToolError

log = logging.getLogger("s2s.llm.tools")

CALLS = Counter("s2s_llm_tool_calls", "Tool calls by outcome (ok, error, timeout, reused: a "
                "finished call found after a takeover, unconfirmed: a non-idempotent call "
                "that started on a worker that died, not run again).", ["outcome"])
CALL_SECONDS = Histogram("s2s_llm_tool_seconds", "Time of one tool call.",
                         buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10, 30))
KEY_PREFIX = "llm-call:"


@dataclass
class Outcome:
    ok: bool
    output: str          # the tool's result, or why there is none
    ran: bool = True     # this worker ran it (False: found recorded)
    ms: float | None = None  # how long it ran


async def run(state, sid: str, turn: int, call: Call, tool: Tool, timeout_s: float) -> Outcome:
    key = KEY_PREFIX + call.id
    raw = await state.load_own(sid, key)
    record = json.loads(raw) if raw else None
    if record and record.get("status") in ("done", "failed"):
        CALLS.labels("reused").inc()
        return Outcome(record["status"] == "done", record.get("output", ""), ran=False)
    if record and not tool.idempotent:
        CALLS.labels("unconfirmed").inc()
        log.warning("call %s of %s started on a worker that died: not run again (not "
                    "idempotent)", call.id, call.name, extra={"sid": sid, "turn": turn})
        return Outcome(False, "the call may or may not have run; it was not repeated",
                       ran=False)
    await state.save_own(sid, key, json.dumps({"status": "started", "turn": turn,
                                               "name": call.name, "at": time.time()}))
    task = asyncio.ensure_future(_run_and_record(state, sid, key, turn, call, tool, timeout_s))
    return await asyncio.shield(task)


async def _run_and_record(state, sid: str, key: str, turn: int, call: Call, tool: Tool,
                          timeout_s: float) -> Outcome:
    started = time.perf_counter()
    try:
        output = await asyncio.wait_for(tool.run(call.arguments), timeout_s)
        outcome = Outcome(True, output)
        CALLS.labels("ok").inc()
    except asyncio.TimeoutError:
        outcome = Outcome(False, f"{call.name} took longer than {timeout_s:g} s")
        CALLS.labels("timeout").inc()
    except Exception as e:  # ToolError or the tool's own bug: the reply apologises
        outcome = Outcome(False, f"{call.name} failed: {e}"[:500])
        CALLS.labels("error").inc()
        if not isinstance(e, ToolError):
            log.exception("tool %s raised", call.name, extra={"sid": sid, "turn": turn})
    outcome.ms = (time.perf_counter() - started) * 1000
    CALL_SECONDS.observe(outcome.ms / 1000)
    await state.save_own(sid, key, json.dumps({
        "status": "done" if outcome.ok else "failed", "turn": turn, "name": call.name,
        "output": outcome.output}))
    if not outcome.ok:
        log.warning("tool call %s: %s", call.name, outcome.output,
                    extra={"sid": sid, "turn": turn})
    return outcome
