"""The LLM stage: a user transcript in, the reply out as speakable chunks.

Chunks go out the moment they are complete (the first as soon as a clause
allows), so TTS speaks while the model still writes.  The conversation lives
in Redis (any worker serves any turn) and keeps only what was actually sent:
when the user barges in, the runtime cancels ``process`` and the backend stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import AsyncIterator

from prometheus_client import Counter

from s2s.config import Settings
from s2s.frames import Frame, ReplyText, ToolOutput, Transcript
from s2s.stage import Stage

from . import backends, history
from .replies import SpokenText, asks
from .speaker import Speaker
from .tools import ToolRegistry, ToolSet
from .tools.turns import APOLOGY, RoundResult, ToolTurns
from .turn_end import HOLDS, PROBE_SECONDS, TurnEnd

log = logging.getLogger("s2s.llm")

ANSWERED_EARLY = Counter("s2s_llm_answered_early", "Replies spoken before the user had finished: "
                         "the user went on (a continuation replaced the answered message).")
REPLY_CUT = Counter("s2s_llm_reply_cut", "Replies shortened for the ear, by reason (repeated: a "
                    "sentence said again stopped the reply; unfinished: the token cap cut the "
                    "last sentence, which was left unsaid).", ["reason"])
HELD_TURNS = 32  # turns one worker may hold (waiting for the user to go on) beside its model slots


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
        self.tools = ToolTurns(settings, self.backend, ToolRegistry(settings))

    def setup(self) -> None:
        self.backend.setup()

    def describe(self) -> str:
        return self.backend.describe()

    async def process(self, frame: Transcript | ToolOutput) -> AsyncIterator[Frame]:
        s = self.settings
        if isinstance(frame, ToolOutput):
            async for out in self._tool_outputs(frame):
                yield out
            return
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
        # outside the model slots: holding costs no slot
        await self._hold(frame, await self._turn_end(frame, ctx, prefs, text))
        if frame.turn < await self.state.current_turn(frame.sid):
            return  # superseded while held: it never takes a slot (the runtime drops it too)
        async for out in self._answer(frame, ctx, prefs, decide=True):
            yield out

    async def _tool_outputs(self, frame: ToolOutput) -> AsyncIterator[Frame]:
        """The client's tool results (a turn of their own): recorded, then answered."""
        s = self.settings
        ctx = history.apply_heard(await self.state.load(frame.sid),
                                  prefs := await self.state.prefs(frame.sid))
        ctx = history.start_tool_turn(ctx, frame.turn, s.llm_history_turns)
        names = history.open_calls(ctx)
        for result in frame.outputs:
            ctx = history.add_tool_result(ctx, frame.turn, result.call_id,
                                          names.get(result.call_id, ""), result.output)
        if frame.text.strip():
            ctx["history"].append({"role": "user", "content": frame.text.strip(),
                                   "turn": frame.turn})
        await self.state.save(frame.sid, ctx)
        async for out in self._answer(frame, ctx, prefs, decide=bool(frame.text.strip())):
            yield out

    async def _answer(self, frame, ctx: dict, prefs: dict,
                      decide: bool) -> AsyncIterator[Frame]:
        """The reply: text, or tool calls then (for the deployment's tools) the answer
        with their results, up to llm_tool_rounds rounds."""
        s = self.settings
        system_prompt = prefs.get("instructions") or s.llm_system_prompt
        toolset = await self.tools.toolset(prefs)
        if self._model_slots is None:  # created inside the worker's event loop
            self._model_slots = asyncio.Semaphore(self.slots)
        speaker, filler_said = Speaker(self.state, frame, ctx), [False]
        async with self._model_slots:
            for round_ in range(max(1, s.llm_tool_rounds) + 1):
                offered = toolset if round_ < s.llm_tool_rounds else ToolSet()
                spoken = SpokenPieces()
                context = history.unsaid(speaker.ctx, frame.turn)
                pieces = self.tools.pieces(history.messages(context, system_prompt),
                                           offered, frame.sid, frame.turn,
                                           decide=decide and round_ == 0)
                async for reply in self._reply(speaker, pieces, spoken):
                    yield reply
                if not spoken.calls:
                    yield spoken.last(speaker)
                    break
                result = RoundResult()
                async for out in self.tools.run_calls(speaker, spoken.calls, toolset, result,
                                                      filler_said):
                    yield out
                if result.client:  # the client answers with a ToolOutput: a turn of its own
                    yield speaker.close()
                    break
                if result.failed:
                    await speaker.remember(APOLOGY)
                    yield speaker.last(APOLOGY)
                    break
        log.info("replied in %d chunk(s), first after %s ms, all after %.0f ms%s",
                 speaker.seq, f"{speaker.first_ms:.0f}" if speaker.first_ms is not None else "-",
                 (time.perf_counter() - speaker.started) * 1000,
                 f" ({spoken.cut})" if spoken.cut else "",
                 extra={"sid": frame.sid, "turn": frame.turn,
                        "held": not getattr(frame, "complete", True)})

    async def _reply(self, speaker: Speaker, pieces: AsyncIterator,
                     spoken: "SpokenPieces") -> AsyncIterator[ReplyText]:
        """Speak the text pieces as they come (chunked for TTS, loops cut); a list of
        calls among them ends the text (``spoken.calls``)."""
        text = SpokenText()
        try:
            async for piece in pieces:
                if not isinstance(piece, str):
                    spoken.calls = piece
                    break
                for said in text.feed(piece):
                    yield await speaker.say(said)
                if text.cut:
                    break
        finally:
            await pieces.aclose()  # on cancellation too: stops the generation at once
        said = text.end(spoken_before=bool(speaker.spoken))
        if text.unfinished:
            REPLY_CUT.labels("unfinished").inc()
        spoken.cut = text.cut
        if spoken.cut:
            REPLY_CUT.labels(spoken.cut).inc()
        if said:
            await speaker.remember(said)
        spoken.tail = said

    async def _turn_end(self, frame: Transcript, ctx: dict, prefs: dict,
                        text: str) -> TurnEnd:
        """The end-of-turn signals of this transcript (turn_end.py).  The LLM's own
        probability is one prefill that the reply's prefill then reuses; it runs while
        the VAD still confirms a speculative pause.  A question or words that dangle
        need no model: they are answered now, or wait the longest, whatever it says."""
        s = self.settings
        # a question or request counts as asked once it is finished ("What is the
        # capital of," may go on)
        end = TurnEnd(frame.turn_prob, None, frame.complete, frame.complete and asks(text),
                      s.vad_turn_threshold)
        if end.asks or end.dangles:
            return end
        system_prompt = prefs.get("instructions") or s.llm_system_prompt
        started = time.perf_counter()
        try:
            llm = await self.backend.end_of_turn(
                history.messages(history.unsaid(ctx, frame.turn), system_prompt))
        except Exception as e:  # never lose the turn over the probe: audio and words decide
            log.warning("end-of-turn probability failed: %s", e)
            return end
        if llm is not None:
            PROBE_SECONDS.observe(time.perf_counter() - started)
        return dataclasses.replace(end, llm=llm)

    async def _hold(self, frame: Transcript, end: TurnEnd) -> None:
        """Give the user time to go on, counted from the end of their speech: as long as
        the end-of-turn signals are unsure (turn_end.py), none when they agree the turn
        is done.  If the user goes on, the turn advances and we are cancelled here."""
        s = self.settings
        hold = end.hold_ms(s.llm_turn_hold_ms, s.llm_statement_hold_ms)
        HOLDS.observe(hold / 1000)
        log.info("end of turn: %s, hold %.0f ms", end.describe(), hold,
                 extra={"sid": frame.sid, "turn": frame.turn})
        if hold <= 0:
            return
        speech_end = frame.marks.get("speech_end", time.time())
        delay = speech_end + hold / 1000 - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


class SpokenPieces:
    """What one generation round left: its last words (said at the reply's end), the
    calls it made instead of speaking on, and why it was cut, if it was."""

    def __init__(self):
        self.tail, self.cut = "", ""
        self.calls: list = []

    def last(self, speaker: Speaker) -> ReplyText:
        return speaker.last(self.tail)
