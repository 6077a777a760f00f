"""The Realtime translation over a WebRTC call: events on the data channel, audio on tracks.

``ChannelSocket`` is what ``RealtimeSocket`` needs of a WebSocket, over the call's data
channel (``oai-events``): client events come in as ``websocket.receive`` messages and
server events go out as text.  ``WebRTCRealtimeSocket`` is the Realtime translation of
``gateway/realtime.py`` (the same events, the same native session underneath) with the
audio moved onto the call's tracks, as in OpenAI's Realtime WebRTC flavour:

- the caller's microphone track feeds the session (``mic_audio``) instead of
  ``input_audio_buffer.append`` (which still works);
- reply audio goes out on the outgoing Opus track, not as ``response.output_audio.delta``;
  ``output_audio_buffer.started`` / ``.stopped`` say when it begins and has all gone out;
- a barge-in (the native ``interrupt``) or ``output_audio_buffer.clear`` empties the
  outgoing track at once (``output_audio_buffer.cleared``), and the conversation keeps
  what was played of the reply (``conversation.item.truncated``), as the server knows it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from starlette.datastructures import Headers

from s2s import metrics
from s2s.audio import StreamResampler
from s2s.config import Settings

from .limits import MAX_AUDIO_S
from .realtime import RealtimeSocket
from .realtime_client import CLIENT_EVENTS, output_clear, resampled
from .realtime_events import NATIVE_SR, ClientGone
from .webrtc_media import TRACK_RATE, ReplyTrack

log = logging.getLogger("s2s.gateway.webrtc")

INBOX_MAX = 256             # client events waiting for the translation
BACKLOG_MAX = 512           # server events waiting for the data channel to open
MAX_BUFFERED = 1 << 20      # bytes the data channel may hold unsent (then sends wait)
DRAIN_WAIT_S = 0.5          # at the end, what was sent gets this long to leave
MAX_PTT_BYTES = int(MAX_AUDIO_S * NATIVE_SR) * 2


def _disconnect(code: int) -> dict:
    return {"type": "websocket.disconnect", "code": code}


class ChannelSocket:
    """A WebSocket look-alike over an RTCDataChannel (attached once the caller opens it)."""

    def __init__(self, scope: dict, has_channel: bool, on_close: Callable[[], None]):
        self.scope = scope
        self.headers = Headers(scope=scope)
        self.client = scope.get("client")
        self.has_channel = has_channel      # the offer has a data channel: events wait for it
        self.channel: Any = None
        self.inbox: asyncio.Queue[dict] = asyncio.Queue(maxsize=INBOX_MAX)
        self.final: dict | None = None      # the last message, ahead of what is queued
        self.backlog: list[str] = []
        self.closed = False
        self._on_close = on_close

    # --- the data channel ------------------------------------------------------------------
    def attach(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", self._message)
        channel.on("close", lambda: self.disconnect(1000))
        backlog, self.backlog = self.backlog, []
        for text in backlog:
            channel.send(text)

    def _message(self, data: str | bytes) -> None:
        msg = {"type": "websocket.receive"}
        msg["text" if isinstance(data, str) else "bytes"] = data
        try:
            self.inbox.put_nowait(msg)
        except asyncio.QueueFull:  # a caller sending faster than its session is served
            if self.final is None:
                metrics.REJECTED.labels("webrtc_input_overflow").inc()
                log.warning("webrtc: more than %d client events wait: the call is ended",
                            INBOX_MAX)
                self.final = _disconnect(1008)

    def disconnect(self, code: int) -> None:
        """The caller is gone (hang-up, ICE failed, never connected)."""
        if self.final is None:
            self.final = _disconnect(code)
            try:  # wakes a translation waiting on an empty inbox
                self.inbox.put_nowait(self.final)
            except asyncio.QueueFull:
                pass

    # --- the WebSocket interface RealtimeSocket uses ----------------------------------------
    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        return None  # the call was accepted by its SDP answer

    async def receive(self) -> dict:
        if self.final is not None and (self.inbox.empty() or self.final["code"] == 1008):
            return self.final
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise ConnectionError("the call is closed")
        channel = self.channel
        if channel is None:
            if not self.has_channel:
                return  # an audio-only call: nobody reads events
            if len(self.backlog) >= BACKLOG_MAX:
                raise ConnectionError("the data channel never opened")
            self.backlog.append(text)
            return
        if channel.readyState != "open":
            raise ConnectionError("the data channel is closed")
        while channel.bufferedAmount > MAX_BUFFERED:  # bounded by the caller's send timeout
            await asyncio.sleep(0.02)
        channel.send(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            waited = 0.0
            while channel.bufferedAmount and waited < DRAIN_WAIT_S:  # the last error event
                await asyncio.sleep(0.02)
                waited += 0.02
        self._on_close()


async def _output_clear(rt: "WebRTCRealtimeSocket", event: dict, eid: str | None) -> None:
    """``output_audio_buffer.clear``: the track is emptied now, then as over a WebSocket
    (the response, if any, is cancelled; ``output_audio_buffer.cleared``)."""
    await rt.cut_output(announce=False)
    await output_clear(rt, event, eid)


class WebRTCRealtimeSocket(RealtimeSocket):
    """The Realtime translation with audio on the call's tracks (``track``: the outgoing
    one; None when the offer has no audio)."""

    output_rate = TRACK_RATE  # the native session sends Opus's own rate: no resampling here
    client_events = {**CLIENT_EVENTS, "output_audio_buffer.clear": _output_clear}

    def __init__(self, ws: ChannelSocket, settings: Settings, track: ReplyTrack | None):
        super().__init__(ws, settings)
        self.track = track
        # the first answer of the native session: None once it is open (ready), or the
        # error that refused it; the call's HTTP answer waits for it
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        self.playing: str | None = None     # response whose audio is on the track
        self.voice_to_voice_ms: float | None = None
        self.reply_resampler: StreamResampler | None = None
        self.ptt_overflowed = False
        self.background: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- the microphone track ---------------------------------------------------------------
    def mic_audio(self, pcm: bytes) -> None:
        """A frame of the caller's microphone (int16 at NATIVE_SR).  Raises Overflow when
        the session is not served fast enough (the call is then ended)."""
        if not self.sid or self.gone:
            return  # the session is not open (or no longer)
        if self.config.turn_detection is None:  # push-to-talk: held until the commit
            if not self.ptt:
                self.ptt_overflowed = False
            if len(self.ptt) + len(pcm) > MAX_PTT_BYTES:
                if not self.ptt_overflowed:
                    self.ptt_overflowed = True
                    self._spawn(self._quiet(self.error(
                        "buffer_too_large", f"more than {MAX_AUDIO_S:.0f} s of microphone "
                        "audio without a commit: the rest is dropped")))
                return
            self.ptt += pcm
        else:
            self.to_native_audio(pcm)
        self.audio_in_s += len(pcm) / 2 / NATIVE_SR

    async def _quiet(self, coro) -> None:
        try:
            await coro
        except (ClientGone, asyncio.TimeoutError):
            pass  # the translation's own pump notices a gone client

    # --- native events -> Realtime events and the track ----------------------------------
    async def _from_native(self, msg: dict) -> None:
        kind = msg.get("type")
        if not self.outcome.done():
            if kind == "ready":
                self.outcome.set_result(None)
            elif kind == "error":  # before ready, every error refuses the session
                self.outcome.set_result(msg)
        if kind == "interrupt":
            await self.cut_output(announce=True)
        elif kind == "audio_start":
            self.voice_to_voice_ms = msg.get("voice_to_voice_ms")
            rate = msg.get("sample_rate") or TRACK_RATE  # asked for TRACK_RATE; in case not
            self.reply_resampler = None if rate == TRACK_RATE else \
                StreamResampler(rate, TRACK_RATE, dtype="int16")
        await super()._from_native(msg)
        if kind == "reply_done" and self.playing is not None and self.track is not None:
            self._spawn(self._quiet(self._stopped_when_played(self.playing)))

    async def _reply_audio(self, pcm: bytes) -> None:
        response = self.response
        if response is None or response.done or self.track is None:
            return
        if self.playing != response.id:
            self.playing = response.id
            # voice_to_voice_ms: the gateway's own measure (an s2s addition to the event)
            await self.emit("output_audio_buffer.started", response_id=response.id,
                            voice_to_voice_ms=self.voice_to_voice_ms)
        if self.reply_resampler is not None:
            pcm = resampled(self.reply_resampler, pcm)
        response.audio_s += len(pcm) / 2 / TRACK_RATE
        if response.audio:
            self.track.push(pcm, response.id)

    async def _stopped_when_played(self, response_id: str) -> None:
        await self.track.idle.wait()
        if self.playing == response_id:
            self.playing = None
            await self.emit("output_audio_buffer.stopped", response_id=response_id)

    async def cut_output(self, announce: bool) -> None:
        """Empty the outgoing track now (barge-in); the history keeps what was played of
        the reply.  ``announce``: say ``output_audio_buffer.cleared`` (the client's own
        clear says it after cancelling)."""
        if self.track is None:
            return
        self.track.clear()
        response_id, self.playing = self.playing, None
        if response_id is None:
            return
        heard_s = self.track.played(response_id)
        response = next((r for r in self.responses.values() if r.id == response_id), None)
        if response is not None and response.pieces:
            self.to_native({"type": "truncate", "turn": response.turn,
                            "text": response.heard_text(heard_s)})
            await self.emit("conversation.item.truncated", item_id=response.item_id,
                            content_index=0, audio_end_ms=int(heard_s * 1000))
        if announce:
            await self.emit("output_audio_buffer.cleared", response_id=response_id)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        for task in list(self.background):
            task.cancel()
        await super().close(code, reason)
