"""Typed frames and their one msgpack codec.

Every frame is a msgspec struct tagged by ``kind``; ``decode`` validates types,
so a malformed or hostile payload raises :class:`FrameError` and nothing else;
its ``reason`` (a short fixed word, see ``REASONS``) is what the rejection counters
``s2s_bad_frames{reason}`` are labelled with.  Every field is bounded (lengths,
finite numbers, sample rates), so a frame that decodes is safe to hand to a stage.
The envelope (``v``, ``sid``, ``turn``, ``seq``, ``marks``) is shared; ``marks``
carries wall-clock stamps (seconds since the epoch) set by each stage so
latency can be measured end to end.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Union

import msgspec

SCHEMA_VERSION = 1
SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

SID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # also checked by the gateway on a resume
SessionId = Annotated[str, msgspec.Meta(pattern=SID_PATTERN)]
# 2**53 - 1: turn/seq/chunk reach the client as JSON numbers, exact in JavaScript.
NonNeg = Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]
Rate = Annotated[int, msgspec.Meta(ge=8000, le=48000)]
OutRate = Annotated[int, msgspec.Meta(ge=0, le=48000)]  # 0: the voice's own rate
# Finite and bounded: NaN/inf would poison latency histograms and audio positions.
Num = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]
Prob = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
MAX_TEXT = 20_000  # characters: ~20 minutes of speech; a stage never gets a novel
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Word = Annotated[str, msgspec.Meta(max_length=64)]
Marks = Annotated[dict[Word, Num], msgspec.Meta(max_length=64)]

# Why a frame was refused: the label of the rejection counters (a fixed, small set).
REASONS = ("not_bytes", "too_large", "not_msgpack", "bad_utf8", "unknown_kind",
           "missing_field", "wrong_type", "bad_sid", "bad_value", "bad_version",
           "odd_length", "bad_rate", "wrong_kind", "wrong_session")


class FrameError(ValueError):
    """Bytes that are not a valid frame of this schema; ``reason`` is one of REASONS."""

    def __init__(self, message: str, reason: str = "bad_value"):
        super().__init__(message)
        self.reason = reason


class Frame(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    sid: SessionId
    v: int = SCHEMA_VERSION
    turn: NonNeg = 0
    seq: NonNeg = 0
    marks: Marks = msgspec.field(default_factory=dict)

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


class SessionConfig(Frame, tag="config"):
    """Per-session VAD settings the client asked for (the Realtime API's turn detection),
    in order with the session's audio: ``threshold`` (speech probability),
    ``min_silence_ms`` (silence that ends an utterance), ``speech_pad_ms``."""
    vad: Annotated[dict[Word, Num], msgspec.Meta(max_length=8)] = msgspec.field(
        default_factory=dict)


# --- VAD -> out / STT ---------------------------------------------------------------
class SpeechStarted(Frame, tag="speech"):
    """The user started speaking; ``turn`` is the new turn (barge-in signal)."""
    at_s: Num = 0.0  # session audio position, seconds
    # the speech goes on with the last utterance's thought (within vad_continue_ms): a
    # reply to that utterance answered a fragment (the gateway says ``turn_resumed``)
    continues: bool = False


class Utterance(_Pcm, tag="utt"):
    """One utterance, 16 kHz; ``start_s``/``end_s`` are session audio positions of
    the speech, ``marks['speech_end']`` the wall time the speech really ended."""
    start_s: Num = 0.0
    end_s: Num = 0.0
    out_sr: OutRate = 0  # reply audio rate the client asked for (0: the voice's own)
    # the end-of-turn model's verdict at this pause (None: no model ran; STT's text
    # heuristic decides); travels on as Transcript.complete
    complete: Union[bool, None] = None
    # the model's probability behind that verdict (None: no model ran), for the LLM
    # stage's hold (services/llm/turn_end.py); travels on as Transcript.turn_prob
    turn_prob: Union[Prob, None] = None
    # sent at a short pause (vad_speculate_ms) before the end of turn is confirmed; a
    # TurnStatus "tentative" went to the session's out stream just before it
    speculative: bool = False


class TurnStatus(Frame, tag="turn_status"):
    """A speculative turn's state, for the gateway (session out stream): ``tentative``
    (hold this turn's transcript, reply text and audio) then ``committed`` (the end of
    turn is confirmed: release them at once).  A superseded speculation gets no frame:
    the turn counter advances (every stage drops the turn's work) and the gateway drops
    the held frames when a newer turn shows up; nothing of it was played."""
    status: Literal["tentative", "committed"]


# --- STT -> out / LLM ----------------------------------------------------------------
class Transcript(Frame, tag="transcript"):
    text: Text
    language: Word = ""
    confidence: Num = 0.0
    start_s: Num = 0.0
    end_s: Num = 0.0
    complete: bool = True  # ends like a finished sentence (not mid-thought)
    out_sr: OutRate = 0
    turn_prob: Union[Prob, None] = None  # the end-of-turn model's (Utterance.turn_prob)


# --- LLM -> out / TTS ----------------------------------------------------------------
class ReplyText(Frame, tag="reply"):
    """One speakable chunk of the reply, ``seq`` 0, 1, 2…; ``final`` marks the last."""
    text: Text
    final: bool = False
    out_sr: OutRate = 0  # rate the client wants (0: the voice's own)


# --- TTS -> out ----------------------------------------------------------------------
class ReplyAudio(_Pcm, tag="reply_audio"):
    """Audio of reply chunk ``seq``, piece ``chunk``; ``last`` closes that seq."""
    chunk: NonNeg = 0
    last: bool = False
    final: bool = False  # last piece of the whole reply


# --- tool calls (services/llm/tools) ---------------------------------------------------
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
CallId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
MAX_TOOL_OUTPUTS = 16  # calls answered at once (a reply calls one or a few)


class ToolCall(Frame, tag="tool_call"):
    """LLM -> out: the reply calls a tool the client runs (a Realtime function tool);
    ``arguments`` is JSON text valid against the tool's parameter schema.  The client
    answers with a ToolOutput (a new turn); the reply's closing ReplyText follows."""
    call_id: CallId
    name: ToolName
    arguments: Text = "{}"


class ToolResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    call_id: CallId
    output: Text = ""


class ToolOutput(Frame, tag="tool_output"):
    """gateway -> LLM: what the client's tools returned (``outputs``, in call order), a
    turn of its own that the model answers; ``text`` is typed user text sent with it."""
    outputs: Annotated[list[ToolResult], msgspec.Meta(min_length=1,
                                                       max_length=MAX_TOOL_OUTPUTS)]
    text: Text = ""
    out_sr: OutRate = 0


class Notice(Frame, tag="notice"):
    """An event for the client: error, stale, etc."""
    event: Word
    message: Text = ""


AnyFrame = Union[SessionOpen, Audio, SessionEnd, SessionConfig, SpeechStarted, Utterance,
                 Transcript, ReplyText, ReplyAudio, Notice, TurnStatus, ToolCall, ToolOutput]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyFrame)


def encode(frame: Frame) -> bytes:
    return _encoder.encode(frame)


def _reason(message: str) -> str:
    """The counter label for a msgspec error message (they are stable, documented
    strings; an unknown one is a plain ``bad_value``)."""
    m = message
    if "schema version" in m:
        return "bad_version"
    if "16-bit samples" in m:
        return "odd_length"
    if "sample rate" in m or "`$.sr`" in m or "`$.in_sr`" in m or "`$.out_sr`" in m:
        return "bad_rate"
    if "`$.sid`" in m:
        return "bad_sid"
    if "length <=" in m:
        return "too_large"
    if "`$.kind`" in m or "missing required field `kind`" in m:
        return "unknown_kind"
    if "missing required field" in m:
        return "missing_field"
    if "UTF-8" in m:
        return "bad_utf8"
    if m.startswith("Expected `") and ", got `" in m:
        return "wrong_type"
    return "bad_value"


def decode(data: bytes, max_bytes: int = 16 * 1024 * 1024,
           expect: type | tuple[type, ...] | None = None) -> AnyFrame:
    """Bytes -> frame; raises FrameError (with a ``reason``) for anything that is not a
    valid frame, or (``expect``) not a frame of the kind(s) the caller reads."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, not {type(data).__name__}", "not_bytes")
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte limit",
                         "too_large")
    try:
        frame = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise FrameError(str(e), _reason(str(e))) from None
    except msgspec.DecodeError as e:
        reason = "bad_utf8" if "UTF-8" in str(e) else "not_msgpack"
        raise FrameError(str(e), reason) from None
    except Exception as e:  # any other surprise from hostile bytes is still a bad frame
        raise FrameError(f"{type(e).__name__}: {e}", "bad_value") from None
    if expect is not None and not isinstance(frame, expect):
        raise FrameError(f"a {frame.__class__.__name__} frame where "
                         f"{_kinds(expect)} was expected", "wrong_kind")
    return frame


def _kinds(expect: type | tuple[type, ...]) -> str:
    types = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(t.__name__ for t in types)


#: the frame kinds a built-in stage's input stream carries (``routes`` in s2s.bus);
#: the runtime refuses any other kind there as ``wrong_kind`` before the stage sees it
STAGE_INPUTS: dict[str, tuple[type, ...]] = {"stt": (Utterance,),
                                             "llm": (Transcript, ToolOutput),
                                             "tts": (ReplyText,), "vad": (SessionOpen,)}
