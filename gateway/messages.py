"""Validation of what a client sends on the native protocol (docs/protocol.md): each
function returns the checked value or raises ``Reject`` with the documented code.  No I/O
here: the session decides what a valid message does."""

from __future__ import annotations

import json
import re

from s2s.frames import SAMPLE_RATES, SID_PATTERN

from .errors import POLICY, UNSUPPORTED, Reject
from .limits import MAX_AUDIO_S

SID_RE = re.compile(SID_PATTERN)
MAX_TEXT_CHARS = 4000       # typed user input, instructions
VAD_LIMITS = {"threshold": (0.05, 0.95), "min_silence_ms": (100, 5000),
              "speech_pad_ms": (0, 2000)}


def parse_text(text: str, max_bytes: int) -> dict:
    """A text message: a JSON object with a string ``type``."""
    if len(text.encode("utf-8", "replace")) > max_bytes:
        raise Reject("message_too_large", "text message over the size limit", POLICY)
    try:
        obj = json.loads(text)
    except Exception:
        raise Reject("bad_json", "text messages must be JSON objects", UNSUPPORTED) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise Reject("bad_message", 'a JSON object with a string "type" was expected', POLICY)
    return obj


def rate(hello: dict, field: str, default: int) -> int:
    value = hello.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value not in SAMPLE_RATES:
        raise Reject("bad_hello", f"{field} must be one of {list(SAMPLE_RATES)}", POLICY)
    return value


def requested_session(hello: dict) -> str | None:
    """The ``session_id`` a hello asks to resume, if any."""
    requested = hello.get("session_id")
    if requested is not None and (not isinstance(requested, str) or
                                  not SID_RE.match(requested)):
        raise Reject("bad_hello", "session_id must match [A-Za-z0-9_.-]{1,64}", POLICY)
    return requested


def typed_text(obj: dict) -> str:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Reject("bad_text", '"text" must be a non-empty string')
    if len(text) > MAX_TEXT_CHARS:
        raise Reject("message_too_large", f"text over {MAX_TEXT_CHARS} characters")
    return text.strip()


def configure(obj: dict) -> tuple[str | None, dict[str, float] | None]:
    """``instructions`` (the session's system prompt) and ``vad`` (turn detection)."""
    instructions, vad = obj.get("instructions"), obj.get("vad")
    if instructions is not None and (not isinstance(instructions, str) or
                                     len(instructions) > MAX_TEXT_CHARS):
        raise Reject("bad_configure", f'"instructions" must be a string of at most '
                     f"{MAX_TEXT_CHARS} characters")
    if vad is not None:
        if not isinstance(vad, dict) or not vad or any(
                k not in VAD_LIMITS or isinstance(v, bool) or not isinstance(v, (int, float))
                or not VAD_LIMITS[k][0] <= v <= VAD_LIMITS[k][1] for k, v in vad.items()):
            raise Reject("bad_configure", '"vad" takes ' + ", ".join(
                f"{k} in [{lo}, {hi}]" for k, (lo, hi) in VAD_LIMITS.items()))
        vad = {k: float(v) for k, v in vad.items()}
    return instructions, vad


def truncate(obj: dict, current_turn: int) -> tuple[int, str]:
    """(turn, what was heard of its reply): the turn must be one this session reached."""
    turn, text = obj.get("turn"), obj.get("text")
    if isinstance(turn, bool) or not isinstance(turn, int) or \
            not 0 < turn <= current_turn or \
            not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        raise Reject("bad_truncate", '"turn" (a turn of this session that had a reply) '
                     'and "text" (what was heard of it) are required')
    return turn, text


def audio(pcm: bytes, max_bytes: int, sample_rate: int) -> float:
    """Seconds of audio in a binary message (16-bit mono PCM at ``sample_rate``)."""
    if len(pcm) > max_bytes:
        raise Reject("message_too_large", f"audio message of {len(pcm)} bytes is over the "
                     f"{max_bytes}-byte limit")
    if len(pcm) % 2:
        raise Reject("odd_length", "audio must be 16-bit samples (an even byte count)",
                     UNSUPPORTED)
    seconds = len(pcm) / 2 / sample_rate
    if seconds > MAX_AUDIO_S:
        raise Reject("message_too_large", f"audio message of {seconds:.0f} s is over the "
                     f"{MAX_AUDIO_S:.0f}-second limit")
    return seconds

