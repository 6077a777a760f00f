"""Digits and spelled letters in a transcript, as the symbols that were said.

``spoken_symbols`` reads a text the way a listener takes down a dictation: numerals
digit by digit ("1,0001" -> 1 0 0 0 1), number words as digits ("nine oh two one" ->
9 0 2 1, "twenty one" -> 2 1, "double four" -> 4 4) and single letters as letters
("S-M-I-T-H" -> S M I T H); other words carry no symbol.  The letter O and the spoken
"oh" sound the same, so both read as 0.
"""

from __future__ import annotations

import re

UNITS = {"zero": "0", "oh": "0", "o": "0", "nought": "0", "one": "1", "two": "2",
         "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
         "nine": "9"}
TEENS = {"ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
         "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
         "nineteen": "19"}
TENS = {"twenty": "2", "thirty": "3", "forty": "4", "fifty": "5", "sixty": "6",
        "seventy": "7", "eighty": "8", "ninety": "9"}
REPEATS = {"double": 2, "triple": 3}
SCALES = {"hundred": 2, "thousand": 3}
TOKEN = re.compile(r"\d+|[A-Za-z]+")


def _number_word(w: str) -> bool:
    return w in UNITS or w in TEENS or w in TENS


def spoken_symbols(text: str) -> list[str]:
    """The digits and letters ``text`` says, in order (digits '0'-'9', letters 'A'-'Z')."""
    tokens = TOKEN.findall(text)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok, low = tokens[i], tokens[i].lower()
        nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
        if tok.isdigit():
            out.extend(tok)
        elif low in UNITS:
            out.append(UNITS[low])
        elif low in TEENS:
            out.extend(TEENS[low])
        elif low in TENS:
            if nxt in UNITS and UNITS[nxt] != "0":  # "twenty one": 21
                out.extend(TENS[low] + UNITS[nxt])
                i += 1
            else:
                out.extend(TENS[low] + "0")
        elif low in REPEATS and (nxt in UNITS or (len(nxt) == 1 and nxt.isalpha())):
            out.extend([UNITS.get(nxt, nxt.upper())] * REPEATS[low])
            i += 1
        elif low in SCALES and out and out[-1].isdigit():
            # "three hundred": 300; "three hundred twenty": 320; "one hundred five": 105
            follows = 2 if nxt in TENS or nxt in TEENS else 1 if nxt in UNITS else 0
            out.extend("0" * max(0, SCALES[low] - follows))
        elif len(tok) == 1:
            out.append(tok.upper())
        i += 1
    return out


# --- a dictation's digits, written as digits ---------------------------------------------
DIGIT_WORDS = {w: d for w, d in UNITS.items() if w != "o"}  # "o" alone is the letter
WORD = re.compile(r"[A-Za-z]+")
JOINED = re.compile(r"\s*-?\s*")        # between digits of one group: "nine oh", "nine-oh"
CODE_LETTER = re.compile(r"[B-HJ-Z]")  # a capital letter in a code ("B seven K"): not "A", "I"
BETWEEN = re.compile(r"[\s,.\-]*")      # between the groups of one dictation: ", " ". "


def write_digits(text: str) -> str:
    """``text`` with each dictated run of digit words written as digits, the groups as
    they were said: "one zero zero zero one, nine oh two one." -> "10001, 9021." and
    "double four five" -> "445"; capital letters among them join ("B seven K" -> "B7K").
    A run needs one group of two digit words said together ("I have one dog", "at five.
    Two more" stay), three if it starts with "oh" ("Oh, one more thing" stays); other
    words, numerals and letters stay as they are."""
    spans = [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]
    out, done, i = [], 0, 0
    while i < len(spans):
        run: list[tuple[int, int, str]] = []  # (start, end, digits) of each digit word
        j = i
        while j < len(spans):
            if run and not BETWEEN.fullmatch(text[run[-1][1]:spans[j][0]]):
                break
            word = spans[j][2]
            nxt = spans[j + 1][2] if j + 1 < len(spans) else ""
            if word in REPEATS and nxt in DIGIT_WORDS \
                    and JOINED.fullmatch(text[spans[j][1]:spans[j + 1][0]]):
                run.append((spans[j][0], spans[j + 1][1], DIGIT_WORDS[nxt] * REPEATS[word]))
                j += 2
            elif word in DIGIT_WORDS:
                run.append((spans[j][0], spans[j][1], DIGIT_WORDS[word]))
                j += 1
            elif CODE_LETTER.fullmatch(text[spans[j][0]:spans[j][1]]):
                run.append((spans[j][0], spans[j][1], text[spans[j][0]]))
                j += 1
            else:
                break
        if not _dictated(text, run):
            i = max(j, i + 1)  # not a dictation: leave these words
            continue
        out.append(text[done:run[0][0]])
        for k, (start, end, digits) in enumerate(run):
            if k:
                gap = text[run[k - 1][1]:start]
                out.append("" if JOINED.fullmatch(gap) else gap)
            out.append(digits)
        done, i = run[-1][1], j
    out.append(text[done:])
    return "".join(out)


def _dictated(text: str, run: list[tuple[int, int, str]]) -> bool:
    """Does ``run`` hold a group of digits said together (no punctuation between)?"""
    count, first = 0, ""
    for k, (start, end, digits) in enumerate(run):
        if k and not JOINED.fullmatch(text[run[k - 1][1]:start]):
            count, first = 0, ""
        first = first or text[start:end].lower()
        count += len(digits) if digits.isdigit() else 0
        if count >= (3 if first == "oh" else 2):
            return True
    return False
