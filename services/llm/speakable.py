"""Make model text fit for the ear: TTS reads every character it gets, so markdown
marks, list bullets, code, URLs and emoji are removed (link texts and the words
inside emphasis stay), and the result is one line of plain sentences."""

from __future__ import annotations

import re

_FENCED = re.compile(r"```.*?(```|$)", re.S)           # a code block (unclosed: to the end)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.I)
_EMAIL_LIKE_PATH = re.compile(r"\b\S+\.(?:com|org|net|io|dev|ai)/\S*", re.I)
_HTML = re.compile(r"</?[A-Za-z][^>]*>")
_INLINE_CODE = re.compile(r"`([^`]*)`")
_LINE_MARK = re.compile(r"^\s*(?:#{1,6}\s+|>+\s*|[-*+•]\s+|\d{1,3}[.)]\s+|[a-z][.)]\s+(?=\S))",
                        re.M)
_RULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$", re.M)
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?\s*$", re.M)
_EMPHASIS = re.compile(r"(\*{1,3}|~~)(?=\S)(.+?)(?<=\S)\1"
                       r"|(?<!\w)(_{1,3})(?=\S)(.+?)(?<=\S)\3(?!\w)")  # not snake_case
_STRAY = re.compile(r"[*#`~|^<>\\_]+")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\U0000FE00-\U0000FE0F"
    "\U0000200D\U000020E3\U0001F1E6-\U0001F1FF\U000E0020-\U000E007F\U00002190-\U000021FF"
    "\U00002300-\U000023FF\U000025A0-\U000025FF]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([,;:])(?:\s*[,;:])+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")


def speakable(text: str) -> str:
    """Plain spoken text: no markdown, lists, code, URLs or emoji; one line."""
    # one pass can uncover a mark (stripping "\\" from "-\\0" leaves a "- " bullet):
    # repeat until nothing changes, so the result is stable
    for _ in range(4):
        cleaner = _one_pass(text)
        if cleaner == text:
            break
        text = cleaner
    return text


def _one_pass(text: str) -> str:
    text = _FENCED.sub(" ", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("", text)
    text = _EMAIL_LIKE_PATH.sub("", text)
    text = _HTML.sub("", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _TABLE_SEP.sub("", text)
    text = _RULE.sub("", text)
    text = _LINE_MARK.sub("", text)
    for _ in range(2):  # nested emphasis: ***a** b*
        text = _EMPHASIS.sub(lambda m: m.group(2) or m.group(4), text)
    text = _EMOJI.sub("", text)
    text = _STRAY.sub(" ", text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    # list items and paragraphs become sentences, so TTS pauses between them
    # (a lone short word gets a comma: "3." or "a." at a line start reads as a list mark)
    text = " ".join(ln if ln[-1] in ".!?,;:" or i == len(lines) - 1
                    else ln + ("," if re.fullmatch(r"\w{1,3}", ln) else ".")
                    for i, ln in enumerate(lines))
    text = _EMPTY_PARENS.sub("", text)
    text = re.sub(r"\s+", " ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = text.strip(" ,;:")
    # nothing a voice can say (only punctuation or digits-free symbols left)
    return text if any(c.isalnum() for c in text) else ""
