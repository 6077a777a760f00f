"""The voice side of tool calls, for the LLM stage: where a reply's text and calls come
from (``pieces``), and running a reply's calls (``run_calls``) with a filler ("Let me
check.") once a call has taken ``llm_tool_filler_ms``, said at most once per turn.

A call the model makes is checked against its tool's schema (the constrained decision
always passes; a server's model may not); the client's tools go to the client as
ToolCall frames, the others run here (calls.py).  A failed, timed-out or refused call
gets a spoken apology."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from prometheus_client import Counter

from s2s.frames import ToolCall

from .. import history
from . import calls as call_runner
from . import decide as decision
from .decide import Call
from .registry import ToolRegistry, ToolSet
from .render import plain

log = logging.getLogger("s2s.llm.tools")
APOLOGY = "Sorry, I could not get that done right now."
INVALID = Counter("s2s_llm_tool_invalid", "Tool calls refused before running: no such tool, "
                  "or arguments not valid against the tool's schema (a server's model; the "
                  "constrained decision never makes one).")


@dataclass
class RoundResult:
    calls: list[Call] = field(default_factory=list)
    failed: bool = False        # some call failed, timed out or was refused
    client: bool = False        # the calls went to the client: the turn ends here


class ToolTurns:
    def __init__(self, settings, backend, registry: ToolRegistry):
        self.settings, self.backend, self.registry = settings, backend, registry

    async def toolset(self, prefs: dict[str, str]) -> ToolSet:
        if self.registry.configured:
            await self.registry.start()
        return self.registry.for_session(prefs)

    async def pieces(self, messages: list[dict], toolset: ToolSet, sid: str, turn: int,
                     decide: bool) -> AsyncIterator["str | list[Call]"]:
        """The reply's text pieces, or one list of calls (then the text ends)."""
        s, backend = self.settings, self.backend
        if toolset and backend.native_tools:
            stream = backend.stream_tools(_for_server(messages), s.llm_max_tokens,
                                          s.llm_temperature, toolset.openai_tools(),
                                          toolset.openai_choice())
            try:
                async for item in stream:
                    yield item if isinstance(item, str) else [
                        _parsed(c, sid, turn, i) for i, c in enumerate(item)]
            finally:
                await stream.aclose()
            return
        if toolset and decide:
            request = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            made = await decision.decide(backend, toolset, request, sid, turn,
                                         s.llm_tool_none_bias)
            if made:
                yield made
                return
        # a server takes the calls and results as they are; a bare chat template, told
        stream = backend.stream(_for_server(messages) if backend.native_tools else
                                plain(messages), s.llm_max_tokens, s.llm_temperature)
        try:
            async for piece in stream:
                yield piece
        finally:
            await stream.aclose()

    async def run_calls(self, speaker, calls: list[Call], toolset: ToolSet,
                        result: RoundResult, filler_said: list[bool]) -> AsyncIterator:
        """Record the calls in the history, then run them: yields ToolCall frames (client
        tools) or, if they take long, the filler ReplyText; fills ``result``."""
        frame = speaker.frame
        frame.stamp("tool_decided")  # the answer's chunks carry where its time went
        await speaker.save(history.add_tool_calls(speaker.ctx, frame.turn,
                                                  " ".join(speaker.spoken),
                                                  [c.openai() for c in calls]))
        result.calls = calls
        refused = [(c, why) for c in calls if (why := decision.valid(c, toolset))]
        for c, why in refused:
            INVALID.inc()
            log.warning("tool call refused: %s", why, extra={"sid": frame.sid, "turn": frame.turn})
            await speaker.save(history.add_tool_result(speaker.ctx, frame.turn, c.id, c.name,
                                                       f"error: {why}"))
            result.failed = True
        good = [c for c in calls if all(c is not r for r, _ in refused)]
        mine = [c for c in good if not toolset.tools[c.name].client]
        theirs = [c for c in good if toolset.tools[c.name].client]
        for c in theirs:
            result.client = True
            yield ToolCall(sid=frame.sid, turn=frame.turn, marks=dict(frame.marks),
                           call_id=c.id, name=c.name, arguments=c.arguments_json)
        if not mine:
            return
        s = self.settings
        running = asyncio.ensure_future(asyncio.gather(*[
            call_runner.run(speaker.state, frame.sid, frame.turn, c, toolset.tools[c.name],
                            s.llm_tool_timeout_s) for c in mine]))
        try:
            if not filler_said[0] and s.llm_tool_filler_ms > 0 and s.llm_tool_filler:
                done, _ = await asyncio.wait({running}, timeout=s.llm_tool_filler_ms / 1000)
                if not done:
                    filler_said[0] = True
                    yield await speaker.say(s.llm_tool_filler)
            outcomes = await asyncio.shield(running)
        finally:
            if not running.done():
                running.cancel()  # barge-in: each call's own task still ends and records
        frame.stamp("tool_done")
        for c, outcome in zip(mine, outcomes):
            await speaker.save(history.add_tool_result(
                speaker.ctx, frame.turn, c.id, c.name,
                outcome.output if outcome.ok else f"error: {outcome.output}", outcome.ms))
            result.failed |= not outcome.ok


def _parsed(call: dict, sid: str, turn: int, index: int) -> Call:
    """A server's call; arguments that are not a JSON object are kept as given, so the
    schema check refuses them."""
    try:
        arguments = json.loads(call.get("arguments") or "{}")
    except ValueError:
        arguments = call.get("arguments")
    # our own deterministic id, not the server's: a re-run of the turn finds the record
    name = call.get("name", "")
    return Call(decision.call_id(sid, turn, index, name, arguments), name, arguments)


def _for_server(messages: list[dict]) -> list[dict]:
    """OpenAI's tool message has no ``name``."""
    return [{k: v for k, v in m.items() if k != "name"} if m["role"] == "tool" else m
            for m in messages]
