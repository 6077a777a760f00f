"""Word error rate, the one used by the tests, the STT bench and the evaluation."""

from __future__ import annotations

import re
from typing import Callable


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped, hyphens split ("twenty-four": two words)."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("-", " "))


def wer(reference: str, hypothesis: str,
        tokenize: Callable[[str], list[str]] = words) -> float:
    """Word-level edit distance over the reference's length."""
    ref, hyp = tokenize(reference), tokenize(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / max(len(ref), 1)
