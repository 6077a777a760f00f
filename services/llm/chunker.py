"""Cut a token stream into speakable chunks.

TTS can start as soon as it has a phrase that sounds natural on its own, so the
first chunk is cut as early as a clause allows (a comma, semicolon, colon or
dash once a few words are there, or, in a long first sentence, before a word
that opens a phrase: "Octopuses are fascinating creatures | that can change
color"; a speaker would breathe there too); later chunks are whole sentences, which
sound better and cost TTS fewer calls.  A line break (list items, paragraphs)
also ends a chunk, and a very long run without punctuation is cut at a space
so speech never waits for the whole reply.

The decision depends only on the text, never on how it was split into pieces:
feeding it token by token or all at once gives the same chunks.
"""

from __future__ import annotations

import re

SENTENCE_END = ".!?…"
CLAUSE_END = ",;:—–"
CLOSERS = "\"')]”’»"
# "Dr. Smith", "e.g. this": a period after these does not end a sentence
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e",
                 "eg", "ie", "no", "approx", "mt", "ft", "inc", "ltd", "co", "jan", "feb", "mar",
                 "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_WORD_BEFORE = re.compile(r"([\w.]+)[.]$")
# words before which a long first sentence may be cut (the phrase they open sounds whole)
PHRASE_OPENERS = {"and", "but", "or", "so", "because", "that", "which", "who", "where", "when",
                  "while", "if", "although", "though", "since", "unless", "until", "with",
                  "without"}
_NEXT_WORD = re.compile(r"\s+([A-Za-z']+)([\s,.;:!?…]|$)")


class Chunker:
    def __init__(self, first_min_words: int = 4, max_words: int = 40,
                 first_phrase_words: int = 4):
        self.first_min_words = first_min_words
        self.first_phrase_words = first_phrase_words
        self.max_words = max_words
        self.buf = ""
        self.scan = 0          # buf[:scan] was examined already (split-invariance)
        self.emitted = 0
        self.fence = False     # inside a ``` code block: never cut there

    def feed(self, piece: str) -> list[str]:
        """Add streamed text; return the chunks it completed."""
        self.buf += piece
        chunks = []
        i = self.scan
        # a boundary is only known once the characters after it arrived (a space, or
        # the rest of a ``` fence that a token split)
        while i + 3 <= len(self.buf):
            if self.buf.startswith("```", i):
                self.fence = not self.fence
                i += 3
                continue
            cut = False if self.fence else self._boundary(i)
            if cut is None:
                break  # it depends on a word that has not fully arrived: wait for it
            if cut:
                chunk, self.buf = self.buf[:i + 1].strip(), self.buf[i + 1:]
                i = 0
                if chunk:
                    chunks.append(chunk)
                    self.emitted += 1
                continue
            i += 1
        self.scan = max(0, i)
        return chunks

    def flush(self) -> str:
        """The rest of the text once the stream ended."""
        rest, self.buf, self.scan = self.buf.strip(), "", 0
        return rest

    def _boundary(self, i: int) -> bool | None:
        ch, nxt = self.buf[i], self.buf[i + 1]
        if ch == "\n":
            return True
        if ch.isspace() or not nxt.isspace():
            return False  # "3.5", "U.S." and "Paris," + '"' are not cut mid-token
        head = self.buf[:i + 1].rstrip(CLOSERS)
        if not head or head[-1].isspace():
            return False
        end = head[-1]
        words = len(head.split())
        if end in SENTENCE_END:
            return not (end == "." and self._not_a_sentence_end(head))
        if end in CLAUSE_END and self.emitted == 0:
            return words >= self.first_min_words
        if self.emitted == 0 and end.isalnum() and words >= self.first_phrase_words:
            m = _NEXT_WORD.match(self.buf, i + 1)
            if m is None or not m.group(2):  # the next word is not complete yet
                return None if not self._next_word_known(i) else words >= self.max_words
            if m.group(1).lower() in PHRASE_OPENERS:
                return True
        return words >= self.max_words

    def _next_word_known(self, i: int) -> bool:
        """Whether the word after position i is complete (or is no plain word)."""
        rest = self.buf[i + 1:].lstrip()
        if not rest:
            return False
        return not re.fullmatch(r"[A-Za-z']+", rest)

    @staticmethod
    def _not_a_sentence_end(head: str) -> bool:
        m = _WORD_BEFORE.search(head)
        if not m:
            return False
        word = m.group(1).lower()
        # "Dr.", "e.g.", single initials ("J. Smith") and list numbers ("1.") go on
        return word in ABBREVIATIONS or len(word) == 1 or word.isdigit()


def chunks_of(text: str, **kwargs) -> list[str]:
    """All chunks of a complete text (tests, tools)."""
    c = Chunker(**kwargs)
    out = c.feed(text)
    rest = c.flush()
    return out + ([rest] if rest else [])
