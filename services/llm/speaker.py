"""One turn's spoken reply: chunks numbered 0, 1, 2… (a filler, the answer, an apology:
one sequence), each recorded in the session's history before it is sent, so that a
barge-in right after leaves exactly what the user may have heard."""

from __future__ import annotations

import time

from s2s.frames import Frame, ReplyText

from . import history


class Speaker:
    def __init__(self, state, frame: Frame, ctx: dict):
        self.state, self.frame, self.ctx = state, frame, ctx
        self.spoken: list[str] = []
        self.seq = 0
        self.started = time.perf_counter()
        self.first_ms: float | None = None

    async def say(self, text: str) -> ReplyText:
        await self.remember(text)
        if self.first_ms is None:
            self.first_ms = (time.perf_counter() - self.started) * 1000
        return self._emit(text, final=False)

    async def remember(self, text: str) -> None:
        self.spoken.append(text)
        await self.save(history.set_reply(self.ctx, self.frame.turn, " ".join(self.spoken)))

    async def save(self, ctx: dict) -> None:
        self.ctx = ctx
        await self.state.save(self.frame.sid, ctx)

    def close(self) -> ReplyText:
        """The reply's last chunk (maybe empty: it closes the reply)."""
        return self._emit("", final=True)

    def last(self, text: str) -> ReplyText:
        return self._emit(text, final=True)

    def _emit(self, text: str, final: bool) -> ReplyText:
        f = self.frame
        reply = ReplyText(sid=f.sid, turn=f.turn, seq=self.seq, text=text, final=final,
                          out_sr=f.out_sr, marks=dict(f.marks))
        if self.seq == 0:
            reply.stamp("llm_first")
        self.seq += 1
        return reply
