"""What a session's typed control messages do (docs/protocol.md, "Client → server"):
``text`` (a turn of its own), ``cancel`` (the reply stops in every stage), ``configure``
(instructions and turn detection) and ``truncate`` (what the user heard of a reply).

``text`` and ``cancel`` advance the turn and write to the shared LLM stream, so they are
charged to the session's typed-message bucket: over it they are refused with
``rate_limited`` and nothing reaches Redis."""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from s2s.bus import Bus
from s2s.frames import SessionConfig, ToolOutput, ToolResult, Transcript

from . import messages, tool_messages
from .errors import Reject
from .limits import TokenBucket
from .playback import Playback


class Commands:
    def __init__(self, bus: Bus, sid: str, out_sr: int, playback: Playback,
                 send: Callable[[Any], Awaitable[None]], typed: TokenBucket | None,
                 typed_rate: float):
        self.bus, self.sid, self.out_sr, self.playback = bus, sid, out_sr, playback
        self.send, self.typed, self.typed_rate = send, typed, typed_rate

    async def handle(self, kind: str, obj: dict) -> bool:
        """Do what ``obj`` says; False when ``kind`` is not one of these."""
        handler = {"text": self.text, "cancel": self.cancel, "configure": self.configure,
                   "truncate": self.truncate, "tool_output": self.tool_output}.get(kind)
        if handler is None:
            return False
        await handler(obj)
        return True

    def _charge(self, kind: str) -> None:
        if self.typed is not None and not self.typed.take():
            raise Reject("rate_limited", f"more than {self.typed_rate:g} typed messages "
                         f"(text, cancel) per second: {kind} dropped")

    async def text(self, obj: dict) -> None:
        """Typed user input: a turn of its own, answered like a transcript."""
        text = messages.typed_text(obj)
        self._charge("text")
        turn = await self.bus.advance_turn(self.sid)
        await self.bus.emit(Transcript(sid=self.sid, turn=turn, text=text,
                                       out_sr=self.out_sr, marks={"speech_end": time.time()}))

    async def cancel(self, obj: dict) -> None:
        """Stop the reply in progress: a new turn supersedes it (every stage drops its
        work of the old turn) and the client is told to flush its playback."""
        self._charge("cancel")
        turn = await self.bus.advance_turn(self.sid)
        for message in self.playback.supersede(turn):
            await self.send(message)

    async def configure(self, obj: dict) -> None:
        """Per-session settings: ``instructions`` (the system prompt of this session's
        replies) and ``vad`` (turn detection; applied in order with the audio)."""
        instructions, vad = messages.configure(obj)
        if instructions is not None:
            await self.bus.set_prefs(self.sid, instructions=instructions)
        if vad is not None:
            await self.bus.emit(SessionConfig(sid=self.sid, vad=vad))
        if "tools" in obj or "tool_choice" in obj:  # the session's client tools (tools.md)
            tools = tool_messages.tools(obj["tools"]) if "tools" in obj else None
            names = [t["name"] for t in tools or []]
            choice = tool_messages.tool_choice(obj.get("tool_choice", "auto"), names)
            prefs = {"tool_choice": choice}
            if tools is not None:
                prefs["tools"] = json.dumps(tools)
            await self.bus.set_prefs(self.sid, **prefs)

    async def tool_output(self, obj: dict) -> None:
        """What the client's tools returned for the calls it got (``tool_call``): a turn
        of its own, which the assistant answers."""
        outputs, text = tool_messages.outputs(obj)
        self._charge("tool_output")
        turn = await self.bus.advance_turn(self.sid)
        await self.bus.emit(ToolOutput(sid=self.sid, turn=turn, text=text, out_sr=self.out_sr,
                                       outputs=[ToolResult(**o) for o in outputs],
                                       marks={"speech_end": time.time()}))

    async def truncate(self, obj: dict) -> None:
        """What the user heard of a reply (the client stopped playing it early): the
        conversation history keeps only that."""
        turn, text = messages.truncate(obj, self.playback.turn)
        await self.bus.set_prefs(self.sid, **{f"heard:{turn}": text})
