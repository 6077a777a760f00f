"""The state a Realtime session keeps beside the native one: its configuration
(``session.update``) and the lifecycle of one response (``response.created`` … ``done``);
and the ways a Realtime connection is refused or given up."""

from __future__ import annotations

import asyncio
import base64
import copy
import uuid
from typing import Any

from .realtime_tools import configured_tools

FORMATS = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
NATIVE_SR = FORMATS["audio/pcm"]   # the native session's rate both ways
#: session fields a client may send that s2s accepts and does not act on
IGNORED_FIELDS = {"type", "model", "max_output_tokens", "tracing",
                  "truncation", "prompt", "include", "expires_at", "id", "object"}
VOICE = "joe"
MAX_INSTRUCTIONS = 4000     # as the native configure's (gateway/messages.py)


class UnsupportedConfig(ValueError):
    def __init__(self, code: str, message: str, event_id: str | None, param: str | None):
        super().__init__(message)
        self.code, self.event_id, self.param = code, event_id, param


class Overflow(Exception):
    """The client sends faster than its session is served: the connection is closed."""


class ClientGone(ConnectionError):
    """The connection closed under a send (the client left, or the server closed it)."""


class NotReading(asyncio.TimeoutError):
    """The client took nothing sent to it for a while: it is given up (a timeout, as the
    native session's own send timeout is, which it is handled as)."""


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeConfig:
    """What ``session.update`` may set, validated; the rest is the native session's."""

    def __init__(self, settings: Any = None) -> None:
        self.instructions = ""
        self.tools: list[dict] = []         # the client's function tools (realtime_tools.py)
        self.tool_choice: str | dict = "auto"
        self.input_format = "audio/pcm"
        self.output_format = "audio/pcm"
        self.modalities = ["audio"]
        self.transcription: dict | None = {"model": "s2s-stt", "language": "en"}
        # the stack's own VAD settings, until the client changes them
        self.turn_detection: dict | None = {
            "type": "server_vad", "threshold": getattr(settings, "vad_threshold", 0.5),
            "prefix_padding_ms": getattr(settings, "vad_speech_pad_ms", 100),
            "silence_duration_ms": getattr(settings, "vad_min_silence_ms", 300),
            "idle_timeout_ms": None, "create_response": True, "interrupt_response": True}

    def updated(self, session: dict, eid: str | None) -> "RealtimeConfig":
        """A copy with ``session`` applied; raises UnsupportedConfig and changes nothing
        when any field is invalid or asks for something s2s cannot do."""
        new = copy.deepcopy(self)

        def bad(param: str, message: str, code: str = "invalid_value") -> UnsupportedConfig:
            return UnsupportedConfig(code, message, eid, f"session.{param}")

        if session.get("type", "realtime") != "realtime":
            raise bad("type", "only realtime sessions are served (no transcription sessions)")
        if "instructions" in session:
            if not isinstance(session["instructions"], str) or \
                    len(session["instructions"]) > MAX_INSTRUCTIONS:
                raise bad("instructions", f"instructions must be a string of at most "
                          f"{MAX_INSTRUCTIONS} characters")
            new.instructions = session["instructions"]
        if "output_modalities" in session:
            mods = session["output_modalities"]
            if mods not in (["audio"], ["text"]):
                raise bad("output_modalities", 'output_modalities must be ["audio"] or ["text"]')
            new.modalities = list(mods)
        audio = session.get("audio", {})
        if not isinstance(audio, dict):
            raise bad("audio", "audio must be an object")
        inp, out = audio.get("input", {}), audio.get("output", {})
        if not isinstance(inp, dict) or not isinstance(out, dict):
            raise bad("audio", "audio.input and audio.output must be objects")
        if "format" in inp:
            new.input_format = _format(inp["format"], bad, "audio.input.format")
        if "format" in out:
            new.output_format = _format(out["format"], bad, "audio.output.format")
        if "voice" in out and out["voice"] not in (None, VOICE) and not isinstance(out["voice"], str):
            raise bad("audio.output.voice", "voice must be a string")
        if "transcription" in inp:
            tr = inp["transcription"]
            if tr is not None and not isinstance(tr, dict):
                raise bad("audio.input.transcription", "transcription must be an object or null")
            new.transcription = tr
        if "turn_detection" in inp:
            new.turn_detection = _turn_detection(inp["turn_detection"], new.turn_detection, bad)
        if "tools" in session or "tool_choice" in session:
            new.tools, new.tool_choice = configured_tools(session, new.tools, new.tool_choice, bad)
        unknown = set(session) - IGNORED_FIELDS - {"instructions", "output_modalities", "audio",
                                                   "tools", "tool_choice"}
        if unknown:
            raise bad(sorted(unknown)[0], f"unknown session field {sorted(unknown)[0]!r}",
                      "unknown_parameter")
        return new

    def vad_settings(self) -> dict[str, float]:
        """The native VAD settings this session's turn detection maps to."""
        td = self.turn_detection or {}
        out = {k: float(td[src]) for k, src in (("threshold", "threshold"),
                                                ("min_silence_ms", "silence_duration_ms"),
                                                ("speech_pad_ms", "prefix_padding_ms"))
               if td.get(src) is not None}
        if "threshold" in out:  # 0 or 1 would make every chunk speech, or none
            out["threshold"] = min(max(out["threshold"], 0.05), 0.95)
        return out

    def describe(self, sid: str) -> dict:
        def fmt(name: str) -> dict:
            return {"type": name, "rate": FORMATS[name]} if name == "audio/pcm" else {"type": name}

        return {
            "type": "realtime", "object": "realtime.session", "id": f"sess_{sid}", "model": "s2s",
            "output_modalities": self.modalities, "instructions": self.instructions,
            "tools": self.tools, "tool_choice": self.tool_choice, "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto", "prompt": None, "expires_at": 0, "include": None,
            "audio": {
                "input": {"format": fmt(self.input_format), "transcription": self.transcription,
                          "noise_reduction": None, "turn_detection": self.turn_detection},
                "output": {"format": fmt(self.output_format), "voice": VOICE, "speed": 1.0}}}


def _format(value: Any, bad, param: str) -> str:
    if not isinstance(value, dict) or value.get("type") not in FORMATS:
        raise bad(param, f"{param} must be one of {sorted(FORMATS)}")
    rate = value.get("rate", FORMATS[value["type"]])
    if rate != FORMATS[value["type"]]:
        raise bad(param, f"{value['type']} is served at {FORMATS[value['type']]} Hz only")
    return value["type"]


def _turn_detection(value: Any, current: dict | None, bad) -> dict | None:
    if value is None:
        return None  # push-to-talk: the client commits and asks for responses
    if not isinstance(value, dict) or value.get("type", "server_vad") not in (
            "server_vad", "semantic_vad"):
        raise bad("audio.input.turn_detection", "turn_detection must be null, server_vad or "
                  "semantic_vad")
    merged = dict(current or {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 100,
                              "silence_duration_ms": 300, "idle_timeout_ms": None,
                              "create_response": True, "interrupt_response": True})
    for key, (lo, hi) in {"threshold": (0.0, 1.0), "prefix_padding_ms": (0, 2000),
                          "silence_duration_ms": (100, 5000)}.items():
        if key in value and value[key] is not None:
            v = value[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise bad(f"audio.input.turn_detection.{key}", f"{key} must be a number in "
                          f"[{lo}, {hi}]")
            merged[key] = v
    for key in ("create_response", "interrupt_response"):
        if value.get(key) is False:
            raise bad(f"audio.input.turn_detection.{key}", f"{key}: false is not supported: "
                      "s2s answers every finished turn and stops a reply the user talks over "
                      "(use turn_detection: null for push-to-talk)", "unsupported_value")
    merged["type"] = value.get("type", merged.get("type", "server_vad"))
    return merged


def user_text_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
            "status": "completed", "content": [{"type": "input_text", "text": text}]}


def user_audio_item(item_id: str, transcript: str | None, status: str) -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
            "status": status, "content": [{"type": "input_audio", "transcript": transcript}]}


class Response:
    """One assistant response: the reply of one native turn."""

    def __init__(self, turn: int, config: RealtimeConfig, previous_item: str):
        self.turn = turn
        self.id = _new_id("resp")
        self.item_id = _new_id("item")
        self.previous_item = previous_item or None
        self.audio = config.modalities == ["audio"]
        self.output_format = config.output_format
        self.started = self.done = False
        self.pieces: list[tuple[float, str]] = []  # (audio seconds sent before it, text)
        self.audio_s = 0.0
        # output items in order: the spoken message (opened by its first text or audio)
        # and function calls (realtime_tools.py), as dicts whose "item" is sent
        self.outputs: list[dict] = []
        self.message_index: int | None = None

    @property
    def transcript(self) -> str:
        return " ".join(text for _, text in self.pieces)

    def heard_text(self, end_s: float) -> str:
        """What the user heard by ``end_s`` seconds of this response's audio: the pieces
        whose audio had begun by then (a piece's audio follows its text)."""
        return " ".join(text for at, text in self.pieces if at < end_s)

    def item(self, status: str) -> dict:
        kind = "output_audio" if self.audio else "output_text"
        part = {"type": kind, ("transcript" if self.audio else "text"): self.transcript}
        return {"id": self.item_id, "object": "realtime.item", "type": "message",
                "role": "assistant", "status": status,
                "content": [part] if status != "in_progress" else []}

    def _body(self, status: str, reason: str | None = None) -> dict:
        words = len(self.transcript.split())
        item_status = "completed" if status == "completed" else "incomplete"
        output = [self.item(item_status) if o.get("message") else o["item"] for o in self.outputs]
        body = {"object": "realtime.response", "id": self.id, "status": status,
                "status_details": {"type": status, "reason": reason} if reason else None,
                "output": [] if status == "in_progress" else output,
                "output_modalities": ["audio"] if self.audio else ["text"],
                "conversation_id": None, "metadata": None, "max_output_tokens": "inf",
                "audio": {"output": {"format": {"type": self.output_format}, "voice": VOICE}},
                "usage": None}
        if status != "in_progress":
            # s2s counts no tokens across its stages: words are what it knows
            body["usage"] = {"total_tokens": words, "input_tokens": 0, "output_tokens": words,
                             "input_token_details": {"text_tokens": 0, "audio_tokens": 0,
                                                     "cached_tokens": 0},
                             "output_token_details": {"text_tokens": words, "audio_tokens": 0}}
        return body

    def _ids(self) -> dict:
        return {"response_id": self.id, "item_id": self.item_id,
                "output_index": self.message_index or 0, "content_index": 0}

    async def start(self, rt) -> None:
        if self.started:
            return
        self.started = True
        await rt.emit("response.created", response=self._body("in_progress"))

    async def _open_message(self, rt) -> None:
        """The spoken message item, at its first text or audio (a reply that only calls
        a tool has none)."""
        if self.message_index is not None:
            return
        self.message_index = len(self.outputs)
        self.outputs.append({"message": True})
        await rt.emit("response.output_item.added", response_id=self.id,
                      output_index=self.message_index, item=self.item("in_progress"))
        await rt.emit("conversation.item.added", previous_item_id=self.previous_item,
                      item=self.item("in_progress"))
        part = {"type": "audio", "transcript": ""} if self.audio else {"type": "text", "text": ""}
        await rt.emit("response.content_part.added", part=part, **self._ids())

    async def text_delta(self, rt, text: str) -> None:
        await self._open_message(rt)
        self.pieces.append((self.audio_s, text))
        delta = text if len(self.pieces) == 1 else " " + text
        kind = "response.output_audio_transcript.delta" if self.audio else \
            "response.output_text.delta"
        await rt.emit(kind, delta=delta, **self._ids())

    async def audio_delta(self, rt, payload: bytes, seconds: float) -> None:
        await self._open_message(rt)
        self.audio_s += seconds
        if self.audio:
            await rt.emit("response.output_audio.delta",
                          delta=base64.b64encode(payload).decode(), **self._ids())

    async def finish(self, rt, status: str, reason: str | None = None) -> None:
        self.done = True
        if self.message_index is not None:
            await self._finish_message(rt, status)
        await rt.emit("response.done", response=self._body(status, reason))

    async def _finish_message(self, rt, status: str) -> None:
        if self.audio:
            await rt.emit("response.output_audio.done", **self._ids())
            await rt.emit("response.output_audio_transcript.done", transcript=self.transcript,
                          **self._ids())
            part = {"type": "audio", "transcript": self.transcript}
        else:
            await rt.emit("response.output_text.done", text=self.transcript, **self._ids())
            part = {"type": "text", "text": self.transcript}
        await rt.emit("response.content_part.done", part=part, **self._ids())
        item_status = "completed" if status == "completed" else "incomplete"
        await rt.emit("response.output_item.done", response_id=self.id,
                      output_index=self.message_index, item=self.item(item_status))
        await rt.emit("conversation.item.done", previous_item_id=self.previous_item,
                      item=self.item(item_status))
