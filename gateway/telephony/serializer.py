"""What a telephony media-stream protocol is to s2s: a ``Serializer`` turns the provider's
WebSocket messages into a few events (the call started, caller audio, a mark played, a key
pressed, the call stopped) and turns what s2s has to say into the provider's messages
(reply audio, a mark, clear).  Twilio's Media Streams is ``twilio.py``; Telnyx, Vonage or
Plivo are one more file each, and ``TelephonySocket`` runs any of them.

Audio crosses this interface as 16-bit little-endian PCM at ``sample_rate`` (the call's
codec rate): the serializer decodes and encodes the wire codec (G.711 μ-law for Twilio)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


class BadMessage(ValueError):
    """A provider message that does not follow its protocol; ``reason`` is a short code
    (counted as ``s2s_rejected_inputs{reason="telephony_<reason>"}``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --- provider -> s2s ----------------------------------------------------------------------
@dataclass
class Connected:
    """The provider opened the stream (Twilio's ``connected``)."""


@dataclass
class Start:
    """The call's stream starts: who it is, and the parameters the call's instructions set
    (Twilio's ``<Parameter>`` nouns: a credential travels here)."""
    stream_id: str
    call_id: str = ""
    account_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class Media:
    """Caller audio: PCM16 at the serializer's rate."""
    pcm: bytes


@dataclass
class MarkPlayed:
    """The provider played everything sent before the mark ``name`` (or dropped it on a
    ``clear``: the provider returns pending marks then too)."""
    name: str


@dataclass
class Dtmf:
    digit: str


@dataclass
class Stop:
    """The call ended, or the stream was stopped."""


Event = Connected | Start | Media | MarkPlayed | Dtmf | Stop


class Serializer(ABC):
    """One call's protocol state (a stream id learnt at ``Start``); one instance per call."""

    name: str = ""           # the provider, as in the route /telephony/<name>
    sample_rate: int = 8000  # PCM rate of Media and of reply audio

    @abstractmethod
    def parse(self, text: str | None, data: bytes | None) -> list[Event]:
        """One WebSocket message (text or binary) -> the events it holds (none for a
        message s2s does not act on).  Raises BadMessage."""

    @abstractmethod
    def audio(self, pcm: bytes) -> list[str | bytes]:
        """Reply audio (PCM16 at ``sample_rate``) -> messages to send, in order."""

    @abstractmethod
    def mark(self, name: str) -> str | bytes | None:
        """A message asking to be told when what was sent so far has played (None when
        the provider has no marks)."""

    @abstractmethod
    def clear(self) -> str | bytes:
        """A message that drops the audio the provider holds but has not played yet."""
