"""Typed frames and their one msgpack codec.

Every frame is a msgspec struct tagged by ``kind``; ``decode`` validates types,
so a malformed or hostile payload raises :class:`FrameError` and nothing else.
The envelope (``v``, ``sid``, ``turn``, ``seq``, ``marks``) is shared; ``marks``
carries wall-clock stamps (seconds since the epoch) set by each stage so
latency can be measured end to end.
"""

from __future__ import annotations

import time
from typing import Annotated, Union

import msgspec

SCHEMA_VERSION = 1
SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

SID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # also checked by the gateway on a resume
SessionId = Annotated[str, msgspec.Meta(pattern=SID_PATTERN)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Rate = Annotated[int, msgspec.Meta(ge=8000, le=48000)]


class FrameError(ValueError):
    """Bytes that are not a valid frame of this schema."""


class Frame(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    sid: SessionId
    v: int = SCHEMA_VERSION
    turn: NonNeg = 0
    seq: NonNeg = 0
    marks: dict[str, float] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.v != SCHEMA_VERSION:
            raise ValueError(f"schema version {self.v} is not {SCHEMA_VERSION}")

    def stamp(self, mark: str) -> None:
        self.marks[mark] = time.time()


class _Pcm(Frame):
    pcm: bytes
    sr: Rate

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.pcm) % 2:
            raise ValueError("pcm must be 16-bit samples (an even number of bytes)")
        if self.sr not in SAMPLE_RATES:
            raise ValueError(f"unsupported sample rate {self.sr}; use one of {SAMPLE_RATES}")

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.sr


# --- gateway -> VAD ------------------------------------------------------------------
class SessionOpen(Frame, tag="open"):
    """A new client session; the VAD worker that reads it owns the session."""
    in_sr: Rate = 16000
    out_sr: Rate = 22050


class Audio(_Pcm, tag="audio"):
    """Microphone audio of a session, as the client sent it (any common rate)."""


class SessionEnd(Frame, tag="end"):
    """The client is gone: the VAD owner releases the session."""


# --- VAD -> out / STT ---------------------------------------------------------------
class SpeechStarted(Frame, tag="speech"):
    """The user started speaking; ``turn`` is the new turn (barge-in signal)."""
    at_s: float = 0.0  # session audio position, seconds


class Utterance(_Pcm, tag="utt"):
    """One utterance, 16 kHz; ``start_s``/``end_s`` are session audio positions of
    the speech, ``marks['speech_end']`` the wall time the speech really ended."""
    start_s: float = 0.0
    end_s: float = 0.0
    out_sr: int = 0  # reply audio rate the client asked for (0: the voice's own)
    # the end-of-turn model's verdict at this pause (None: no model ran; STT's text
    # heuristic decides); travels on as Transcript.complete
    complete: Union[bool, None] = None


# --- STT -> out / LLM ----------------------------------------------------------------
class Transcript(Frame, tag="transcript"):
    text: str
    language: str = ""
    confidence: float = 0.0
    start_s: float = 0.0
    end_s: float = 0.0
    complete: bool = True  # ends like a finished sentence (not mid-thought)
    out_sr: int = 0


# --- LLM -> out / TTS ----------------------------------------------------------------
class ReplyText(Frame, tag="reply"):
    """One speakable chunk of the reply, ``seq`` 0, 1, 2…; ``final`` marks the last."""
    text: str
    final: bool = False
    out_sr: int = 0  # rate the client wants (0: the voice's own)


# --- TTS -> out ----------------------------------------------------------------------
class ReplyAudio(_Pcm, tag="reply_audio"):
    """Audio of reply chunk ``seq``, piece ``chunk``; ``last`` closes that seq."""
    chunk: NonNeg = 0
    last: bool = False
    final: bool = False  # last piece of the whole reply


class Notice(Frame, tag="notice"):
    """An event for the client: error, stale, etc."""
    event: str
    message: str = ""


AnyFrame = Union[SessionOpen, Audio, SessionEnd, SpeechStarted, Utterance, Transcript, ReplyText,
                 ReplyAudio, Notice]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyFrame)


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def decode(data: bytes, max_bytes: int = 16 * 1024 * 1024) -> AnyFrame:
    """Bytes -> frame; raises FrameError for anything that is not a valid frame."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise FrameError(str(e)) from None
    except Exception as e:  # any other surprise from hostile bytes is still a bad frame
        raise FrameError(f"{type(e).__name__}: {e}") from None
