"""Keep a spoken reply sensible: stop it when the model starts to loop, and never
speak a sentence the token cap cut in half.

Small models, greedy decoding, fall into loops ("I'm sorry for your loss. I'm sorry
for any other losses you may have had." four times over): once a sentence comes
back (the same words, or nearly: most of its words were said in one earlier
sentence), nothing after it is worth hearing, so the reply stops there.  The
backends' repetition penalties make loops rarer; this makes them harmless.
"""

from __future__ import annotations

import re

from .chunker import Chunker
from .speakable import speakable

_SENTENCE = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"')\]”’»])\s+")
_WORDS = re.compile(r"[a-z0-9']+")
SENTENCE_END = ".!?…"
CLOSERS = "\"')]”’»"
SIMILAR = 0.8       # share of a sentence's words found in one earlier sentence: a repeat
MIN_WORDS = 3       # shorter sentences ("Yes." "Thank you.") may honestly recur
PHRASE = 3          # a phrase of this many words ...
PHRASE_TIMES = 3    # ... said this often within the reply is a loop


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE.split(text.strip())) if s]


def ends_sentence(text: str) -> bool:
    text = text.rstrip().rstrip(CLOSERS)
    return bool(text) and text[-1] in SENTENCE_END


def last_sentences(text: str) -> str:
    """``text`` up to its last complete sentence ("" when none is complete)."""
    parts = sentences(text)
    while parts and not ends_sentence(parts[-1]):
        parts.pop()
    return " ".join(parts)


def words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


class Repeats:
    """The sentences of one reply so far; ``check`` each chunk before it is spoken."""

    def __init__(self):
        self.said: list[set[str]] = []
        self.all_words: list[str] = []

    def check(self, chunk: str) -> tuple[str, bool]:
        """(what of ``chunk`` may be spoken, whether the reply loops and must stop)."""
        keep = []
        for sentence in sentences(chunk):
            w = words(sentence)
            if self._repeats(w):
                return " ".join(keep), True
            keep.append(sentence)
            self.said.append(set(w))
            self.all_words += w
        return " ".join(keep), False

    def _repeats(self, w: list[str]) -> bool:
        if len(w) >= MIN_WORDS:
            mine = set(w)
            if any(len(mine & old) >= SIMILAR * len(mine) for old in self.said):
                return True
        seq = self.all_words + w  # "Paris and the friends are Paris and the friends are ..."
        grams: dict[tuple[str, ...], int] = {}
        for i in range(len(seq) - PHRASE + 1):
            g = tuple(seq[i:i + PHRASE])
            grams[g] = grams.get(g, 0) + 1
            if grams[g] >= PHRASE_TIMES and i >= len(self.all_words) - PHRASE + 1:
                return True
        return False


class SpokenText:
    """One generation round's text pieces as the user hears them: speakable chunks for
    TTS as they complete, the reply stopped where it loops (``cut``), and an unfinished
    last sentence (the token cap) left unsaid.  The worker and the reply bench
    (bench/eval_replies.py) both hear a reply through this."""

    def __init__(self):
        self.chunker, self.repeats = Chunker(), Repeats()
        self.cut = ""            # "repeated": the reply looped and was stopped
        self.unfinished = False  # the token cap cut the last sentence, left unsaid

    def feed(self, piece: str) -> list[str]:
        """The chunks this piece completes that may be spoken; once ``cut`` is set,
        nothing more of this round is."""
        out = []
        for chunk in self.chunker.feed(piece):
            said, repeated = self.repeats.check(speakable(chunk))
            if said:
                out.append(said)
            if repeated:  # the model loops: what it says next is more of the same
                self.cut = "repeated"
                break
        return out

    def end(self, spoken_before: bool) -> str:
        """What is left to say when the round's text ends (``spoken_before``: chunks of
        this reply were said already)."""
        said = "" if self.cut else speakable(self.chunker.flush())
        if said and not ends_sentence(said):
            # cut off by llm_max_tokens mid-sentence: the unfinished end is left unsaid
            # (a lone short answer without a full stop, "Paris", is still an answer)
            whole = last_sentences(said)
            if whole or spoken_before:
                said = whole
                self.unfinished = True
        if said:
            said, looped = self.repeats.check(said)
            self.cut = self.cut or ("repeated" if looped else "")
        return said


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
