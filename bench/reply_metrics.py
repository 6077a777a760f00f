"""Does a reply answer?  Two failures of a small model, scored the same way by every bench.

- **echo**: the reply to a statement repeats most of it in its first sentence ("The
  horizon seems extremely distant." answered with itself).  Questions are not scored: a
  good answer restates them ("What is the capital of Germany?" -> "The capital of
  Germany is Berlin.");
- **repeat**: the reply is (nearly) one the assistant already gave earlier in the session
  ("Boil water. Add tea. Enjoy your dinner." said to three different questions).

Words are compared lower-cased, without punctuation, in order (difflib's matching blocks),
so "I like tea" inside "You like tea, I see" counts its shared run only.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from s2s.services.llm.replies import asks  # what the LLM stage answers at once

ECHO_SHARE = 0.6      # of the user's words, in order, found in the reply's first sentence
REPEAT_SIMILARITY = 0.8  # word-sequence similarity of two replies that say the same
MIN_WORDS = 3         # shorter texts ("Yes.", "Okay.") may recur without being a copy


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def first_sentence(text: str) -> str:
    parts = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)
    return parts[0] if parts else ""


def shared_share(source: list[str], other: list[str]) -> float:
    """Share of ``source``'s words that appear in ``other`` in the same order."""
    if not source:
        return 0.0
    blocks = SequenceMatcher(None, source, other, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) / len(source)


def echoes(user: str, reply: str) -> bool:
    """Does the reply's first sentence repeat most of the user's statement's words?"""
    said = words(user)
    if len(said) < MIN_WORDS or asks(user):
        return False
    return shared_share(said, words(first_sentence(reply))) >= ECHO_SHARE


def repeats_earlier(reply: str, earlier: list[str]) -> bool:
    """Is the reply (nearly) the same as one of the session's earlier replies?"""
    now = words(reply)
    if len(now) < MIN_WORDS:
        return False
    for before in earlier:
        then = words(before)
        if len(then) >= MIN_WORDS and \
                SequenceMatcher(None, now, then, autojunk=False).ratio() >= REPEAT_SIMILARITY:
            return True
    return False


def session_rates(turns: list[tuple[str, str]]) -> dict[str, int]:
    """Counts over one session's (user text, reply) turns, in order: replies, replies to
    statements (what the echo share is of), echoes, repeats of an earlier reply."""
    counts = {"replies": 0, "statements": 0, "echoes": 0, "repeats": 0}
    earlier: list[str] = []
    for user, reply in turns:
        if not reply.strip():
            continue
        counts["replies"] += 1
        counts["statements"] += not asks(user)
        counts["echoes"] += echoes(user, reply)
        counts["repeats"] += repeats_earlier(reply, earlier)
        earlier.append(reply)
    return counts
