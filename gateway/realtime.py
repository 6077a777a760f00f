"""The OpenAI Realtime API (GA protocol subset) at ``/v1/realtime``: a translation layer.

``RealtimeSocket`` stands where a Starlette WebSocket stands for ``ClientSession``: the
native session (``gateway/session.py``) runs unchanged on top of it, so a Realtime
session is the same session as one on ``/ws`` (same authentication, limits, failover,
metrics, streams and workers).  Towards the native session it plays a client that said
``hello`` at 24 kHz in and out and streams audio; towards the real client it speaks
Realtime events (``docs/realtime.md`` lists what is supported, ignored or refused).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from typing import Any

import numpy as np

from s2s import metrics
from s2s.audio import StreamResampler
from s2s.config import Settings

from . import g711
from .realtime_events import (RealtimeConfig, Response, UnsupportedConfig, user_audio_item,
                              user_text_item)

log = logging.getLogger("s2s.gateway.realtime")

NATIVE_SR = 24000          # the native session's rate both ways (the Realtime `audio/pcm` rate)
PTT_MAX_S = 120.0          # a push-to-talk buffer longer than this is refused
PIECE_S = 0.5              # audio goes to the native session in pieces at most this long,
FREE_AUDIO_S = 6.0         # …all at once up to this much, then paced below its rate limit


def _resampled(resampler: StreamResampler, pcm: bytes) -> bytes:
    return np.asarray(resampler(np.frombuffer(pcm, "<i2")), "<i2").tobytes()


def _event_id() -> str:
    return "event_" + uuid.uuid4().hex[:20]


class RealtimeSocket:
    """A WebSocket look-alike for ``ClientSession``: native messages in, Realtime events out."""

    def __init__(self, ws: Any, settings: Settings):
        self._ws = ws
        self.settings = settings
        self.config = RealtimeConfig(settings)
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.pump: asyncio.Task | None = None
        self.sender: asyncio.Task | None = None
        self.audio_out: asyncio.Queue[bytes] = asyncio.Queue()
        self.send_lock = asyncio.Lock()
        self.sid = ""
        self.ptt = bytearray()             # push-to-talk audio (native rate) not yet committed
        self.audio_in_s = 0.0              # audio appended so far, seconds (speech timestamps)
        self.in_resampler: StreamResampler | None = None
        self.out_resampler: StreamResampler | None = None
        self.user_items: dict[int, str] = {}   # native turn -> id of its user item
        self.committed: set[str] = set()       # user items already announced as committed
        # (turn, item) of the last speech_started not yet transcribed: a speculative turn
        # the user went on from is superseded without a new speech_started, so the whole
        # thought's transcript comes in a later turn, for this same item
        self.unheard: tuple[int, str] | None = None
        self.texts_pending: list[str] = []     # typed user text waiting for response.create
        self.text_turns = 0                     # native transcripts to expect for typed text
        self.response: Response | None = None
        self.responses: dict[str, Response] = {}  # assistant item id -> its response
        self.last_item = ""

    def __getattr__(self, name: str) -> Any:  # headers, scope, client, url, …
        return getattr(self._ws, name)

    # --- the WebSocket interface ClientSession uses --------------------------------------
    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await self._ws.accept(subprotocol=subprotocol, headers=headers)
        self._native({"type": "hello", "sample_rate": NATIVE_SR, "output_sample_rate": NATIVE_SR})
        self.pump = asyncio.create_task(self._pump())
        self.sender = asyncio.create_task(self._send_audio())

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        await self._from_native(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        await self._reply_audio(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        for task in (self.pump, self.sender):
            if task:
                task.cancel()
        await self._ws.close(code=code, reason=reason)

    # --- helpers -------------------------------------------------------------------------
    def _native(self, message: dict) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(message)})

    def _native_audio(self, pcm: bytes) -> None:
        """Queue audio for the native session (in order, paced by ``_send_audio``)."""
        step = min(int(PIECE_S * NATIVE_SR) * 2, self.settings.max_message_bytes // 2 * 2)
        for i in range(0, len(pcm), step):
            self.audio_out.put_nowait(pcm[i:i + step])

    async def _send_audio(self) -> None:
        """Hand queued audio to the native session under its rate limit (max_audio_rate
        seconds of audio per second): a client may append a whole file at once, or commit
        a long push-to-talk buffer, and none of it is refused as rate_limited."""
        rate = 0.8 * self.settings.max_audio_rate
        tokens, at = FREE_AUDIO_S, time.monotonic()
        while True:
            pcm = await self.audio_out.get()
            seconds = len(pcm) / 2 / NATIVE_SR
            now = time.monotonic()
            tokens, at = min(FREE_AUDIO_S, tokens + (now - at) * rate), now
            if tokens < seconds:
                await asyncio.sleep((seconds - tokens) / rate)
                tokens, at = seconds, time.monotonic()
            tokens -= seconds
            self.inbox.put_nowait({"type": "websocket.receive", "bytes": pcm})

    async def emit(self, type_: str, **fields: Any) -> None:
        event = {"type": type_, "event_id": _event_id(), **fields}
        async with self.send_lock:
            await self._ws.send_text(json.dumps(event))

    async def error(self, code: str, message: str, client_event_id: str | None = None,
                    param: str | None = None, kind: str = "invalid_request_error") -> None:
        metrics.REJECTED.labels(f"realtime_{code}").inc()
        log.warning("realtime: %s: %s", code, message, extra={"sid": self.sid or "-"})
        await self.emit("error", error={"type": kind, "code": code, "message": message,
                                        "param": param, "event_id": client_event_id})

    # --- client events -> native session -------------------------------------------------
    async def _pump(self) -> None:
        try:
            while True:
                msg = await self._ws.receive()
                if msg["type"] == "websocket.disconnect":
                    self.inbox.put_nowait(msg)
                    return
                if msg.get("text") is None:
                    await self.error("invalid_event", "binary messages are not part of the "
                                     "Realtime protocol: send input_audio_buffer.append")
                    continue
                try:
                    await self._client_event(msg["text"])
                except UnsupportedConfig as e:
                    await self.error(e.code, str(e), e.event_id, e.param)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("realtime: client event pump failed", extra={"sid": self.sid or "-"})
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1011})

    async def _client_event(self, text: str) -> None:
        if len(text.encode("utf-8", "replace")) > 4 * self.settings.max_message_bytes:
            await self.error("message_too_large", "event over the size limit")
            return
        try:
            event = json.loads(text)
        except ValueError:
            await self.error("invalid_json", "events must be JSON objects")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("invalid_event", 'an object with a string "type" was expected')
            return
        kind, eid = event["type"], event.get("event_id")
        eid = eid if isinstance(eid, str) else None
        handler = CLIENT_EVENTS.get(kind)
        if handler is None:
            await self.error("unknown_event", f"unsupported event type {kind[:60]!r}", eid, "type")
            return
        await handler(self, event, eid)

    async def _session_update(self, event: dict, eid: str | None) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise UnsupportedConfig("invalid_value", "session must be an object", eid, "session")
        old, self.config = self.config, self.config.updated(session, eid)
        configure: dict = {}
        if self.config.instructions != old.instructions:
            configure["instructions"] = self.config.instructions
        vad = self.config.vad_settings()
        if vad and vad != old.vad_settings():
            configure["vad"] = vad
        if configure:  # the native session applies them (the LLM's prompt, the VAD)
            self._native({"type": "configure", **configure})
        await self.emit("session.updated", session=self.config.describe(self.sid))

    def _to_native_pcm(self, audio: bytes) -> bytes:
        """Client audio in the session's input format -> 16-bit PCM at NATIVE_SR."""
        fmt = self.config.input_format
        if fmt == "audio/pcm":
            return audio[: len(audio) // 2 * 2]
        pcm = g711.decode(audio, "ulaw" if fmt == "audio/pcmu" else "alaw")
        if self.in_resampler is None:
            self.in_resampler = StreamResampler(8000, NATIVE_SR, dtype="int16")
        return _resampled(self.in_resampler, pcm)

    async def _append(self, event: dict, eid: str | None) -> None:
        audio = event.get("audio")
        try:
            raw = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None:
            await self.error("invalid_value", "audio must be base64-encoded audio", eid, "audio")
            return
        if self.config.input_format == "audio/pcm" and len(raw) % 2:
            await self.error("invalid_value", "audio/pcm must be 16-bit samples (an even "
                             "number of bytes)", eid, "audio")
            return
        pcm = self._to_native_pcm(raw)
        self.audio_in_s += len(pcm) / 2 / NATIVE_SR
        if self.config.turn_detection is None:
            if len(self.ptt) + len(pcm) > PTT_MAX_S * NATIVE_SR * 2:
                await self.error("buffer_too_large", f"more than {PTT_MAX_S:.0f} s of audio "
                                 "without a commit", eid)
                return
            self.ptt += pcm
            return
        self._native_audio(pcm)

    async def _commit(self, event: dict, eid: str | None) -> None:
        item_id = "item_" + uuid.uuid4().hex[:20]
        if self.config.turn_detection is None:
            if len(self.ptt) < 0.1 * NATIVE_SR * 2:
                await self.error("input_audio_buffer_commit_empty", "buffer too small: commit "
                                 "needs at least 100 ms of audio", eid)
                return
            pcm, self.ptt = bytes(self.ptt), bytearray()
            # Silence after the speech lets the VAD end the utterance at once.
            trail = (self.settings.vad_min_silence_ms + self.settings.vad_speech_pad_ms + 200)
            pcm += bytes(int(NATIVE_SR * trail / 1000) * 2)
            self._native_audio(pcm)
        else:  # server VAD: silence ends the user's speech now
            trail = self.settings.vad_min_silence_ms + self.settings.vad_speech_pad_ms + 200
            self._native_audio(bytes(int(NATIVE_SR * trail / 1000) * 2))
        await self.emit("input_audio_buffer.committed", item_id=item_id,
                        previous_item_id=self.last_item or None)
        self.committed.add(item_id)
        self._next_user_item = item_id

    async def _clear(self, event: dict, eid: str | None) -> None:
        self.ptt = bytearray()
        await self.emit("input_audio_buffer.cleared")

    async def _item_create(self, event: dict, eid: str | None) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self.error("invalid_value", "item must be an object", eid, "item")
            return
        if item.get("type", "message") != "message" or item.get("role") != "user":
            await self.error("unsupported_item", "only user messages can be added (no "
                             "system, assistant or function-call items)", eid, "item.type")
            return
        texts, audio = [], b""
        for part in item.get("content") or []:
            if not isinstance(part, dict):
                continue
            if part.get("type") in ("input_text", "text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "input_audio" and isinstance(part.get("audio"), str):
                try:
                    audio += base64.b64decode(part["audio"], validate=True)
                except (binascii.Error, ValueError):
                    await self.error("invalid_value", "input_audio must be base64", eid,
                                     "item.content")
                    return
            else:
                await self.error("unsupported_content", "content parts must be input_text or "
                                 "input_audio", eid, "item.content")
                return
        text = " ".join(t.strip() for t in texts if t.strip())
        if not text and not audio:
            await self.error("invalid_value", "the item has no text or audio", eid, "item.content")
            return
        item_id = item.get("id") if isinstance(item.get("id"), str) else \
            "item_" + uuid.uuid4().hex[:20]
        full = user_text_item(item_id, text)
        await self.emit("conversation.item.added", previous_item_id=self.last_item or None,
                        item=full)
        await self.emit("conversation.item.done", previous_item_id=self.last_item or None,
                        item=full)
        self.last_item = item_id
        if text:
            self.texts_pending.append(text)
        if audio:  # an audio message: as if appended, committed at response.create
            self.ptt += self._to_native_pcm(audio)

    async def _response_create(self, event: dict, eid: str | None) -> None:
        if self.texts_pending:
            text, self.texts_pending = " ".join(self.texts_pending), []
            self.text_turns += 1
            self._native({"type": "text", "text": text})
        elif self.ptt:
            await self._commit(event, eid)
        # Audio turns are answered as soon as they are committed (by the server VAD or by
        # input_audio_buffer.commit): response.create then has nothing more to start.

    async def _response_cancel(self, event: dict, eid: str | None) -> None:
        if self.response is None or self.response.done:
            await self.error("response_cancel_not_active", "there is no response in progress",
                             eid)
            return
        self._native({"type": "cancel"})

    async def _truncate(self, event: dict, eid: str | None) -> None:
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        response = self.responses.get(item_id) if isinstance(item_id, str) else None
        if response is None:
            await self.error("item_not_found", f"no assistant item {str(item_id)[:40]!r}", eid,
                             "item_id")
            return
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            await self.error("invalid_value", "audio_end_ms must be a non-negative integer", eid,
                             "audio_end_ms")
            return
        self._native({"type": "truncate", "turn": response.turn,
                      "text": response.heard_text(end_ms / 1000)})
        await self.emit("conversation.item.truncated", item_id=item_id,
                        content_index=event.get("content_index", 0), audio_end_ms=end_ms)

    async def _output_clear(self, event: dict, eid: str | None) -> None:
        if self.response is not None and not self.response.done:
            self._native({"type": "cancel"})
        await self.emit("output_audio_buffer.cleared", response_id=getattr(
            self.response, "id", None))

    # --- native events -> Realtime events ------------------------------------------------
    async def _from_native(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.sid = msg["session_id"]
            await self.emit("session.created", session=self.config.describe(self.sid))
        elif kind == "interrupt":
            await self._end_response("cancelled", "turn_detected")
        elif kind == "speech_started":
            await self._end_response("cancelled", "turn_detected")
            item_id = getattr(self, "_next_user_item", None) or "item_" + uuid.uuid4().hex[:20]
            self._next_user_item = None
            self.user_items[msg["turn"]] = item_id
            self.unheard = (msg["turn"], item_id)
            if item_id not in self.committed:
                await self.emit("input_audio_buffer.speech_started", item_id=item_id,
                                audio_start_ms=int(msg.get("at_s", 0) * 1000))
        elif kind == "transcript":
            await self._transcript(msg)
        elif kind == "reply_text":
            response = self._response_for(msg["turn"])
            await response.start(self)
            if msg["text"]:
                await response.text_delta(self, msg["text"])
        elif kind == "audio_start":
            await self._response_for(msg["turn"]).start(self)
            self.out_resampler = None
        elif kind == "reply_done":
            if self.response is not None and self.response.turn == msg["turn"]:
                await self._end_response("completed")
        elif kind == "error":
            server = msg.get("code") in ("stage_error", "unavailable")
            await self.error(msg.get("code", "error"), msg.get("message", ""),
                             kind="server_error" if server else "invalid_request_error")
        # pong, notice: nothing to say in this protocol

    async def _transcript(self, msg: dict) -> None:
        turn, text = msg["turn"], msg["text"]
        if self.text_turns > 0 and turn not in self.user_items:
            self.text_turns -= 1  # the echo of typed text: its item was announced already
            return
        if turn not in self.user_items and self.unheard and self.unheard[0] < turn:
            self.user_items[turn] = self.unheard[1]
        item_id = self.user_items.setdefault(turn, "item_" + uuid.uuid4().hex[:20])
        if self.unheard and self.unheard[1] == item_id:
            self.unheard = None
        end_ms = int(msg.get("end_s", 0) * 1000)
        if item_id not in self.committed:
            await self.emit("input_audio_buffer.speech_stopped", item_id=item_id,
                            audio_end_ms=end_ms)
            await self.emit("input_audio_buffer.committed", item_id=item_id,
                            previous_item_id=self.last_item or None)
            self.committed.add(item_id)
        await self.emit("conversation.item.added", previous_item_id=self.last_item or None,
                        item=user_audio_item(item_id, None, "in_progress"))
        await self.emit("conversation.item.input_audio_transcription.completed",
                        item_id=item_id, content_index=0, transcript=text,
                        usage={"type": "duration", "seconds": round(
                            max(0.0, msg.get("end_s", 0) - msg.get("start_s", 0)), 3)})
        await self.emit("conversation.item.done", previous_item_id=self.last_item or None,
                        item=user_audio_item(item_id, text, "completed"))
        self.last_item = item_id

    def _response_for(self, turn: int) -> Response:
        if self.response is None or self.response.turn != turn or self.response.done:
            self.response = Response(turn, self.config, self.last_item)
            self.responses[self.response.item_id] = self.response
            self.last_item = self.response.item_id
        return self.response

    async def _end_response(self, status: str, reason: str | None = None) -> None:
        response = self.response
        if response is None or response.done or not response.started:
            return
        await response.finish(self, status, reason)

    async def _reply_audio(self, pcm: bytes) -> None:
        response = self.response
        if response is None or response.done:
            return
        fmt = self.config.output_format
        if fmt != "audio/pcm":
            if self.out_resampler is None:
                self.out_resampler = StreamResampler(NATIVE_SR, 8000, dtype="int16")
            pcm8 = _resampled(self.out_resampler, pcm)
            payload = g711.encode(pcm8, "ulaw" if fmt == "audio/pcmu" else "alaw")
        else:
            payload = pcm
        await response.audio_delta(self, payload, len(pcm) / 2 / NATIVE_SR)


CLIENT_EVENTS = {
    "session.update": RealtimeSocket._session_update,
    "input_audio_buffer.append": RealtimeSocket._append,
    "input_audio_buffer.commit": RealtimeSocket._commit,
    "input_audio_buffer.clear": RealtimeSocket._clear,
    "conversation.item.create": RealtimeSocket._item_create,
    "response.create": RealtimeSocket._response_create,
    "response.cancel": RealtimeSocket._response_cancel,
    "conversation.item.truncate": RealtimeSocket._truncate,
    "output_audio_buffer.clear": RealtimeSocket._output_clear,
}
