"""Spoken numbers as digits, for the tool decision: a 135M model copies "12" into an
argument but rarely turns "twelve" or "one hundred forty four" into a number (it wrote
"five * 1.5" and ``{"order_id": "45"}``).  The transcript's dictated digits are already
digits (services/stt/spoken_numbers.py); here the cardinals are: "fifty five plus twenty
six" -> "55 plus 26", "one thousand minus three hundred" -> "1000 minus 300"."""

from __future__ import annotations

import re

from s2s.services.stt.spoken_numbers import TEENS, TENS, UNITS, write_digits

SMALL = {w: int(d) for w, d in UNITS.items() if w not in ("oh", "o", "nought")}
SMALL |= {w: int(d) for w, d in TEENS.items()}
TEN = {w: int(d) * 10 for w, d in TENS.items()}
SCALE = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)?")


def _value(words: list[str]) -> int | None:
    """The number ``words`` say ("one hundred forty four" -> 144), None if they are no
    single number ("five six": two)."""
    total = current = 0
    last = ""  # the previous word's kind: small, ten, scale
    for w in words:
        if w in SMALL:
            if last in ("small",) or (last == "ten" and SMALL[w] >= 10):
                return None
            current += SMALL[w]
            last = "small"
        elif w in TEN:
            if last in ("small", "ten"):
                return None
            current += TEN[w]
            last = "ten"
        elif w in SCALE:
            if last not in ("small", "ten") and not (w != "hundred" and current):
                return None
            if SCALE[w] == 100:
                current *= 100
            else:
                total += current * SCALE[w]
                current = 0
            last = "scale"
        else:
            return None
    return total + current


def _parts(word: str) -> list[str]:
    return word.lower().split("-")


def write_numbers(text: str) -> str:
    """``text`` with its spoken numbers as digits; "and" inside one ("one hundred and
    five") belongs to it; words that say two numbers are two ("twelve seven": 12 7)."""
    text = write_digits(text)
    spans = list(WORD.finditer(text))
    out, done, i = [], 0, 0
    while i < len(spans):
        j, words = i, []
        while j < len(spans):
            parts = _parts(spans[j].group())
            gap = text[spans[j - 1].end():spans[j].start()] if j > i else ""
            if j > i and gap.strip():
                break  # punctuation ends a number
            if all(p in SMALL or p in TEN or p in SCALE for p in parts):
                words += parts
                j += 1
            elif parts == ["and"] and words and words[-1] in SCALE and j + 1 < len(spans) \
                    and all(p in SMALL or p in TEN for p in _parts(spans[j + 1].group())):
                j += 1
            else:
                break
        value = _value(words) if words else None
        while value is None and j > i + 1:  # "twelve seven": 12, then 7 on its own
            j -= 1
            words = [p for span in spans[i:j] for p in _parts(span.group()) if p != "and"]
            value = _value(words)
        if value is None:
            i += 1
            continue
        out.append(text[done:spans[i].start()])
        out.append(str(value))
        done, i = spans[j - 1].end(), j
    out.append(text[done:])
    return "".join(out)
