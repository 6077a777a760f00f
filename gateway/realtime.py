"""The OpenAI Realtime API (GA protocol subset) at ``/v1/realtime``: a translation layer.

``RealtimeSocket`` stands where a Starlette WebSocket stands for ``ClientSession``: the
native session (``gateway/session.py``) runs unchanged on top of it, so a Realtime
session is the same session as one on ``/ws`` (same authentication, limits, failover,
metrics, streams and workers).  Towards the native session it plays a client that said
``hello`` at 24 kHz in and out and streams audio; towards the real client it speaks
Realtime events (``docs/realtime.md`` lists what is supported, ignored or refused).
Client events are handled in ``realtime_client.py``; native events are turned into
Realtime ones here.

What waits between the two is bounded: at most ``INBOX_MAX`` native messages for the
session, and at most ``PACED_MAX_S`` of audio waiting to be paced into it.  A client
that sends faster than its session is served gets an ``input_overflow`` error and the
connection is closed (1008); one that takes nothing sent to it for ``SEND_TIMEOUT_S`` is
given up.  Both are counted and logged, and concern that connection alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from s2s import metrics
from s2s.audio import StreamResampler
from s2s.config import Settings

from . import g711, realtime_tools
from .errors import NOT_READING
from .limits import MAX_AUDIO_S, typed_bucket, within
from .realtime_client import CLIENT_EVENTS, new_item_id, resampled
from .realtime_events import (NATIVE_SR, ClientGone, NotReading, Overflow, RealtimeConfig,
                              Response, UnsupportedConfig, user_audio_item)

log = logging.getLogger("s2s.gateway.realtime")

PIECE_S = 0.5              # audio goes to the native session in pieces at most this long,
FREE_AUDIO_S = 6.0         # …all at once up to this much, then paced below its rate limit
INBOX_MAX = 256            # native messages waiting for the session
PACED_MAX_S = MAX_AUDIO_S + 5.0  # audio waiting to be paced in: the cap and a commit's trail
SEND_TIMEOUT_S = 10.0      # a client that takes no data for this long is not reading
CLOSE_TIMEOUT_S = 2.0
KEEP_ITEMS = 256           # turns / responses remembered for transcripts and truncates
OVERFLOW_CLOSE = 1008


def _event_id() -> str:
    return "event_" + uuid.uuid4().hex[:20]


def _disconnect(code: int, **extra: bool) -> dict:
    return {"type": "websocket.disconnect", "code": code, **extra}


def _keep_last(d: dict, n: int = KEEP_ITEMS) -> None:
    while len(d) > n:
        del d[next(iter(d))]


class RealtimeSocket:
    """A WebSocket look-alike for ``ClientSession``: native messages in, Realtime events out."""

    # what a transport over other media (WebRTC: gateway/webrtc_socket.py) may change: the
    # rate the native session sends reply audio at, and the client events it handles
    output_rate = NATIVE_SR
    client_events = CLIENT_EVENTS

    def __init__(self, ws: Any, settings: Settings):
        self._ws = ws
        self.settings = settings
        self.config = RealtimeConfig(settings)
        self.typed = typed_bucket(settings)  # typed turns and cancels (see realtime_client)
        self.inbox: asyncio.Queue[dict] = asyncio.Queue(maxsize=INBOX_MAX)
        self.final: dict | None = None       # what the session gets next, whatever is queued
        self.paced: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by paced_bytes below
        self.paced_bytes = 0
        self.pump: asyncio.Task | None = None
        self.sender: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.gone = False                    # the client stopped reading: nothing more sent
        self.sid = ""
        self.ptt = bytearray()             # push-to-talk audio (native rate) not yet committed
        self.audio_in_s = 0.0              # audio appended so far, seconds (speech timestamps)
        self.in_resampler: StreamResampler | None = None
        self.out_resampler: StreamResampler | None = None
        self.user_items: dict[int, str] = {}   # native turn -> id of its user item
        self.committed: dict[str, None] = {}   # user items already announced as committed
        self.next_user_item: str | None = None  # committed by the client, not yet heard
        # (turn, item) of the last speech_started not yet transcribed: a speculative turn
        # the user went on from is superseded without a new speech_started, so the whole
        # thought's transcript comes in a later turn, for this same item
        self.unheard: tuple[int, str] | None = None
        self.texts_pending: list[str] = []     # typed user text waiting for response.create
        self.tool_outputs: list[dict] = []     # function_call_output items, likewise
        self.text_turns = 0                     # native transcripts to expect for typed text
        self.response: Response | None = None
        self.responses: dict[str, Response] = {}  # assistant item id -> its response
        self.last_item = ""

    def __getattr__(self, name: str) -> Any:  # headers, scope, client, url, …
        return getattr(self._ws, name)

    # --- the WebSocket interface ClientSession uses --------------------------------------
    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await self._ws.accept(subprotocol=subprotocol, headers=headers)
        self.to_native({"type": "hello", "sample_rate": NATIVE_SR,
                        "output_sample_rate": self.output_rate})
        self.pump = asyncio.create_task(self._pump())
        self.sender = asyncio.create_task(self._send_audio())

    async def receive(self) -> dict:
        if self.final is not None:
            return self.final
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        await self._from_native(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        await self._reply_audio(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        for task in (self.pump, self.sender):
            if task and task is not asyncio.current_task():
                task.cancel()
        await self._ws.close(code=code, reason=reason)

    # --- towards the native session ------------------------------------------------------
    def to_native(self, message: dict) -> None:
        try:
            self.inbox.put_nowait({"type": "websocket.receive",
                                   "text": json.dumps(message, ensure_ascii=False)})
        except asyncio.QueueFull:
            raise Overflow(f"more than {INBOX_MAX} events wait for the session") from None

    def to_native_audio(self, pcm: bytes) -> None:
        """Queue audio for the native session (in order, paced by ``_send_audio``)."""
        if self.paced_bytes + len(pcm) > PACED_MAX_S * NATIVE_SR * 2:
            raise Overflow(f"more than {PACED_MAX_S:.0f} s of audio wait for the session")
        step = min(int(PIECE_S * NATIVE_SR) * 2, self.settings.max_message_bytes // 2 * 2)
        for i in range(0, len(pcm), step):
            self.paced.put_nowait(pcm[i:i + step])
        self.paced_bytes += len(pcm)

    async def _send_audio(self) -> None:
        """Hand queued audio to the native session under its rate limit (max_audio_rate
        seconds of audio per second): a client may append a whole file at once, or commit
        a long push-to-talk buffer, and none of it is refused as rate_limited."""
        rate = 0.8 * self.settings.max_audio_rate
        tokens, at = FREE_AUDIO_S, time.monotonic()
        while True:
            pcm = await self.paced.get()
            self.paced_bytes -= len(pcm)
            seconds = len(pcm) / 2 / NATIVE_SR
            now = time.monotonic()
            tokens, at = min(FREE_AUDIO_S, tokens + (now - at) * rate), now
            if tokens < seconds:
                await asyncio.sleep((seconds - tokens) / rate)
                tokens, at = seconds, time.monotonic()
            tokens -= seconds
            await self.inbox.put({"type": "websocket.receive", "bytes": pcm})

    def _end(self, message: dict, in_order: bool) -> None:
        """The session's last message: after what is queued (``in_order``: the client
        left), or before it (the connection is given up)."""
        try:
            self.inbox.put_nowait(message)  # wakes a session waiting on an empty inbox
            if in_order:
                return
        except asyncio.QueueFull:
            pass
        self.final = message

    # --- towards the client ----------------------------------------------------------------
    async def emit(self, type_: str, **fields: Any) -> None:
        if self.gone:
            raise ClientGone("the connection is given up")
        event = {"type": type_, "event_id": _event_id(), **fields}
        try:
            await within(SEND_TIMEOUT_S, self._send_now(json.dumps(event)))
        except asyncio.TimeoutError:
            self.gone = True
            raise NotReading(f"the client took no data for {SEND_TIMEOUT_S:.0f} s") from None
        except Exception as e:  # closed under us: the client left, or a 1007 for bad UTF-8
            self.gone = True
            raise ClientGone(str(e)) from None

    async def _send_now(self, text: str) -> None:
        async with self.send_lock:
            await self._ws.send_text(text)

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
                    self._end(msg, in_order=True)
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
        except Overflow as e:
            await self._overflow(str(e))
        except NotReading:  # the session counts it and ends, as when its own send times out
            self._end(_disconnect(1006, **{NOT_READING: True}), in_order=False)
        except ClientGone:  # what was queued for the session still goes in first
            self._end(_disconnect(1006), in_order=True)
        except Exception:
            log.exception("realtime: client event pump failed", extra={"sid": self.sid or "-"})
            self._end(_disconnect(1011), in_order=False)

    async def _overflow(self, message: str) -> None:
        """The client sends faster than its session is served: tell it, close, and let
        the session end (what is still queued for it is dropped)."""
        try:
            await self.error("input_overflow", f"{message}: the client sends faster than "
                             "its session is served; closing")
            await within(CLOSE_TIMEOUT_S, self._ws.close(code=OVERFLOW_CLOSE,
                                                         reason="input_overflow"))
        except Exception:  # not reading either, or gone: the session ends all the same
            pass
        finally:
            self._end(_disconnect(OVERFLOW_CLOSE), in_order=False)

    async def _client_event(self, text: str) -> None:
        if len(text.encode("utf-8", "replace")) > 4 * self.settings.max_message_bytes:
            await self.error("message_too_large", "event over the size limit")
            return
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):  # "[[[[…": nesting deeper than the parser goes
            await self.error("invalid_json", "events must be JSON objects")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self.error("invalid_event", 'an object with a string "type" was expected')
            return
        kind, eid = event["type"], event.get("event_id")
        eid = eid if isinstance(eid, str) else None
        handler = self.client_events.get(kind)
        if handler is None:
            await self.error("unknown_event", f"unsupported event type {kind[:60]!r}", eid, "type")
            return
        await handler(self, event, eid)

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
            item_id = self.next_user_item or new_item_id()
            self.next_user_item = None
            self.user_items[msg["turn"]] = item_id
            _keep_last(self.user_items)
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
        elif kind == "tool_call":
            await realtime_tools.function_call(self, msg)
        elif kind == "reply_done":
            if self.response is not None and self.response.turn == msg["turn"]:
                await self._end_response("completed")
        elif kind == "error":
            server = msg.get("code") in ("stage_error", "unavailable")
            await self.error(msg.get("code", "error"), msg.get("message", ""),
                             kind="server_error" if server else "invalid_request_error")
        # pong, notice: nothing to say in this protocol

    def mark_committed(self, item_id: str) -> None:
        self.committed[item_id] = None
        _keep_last(self.committed)

    async def _transcript(self, msg: dict) -> None:
        turn, text = msg["turn"], msg["text"]
        if self.text_turns > 0 and turn not in self.user_items:
            self.text_turns -= 1  # the echo of typed text: its item was announced already
            return
        if turn not in self.user_items and self.unheard and self.unheard[0] < turn:
            self.user_items[turn] = self.unheard[1]
        item_id = self.user_items.setdefault(turn, new_item_id())
        _keep_last(self.user_items)
        if self.unheard and self.unheard[1] == item_id:
            self.unheard = None
        end_ms = int(msg.get("end_s", 0) * 1000)
        if item_id not in self.committed:
            await self.emit("input_audio_buffer.speech_stopped", item_id=item_id,
                            audio_end_ms=end_ms)
            await self.emit("input_audio_buffer.committed", item_id=item_id,
                            previous_item_id=self.last_item or None)
            self.mark_committed(item_id)
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
            _keep_last(self.responses)
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
            pcm8 = resampled(self.out_resampler, pcm)
            payload = g711.encode(pcm8, "ulaw" if fmt == "audio/pcmu" else "alaw")
        else:
            payload = pcm
        await response.audio_delta(self, payload, len(pcm) / 2 / NATIVE_SR)
