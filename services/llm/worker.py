"""The LLM stage: a user transcript in, the reply out as speakable chunks.

Chunks go out the moment they are complete (the first as soon as a clause
allows), so TTS speaks while the model still writes.  The conversation lives
in Redis (any worker serves any turn) and keeps only what was actually sent:
when the user barges in, the runtime cancels ``process`` and the backend stops.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import AsyncIterator

from prometheus_client import Counter

from s2s.config import Settings
from s2s.frames import ReplyText, Transcript
from s2s.stage import Stage

from . import backends, history
from .chunker import Chunker
from .replies import Repeats, ends_sentence, last_sentences
from .speakable import speakable

log = logging.getLogger("s2s.llm")

ANSWERED_EARLY = Counter("s2s_llm_answered_early", "Replies spoken before the user had finished: "
                         "the user went on (a continuation replaced the answered message).")
REPLY_CUT = Counter("s2s_llm_reply_cut", "Replies shortened for the ear, by reason (repeated: a "
                    "sentence said again stopped the reply; unfinished: the token cap cut the "
                    "last sentence, which was left unsaid).", ["reason"])
HELD_TURNS = 32  # turns one worker may hold (waiting for the user to go on) beside its model slots


# A finished turn opening like this asks for an answer ("Tell me a fun fact.", "Can you…"):
# answered at once, like a question; other statements may be a dictation that goes on.
REQUEST_OPENERS = frozenset("""tell give show explain describe list recommend suggest name
    define translate summarize summarise compare help find say can could would what why how
    who whom whose where when which is are do does did""".split())


def asks(text: str) -> bool:
    """Does a finished turn ask for an answer now: a question or a request in any of its
    sentences ("What is the capital of France? Answer in one sentence." asks)?"""
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        stripped = sentence.strip().rstrip(" \"'”’)")
        first = stripped.split(maxsplit=1)[0].strip(",.!?\"'“”").lower() if stripped else ""
        if stripped.endswith("?") or first in REQUEST_OPENERS:
            return True
    return False


class LlmStage(Stage):
    name = "llm"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.backend = backends.create(settings)
        # The runtime's limit counts held turns too; the model's own slots are a semaphore
        # taken only after the hold, so unfinished sentences waiting for the user to go
        # on never block another session's reply (batching engines take more at once).
        self.slots = self.backend.concurrency
        self.concurrency = self.slots + HELD_TURNS
        self._model_slots: asyncio.Semaphore | None = None

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
        ctx = await self.state.load(frame.sid)
        prefs = await self.state.prefs(frame.sid)  # what the client asked for, if anything
        ctx = history.apply_heard(ctx, prefs)
        if history.answered_early(ctx, frame.turn, frame.start_s):
            ANSWERED_EARLY.inc()
        ctx = history.start_turn(ctx, frame.turn, text, s.llm_history_turns, frame.start_s,
                                 frame.end_s)
        await self.state.save(frame.sid, ctx)
        await self._hold(frame, text)  # outside the model slots: holding costs no slot
        if frame.turn < await self.state.current_turn(frame.sid):
            return  # superseded while held: it never takes a slot (the runtime drops it too)
        if self._model_slots is None:  # created inside the worker's event loop
            self._model_slots = asyncio.Semaphore(self.slots)
        async with self._model_slots:
            async for reply in self._reply(frame, ctx,
                                           prefs.get("instructions") or s.llm_system_prompt):
                yield reply

    async def _reply(self, frame: Transcript, ctx: dict,
                     system_prompt: str) -> AsyncIterator[ReplyText]:
        s = self.settings
        started, first_ms = time.perf_counter(), None
        chunker, spoken, seq, repeats, cut = Chunker(), [], 0, Repeats(), ""
        stream = self.backend.stream(history.messages(ctx, system_prompt),
                                     s.llm_max_tokens, s.llm_temperature)
        try:
            async for piece in stream:
                for chunk in chunker.feed(piece):
                    said, repeated = repeats.check(speakable(chunk))
                    if said:
                        ctx = await self._remember(frame, ctx, spoken, said)
                        if first_ms is None:
                            first_ms = (time.perf_counter() - started) * 1000
                        yield self._emit(frame, seq, said, final=False)
                        seq += 1
                    if repeated:  # the model loops: what it says next is more of the same
                        cut = "repeated"
                        break
                if cut:
                    break
        finally:
            await stream.aclose()  # on cancellation too: stops the generation at once
        said = "" if cut else speakable(chunker.flush())
        if said and not ends_sentence(said):
            # cut off by llm_max_tokens mid-sentence: the unfinished end is left unsaid
            # (a lone short answer without a full stop, "Paris", is still an answer)
            whole = last_sentences(said)
            if whole or spoken:
                said = whole
                REPLY_CUT.labels("unfinished").inc()
        if said:
            said, looped = repeats.check(said)
            cut = cut or ("repeated" if looped else "")
        if cut:
            REPLY_CUT.labels(cut).inc()
        if said:
            ctx = await self._remember(frame, ctx, spoken, said)
        log.info("replied in %d chunk(s), first after %s ms, all after %.0f ms%s", seq + 1,
                 f"{first_ms:.0f}" if first_ms is not None else "-",
                 (time.perf_counter() - started) * 1000, f" ({cut})" if cut else "",
                 extra={"sid": frame.sid, "turn": frame.turn, "held": not frame.complete})
        yield self._emit(frame, seq, said, final=True)  # may be empty: it closes the reply

    async def _hold(self, frame: Transcript, text: str) -> None:
        """Give the user time to go on, counted from the end of their speech: an unfinished
        turn (the end-of-turn model or, without it, the transcript's ending says so)
        waits llm_turn_hold_ms, a finished statement llm_statement_hold_ms, a question
        nothing.  If the user goes on, the turn advances and we are cancelled here."""
        s = self.settings
        hold = s.llm_turn_hold_ms if not frame.complete else \
            0 if asks(text) else s.llm_statement_hold_ms
        if hold <= 0:
            return
        speech_end = frame.marks.get("speech_end", time.time())
        delay = speech_end + hold / 1000 - time.time()
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
