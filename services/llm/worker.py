"""The LLM stage: a user transcript in, the reply out as speakable chunks.

Chunks go out the moment they are complete (the first as soon as a clause
allows), so TTS speaks while the model still writes.  The conversation lives
in Redis (any worker serves any turn) and keeps only what was actually sent:
when the user barges in, the runtime cancels ``process`` and the backend stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from s2s.config import Settings
from s2s.frames import ReplyText, Transcript
from s2s.stage import Stage

from . import backends, history
from .chunker import Chunker
from .speakable import speakable

log = logging.getLogger("s2s.llm")


class LlmStage(Stage):
    name = "llm"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.backend = backends.create(settings)
        self.concurrency = self.backend.concurrency  # batching engines take more at once

    def setup(self) -> None:
        self.backend.setup()

    def describe(self) -> str:
        return self.backend.describe()

    async def process(self, frame: Transcript) -> AsyncIterator[ReplyText]:
        s = self.settings
        text = frame.text.strip()
        if not text:
            return
        # the user message is recorded before any waiting: if this turn is superseded
        # before a word is spoken, the next turn's text replaces it (a continuation,
        # which re-heard its audio) or is joined to it
        ctx = history.start_turn(await self.state.load(frame.sid), frame.turn, text,
                                 s.llm_history_turns, frame.start_s, frame.end_s)
        await self.state.save(frame.sid, ctx)
        if not frame.complete:
            await self._hold(frame)

        started, first_ms = time.perf_counter(), None
        chunker, spoken, seq = Chunker(), [], 0
        stream = self.backend.stream(history.messages(ctx, s.llm_system_prompt),
                                     s.llm_max_tokens, s.llm_temperature)
        try:
            async for piece in stream:
                for chunk in chunker.feed(piece):
                    if said := speakable(chunk):
                        ctx = await self._remember(frame, ctx, spoken, said)
                        if first_ms is None:
                            first_ms = (time.perf_counter() - started) * 1000
                        yield self._emit(frame, seq, said, final=False)
                        seq += 1
        finally:
            await stream.aclose()  # on cancellation too: stops the generation at once
        said = speakable(chunker.flush())
        if spoken and not said.endswith(tuple(".!?…\"'”")):
            said = ""  # cut off by llm_max_tokens mid-sentence: better left unsaid
        if said:
            ctx = await self._remember(frame, ctx, spoken, said)
        log.info("replied in %d chunk(s), first after %s ms, all after %.0f ms", seq + 1,
                 f"{first_ms:.0f}" if first_ms is not None else "-",
                 (time.perf_counter() - started) * 1000,
                 extra={"sid": frame.sid, "turn": frame.turn, "held": not frame.complete})
        yield self._emit(frame, seq, said, final=True)  # may be empty: it closes the reply

    async def _hold(self, frame: Transcript) -> None:
        """The transcript does not end a sentence: give the user llm_turn_hold_ms of
        silence to go on.  If they do, the turn advances and we are cancelled here."""
        speech_end = frame.marks.get("speech_end", time.time())
        delay = speech_end + self.settings.llm_turn_hold_ms / 1000 - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _remember(self, frame: Transcript, ctx: dict, spoken: list[str], said: str) -> dict:
        # saved before the chunk is sent: a barge-in right after leaves exactly what
        # the user may have heard in the history
        spoken.append(said)
        ctx = history.set_reply(ctx, frame.turn, " ".join(spoken))
        await self.state.save(frame.sid, ctx)
        return ctx

    def _emit(self, frame: Transcript, seq: int, text: str, final: bool) -> ReplyText:
        reply = ReplyText(sid=frame.sid, turn=frame.turn, seq=seq, text=text, final=final,
                          out_sr=frame.out_sr, marks=dict(frame.marks))
        if seq == 0:
            reply.stamp("llm_first")
        return reply
