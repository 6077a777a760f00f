"""What the caller has heard of a reply: the reply goes to the provider with a mark after
each piece of audio, and the provider returns a mark once it has played what came before
it.  On a barge-in the provider's buffer is cleared (it then returns the marks still
pending too, unplayed), so only the marks returned before the ``clear`` count: the
history keeps the text of the pieces whose audio had begun by the last of them.  No I/O
here."""

from __future__ import annotations

from dataclasses import dataclass, field

END = "end"


@dataclass
class Reply:
    turn: int
    sent_s: float = 0.0          # audio sent to the provider
    played_s: float = 0.0        # audio the provider said it played (marks returned)
    done: bool = False           # the whole reply was sent (its end mark with it)
    heard_all: bool = False      # the end mark came back before any clear
    cleared: bool = False
    pieces: dict[int, str] = field(default_factory=dict)      # text seq -> text
    starts: dict[int, float] = field(default_factory=dict)    # text seq -> its audio start

    @property
    def playing(self) -> bool:
        """Audio sent that the caller has not heard yet, or more to come."""
        return not self.heard_all and (self.sent_s > 0 or bool(self.pieces))

    def heard_text(self) -> str:
        """The pieces whose audio had begun when the last returned mark was played."""
        return " ".join(text for seq, text in sorted(self.pieces.items())
                        if self.starts.get(seq, float("inf")) < self.played_s and text)


class Playout:
    """The current reply of one call, and the mark names that say how far it played."""

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.chunk_seq: int | None = None  # seq of the audio piece announced last

    def _for(self, turn: int) -> Reply:
        if self.reply is None or self.reply.turn != turn:
            self.reply = Reply(turn)
            self.chunk_seq = None
        return self.reply

    def text(self, turn: int, seq: int, text: str) -> None:
        self._for(turn).pieces[seq] = text

    def audio_chunk(self, turn: int, seq: int) -> None:
        """The next audio sent is of text piece ``seq`` (native ``audio_chunk``)."""
        reply = self._for(turn)
        reply.starts.setdefault(seq, reply.sent_s)
        self.chunk_seq = seq

    def sent(self, seconds: float) -> str | None:
        """Audio of the current reply went out: the name of the mark to send after it."""
        reply = self.reply
        if reply is None or reply.cleared:
            return None
        reply.sent_s += seconds
        return f"{reply.turn}:{int(round(reply.sent_s * 1000))}"

    def finished(self, turn: int) -> str | None:
        """The reply is all sent: the name of its end mark."""
        reply = self.reply
        if reply is None or reply.turn != turn or reply.cleared:
            return None
        reply.done = True
        return f"{turn}:{END}"

    def played(self, name: str) -> None:
        """A mark came back (played, or flushed by a clear: then it no longer counts)."""
        turn, _, at = name.partition(":")
        reply = self.reply
        if reply is None or reply.cleared or not turn.isdigit() or int(turn) != reply.turn:
            return
        if at == END:
            reply.heard_all = True
            reply.played_s = reply.sent_s
        elif at.isdigit():
            reply.played_s = max(reply.played_s, int(at) / 1000)

    def barge_in(self) -> Reply | None:
        """The caller spoke over the reply: the reply to clear (and to cut in the history
        to what was heard), or None when nothing of it is still to be heard."""
        reply = self.reply
        if reply is None or reply.cleared or not reply.playing:
            return None
        reply.cleared = True
        return reply
