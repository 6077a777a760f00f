"""A WebRTC client of the gateway (``POST /v1/realtime/calls``, OpenAI's Realtime WebRTC
flow) with the interface of ``Connection`` and ``RealtimeConnection``: ``send_audio``
goes out on an Opus track, Realtime events come on the ``oai-events`` data channel, and
the reply is the audio of the incoming track.  ``recv`` yields the native protocol's
events, so ``talk()``, the ``Tracker`` and ``s2s bench --protocol webrtc`` measure it
as they measure the WebSocket protocols.

Reply audio has no byte that says "the reply starts here" on a track: a response's audio
begins (``audio_start``) at the first decoded frame that is not silence once the response
was created, and ends (``reply_done``) at the first silent frame after the gateway said
``output_audio_buffer.stopped``: what the client measures is what it would play."""

from __future__ import annotations

import asyncio
import collections
import time
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from s2s.rtc import Resampler, hand_on_at_once, int16_frame, mono_int16

from .errors import ProtocolError, auth_headers
from .realtime import RATE, RealtimeConnection
from .url import gateway_url

TRACK_RATE = 48000          # Opus's clock
FRAME = TRACK_RATE // 50    # 20 ms
SILENCE = 8                 # a decoded frame whose samples all stay within ±this is silence
MIC_QUEUE = 500             # 10 s of microphone frames waiting for the encoder


def _track_class():
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class MicTrack(MediaStreamTrack):
        """The microphone: 20 ms frames at 48 kHz, sent as they are given (the caller
        paces them, as a microphone would)."""

        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.frames: asyncio.Queue[bytes] = asyncio.Queue(MIC_QUEUE)
            self.carry = np.zeros(0, np.int16)
            self.pts = 0

        def feed(self, pcm48: np.ndarray) -> None:
            samples = np.concatenate([self.carry, pcm48])
            whole = len(samples) // FRAME * FRAME
            self.carry = samples[whole:]
            for i in range(0, whole, FRAME):
                if self.frames.full():  # the link stalled: drop the oldest, as a mic would
                    self.frames.get_nowait()
                self.frames.put_nowait(samples[i:i + FRAME].astype("<i2").tobytes())

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            pcm = await self.frames.get()
            frame = int16_frame(pcm, TRACK_RATE, self.pts)
            self.pts += FRAME
            return frame

    return MicTrack, MediaStreamError


def _post_offer(url: str, sdp: str, headers: dict, timeout: float) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, data=sdp.encode(), method="POST",
                                     headers={"Content-Type": "application/sdp", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")


def calls_url(url: str) -> tuple[str, str | None]:
    """The http(s) URL of the calls endpoint, and the key of a ``#key=`` fragment."""
    target = gateway_url(url, "webrtc")
    scheme, rest = target.url.split("://", 1)
    return ("https" if scheme == "wss" else "http") + "://" + rest, target.key


class WebRTCConnection(RealtimeConnection):
    def __init__(self, pc: Any, channel: Any, mic: Any, sample_rate: int):
        super().__init__(None, {}, sample_rate)
        self.pc, self.channel, self.mic = pc, channel, mic
        self.inbox: asyncio.Queue = asyncio.Queue()   # events and reply audio, in arrival order
        self.created: asyncio.Future = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task | None = None
        self.armed: str | None = None      # response whose audio is awaited
        self.audio_on = False              # its audio has begun
        self.stopping = False              # the gateway has sent all of it
        self.held_done: dict[str, dict] = {}  # reply_done waiting for the audio to end
        self.server_v2v: dict[str, float | None] = {}
        self.up_resampler = None
        self.answer = ""                   # the gateway's SDP answer
        self.frames_received = 0
        self.levels: collections.deque = collections.deque(maxlen=3000)  # (time, peak) a frame

    @classmethod
    async def open(cls, url: str, sample_rate: int = 16000, out_rate: int | None = None,
                   session_id: str | None = None, timeout: float = 10.0,
                   api_key: str | None = None) -> "WebRTCConnection":
        """``url``: any form :func:`s2s.client.url.gateway_url` takes (the page URL, a
        ``ws://`` URL of either protocol, or the calls URL).  ``api_key``: as for
        ``Connection.open``; a ``s2s.ticket.<ticket>`` works too."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
        from aiortc.rtcrtpsender import RTCRtpSender

        if session_id:
            raise ProtocolError("the Realtime API has no session resume")
        endpoint, key = calls_url(url)
        api_key = api_key if api_key is not None else key
        MicTrack, _ = _track_class()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        mic = MicTrack()
        transceiver = pc.addTransceiver(mic, direction="sendrecv")
        transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                         if c.mimeType.lower() == "audio/opus"])
        channel = pc.createDataChannel("oai-events")
        conn = cls(pc, channel, mic, sample_rate)
        channel.on("message", conn._on_message)
        channel.on("close", lambda: conn.inbox.put_nowait(None))

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio" and conn.reader is None:
                hand_on_at_once(transceiver.receiver)
                conn.reader = asyncio.create_task(conn._read_track(track))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                conn.inbox.put_nowait(None)

        try:
            await pc.setLocalDescription(await pc.createOffer())
            status, headers, body = await asyncio.to_thread(
                _post_offer, endpoint, pc.localDescription.sdp, auth_headers(api_key), timeout)
            if status != 201:
                try:
                    error = json.loads(body).get("error") or {}
                except ValueError:
                    error = {"code": f"http_{status}", "message": body[:200]}
                error["http_status"] = status
                if "retry-after" in {k.lower() for k in headers}:
                    retry = next(v for k, v in headers.items() if k.lower() == "retry-after")
                    error["retry_after_s"] = float(retry)
                raise ProtocolError(f"call refused (HTTP {status}): {error.get('code')}: "
                                    f"{error.get('message', '')}", error)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            first = await asyncio.wait_for(asyncio.shield(conn.created), timeout)
        except BaseException:
            await pc.close()
            raise
        conn.session_id = str(first.get("id", "")).removeprefix("sess_")
        conn.answer = body
        return conn

    @property
    def audio_codec(self) -> str:
        """The codec of the answer's audio (its first payload type): ``opus/48000/2``."""
        lines = self.answer.splitlines()
        media = next((ln for ln in lines if ln.startswith("m=audio")), "")
        pt = media.split()[3] if len(media.split()) > 3 else ""
        return next((ln.split(" ", 1)[1] for ln in lines
                     if ln.startswith(f"a=rtpmap:{pt} ")), "")

    # --- in ----------------------------------------------------------------------------------
    def _on_message(self, raw: str | bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return
        kind = event.get("type")
        if kind == "session.created" and not self.created.done():
            self.created.set_result(event.get("session") or {})
            return
        rid = event.get("response_id") or (event.get("response") or {}).get("id")
        if kind == "response.created":
            self.armed, self.audio_on, self.stopping = rid, False, False
        elif kind == "output_audio_buffer.started":
            self.server_v2v[rid] = event.get("voice_to_voice_ms")
        elif kind == "output_audio_buffer.stopped" and rid == self.armed:
            self.stopping = True
        elif kind == "output_audio_buffer.cleared" and rid == self.armed:
            self.armed, self.audio_on = None, False
        self.inbox.put_nowait(event)

    async def _read_track(self, track: Any) -> None:
        _, MediaStreamError = _track_class()
        # what it holds back the bench would count as reply latency (a browser plays the
        # 48 kHz track as it comes): soxr's stream held 0-19 ms, this ~1 ms
        down = Resampler(TRACK_RATE, RATE)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames_received += 1
            pcm = mono_int16(frame)
            self.levels.append((time.monotonic(), int(np.abs(pcm.astype(np.int32)).max())
                                if pcm.size else 0))
            out = np.asarray(down(pcm), "<i2").tobytes()
            rid = self.armed
            if rid is None:
                continue
            silent = self.levels[-1][1] <= SILENCE
            if self.stopping and silent:  # the gateway sent all of it, and it has all come
                self.armed, self.audio_on, self.stopping = None, False, False
                self.inbox.put_nowait(("drained", rid))
                continue
            if not self.audio_on:
                if silent:
                    continue
                self.audio_on = True
                self.inbox.put_nowait(("audio_start", rid))
            self.inbox.put_nowait(out)

    async def recv(self) -> dict | bytes | None:
        while not self.pending:
            item = await self.inbox.get()
            if item is None:
                self.close_code = self.close_code or 1006
                return None
            self.pending.extend(self._translate_item(item))
        return self.pending.pop(0)

    def _translate_item(self, item: Any) -> list:
        if isinstance(item, bytes):
            return [item]
        if isinstance(item, tuple):
            what, rid = item
            turn = self.response_turn.get(rid, self.turn)
            if what == "audio_start":
                self.audio_started.add(rid)
                return [{"type": "audio_start", "turn": turn, "sample_rate": RATE,
                         "voice_to_voice_ms": self.server_v2v.get(rid)}]
            done = self.held_done.pop(rid, None)
            return [done] if done else []
        out = self._translate(item)
        if item.get("type") == "response.done":
            rid = item["response"]["id"]
            if rid in self.server_v2v:  # the reply is done once its audio has all come
                for msg in out:
                    if msg.get("type") == "reply_done":
                        self.held_done[rid] = msg
                out = [m for m in out if m.get("type") != "reply_done"]
        return out

    # --- out ---------------------------------------------------------------------------------
    async def send_audio(self, pcm: bytes | np.ndarray) -> None:
        samples = np.frombuffer(pcm, "<i2") if isinstance(pcm, (bytes, bytearray)) else pcm
        if self.sample_rate != TRACK_RATE:
            if self.up_resampler is None:
                self.up_resampler = Resampler(self.sample_rate, TRACK_RATE)
            samples = self.up_resampler(np.asarray(samples, np.int16))
        self.mic.feed(np.asarray(samples, np.int16))

    async def send_json(self, obj: dict) -> None:
        if self.channel.readyState != "open":
            raise ConnectionError("the data channel is closed")
        self.channel.send(json.dumps(obj))

    async def close(self, bye: bool = True) -> None:
        if self.reader is not None:
            self.reader.cancel()
        try:
            await self.pc.close()
        except Exception:
            pass
        self.close_code = self.close_code or 1000
        self.inbox.put_nowait(None)
