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
