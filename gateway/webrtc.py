"""WebRTC calls, the OpenAI Realtime way: ``POST /v1/realtime/calls``.

The caller POSTs its SDP offer (``Content-Type: application/sdp``) with its credential:
``Authorization: Bearer <API key or signed token>``, or ``Bearer s2s.ticket.<ticket>``
with a one-time ticket from ``POST /auth/ticket`` (the ephemeral key of OpenAI's browser
flow: a backend holding the key hands the page a ticket).  The gateway answers ``201``
with its SDP answer once the session is open, or refuses it with the status and the
error the WebSocket transports would have given (401, 429, 503 with ``Retry-After``, …):
a call that gets an answer is an admitted session.

Each call is one peer connection (aiortc) and one native ``ClientSession`` behind the
Realtime translation (``webrtc_socket.WebRTCRealtimeSocket``): the same authentication,
admission, per-principal limits, cells and failover as ``/ws`` and ``/v1/realtime``.
Opus is the only codec both ways.  Calls are bounded (``S2S_WEBRTC_MAX_CALLS``), and a
call ends with its session: the session ends when the peer hangs up, its ICE fails, or
it never connects; the peer connection is closed when the session ends.  ICE uses host
candidates, plus the STUN/TURN servers of ``S2S_WEBRTC_ICE_SERVERS`` (none by default).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from s2s import metrics
from s2s.config import Settings
from s2s.rtc import hand_on_at_once

from .auth import TICKET_SUBPROTOCOL, origin_allowed
from .realtime_events import NATIVE_SR, Overflow
from .webrtc_media import MicPump, ReplyTrack
from .webrtc_socket import ChannelSocket, WebRTCRealtimeSocket

log = logging.getLogger("s2s.gateway.webrtc")

MAX_OFFER_BYTES = 64 * 1024
OPEN_TIMEOUT_S = 15.0       # the session's open (auth, admission) before the answer
CONNECT_TIMEOUT_S = 20.0    # from the answer to a connected peer
# a native refusal's code -> the HTTP status of the call's answer
STATUS = {"unauthorized": 401, "forbidden_origin": 403, "session_limit": 429,
          "audio_limit": 429, "rate_limited": 429, "busy": 503, "too_many_sessions": 503,
          "unavailable": 503, "too_many_calls": 503}

CALLS_OPEN = Gauge("s2s_webrtc_calls_open", "WebRTC calls (peer connections) open on this "
                   "gateway.")
CALLS = Counter("s2s_webrtc_calls", "WebRTC call offers, by outcome (answered, refused, "
                "invalid, failed).", ["outcome"])


def ice_servers(settings: Settings) -> list[RTCIceServer]:
    """The STUN/TURN servers of the settings (an explicit empty list: aiortc would use a
    public STUN server of its own otherwise)."""
    urls = [u.strip() for u in settings.webrtc_ice_servers.split(",") if u.strip()]
    return [RTCIceServer(urls=u, username=settings.webrtc_turn_username or None,
                         credential=settings.webrtc_turn_credential or None)
            if u.startswith("turn") else RTCIceServer(urls=u) for u in urls]


def session_scope(scope: dict) -> dict:
    """The request's scope as the session reads credentials from it: a ticket sent as
    ``Bearer s2s.ticket.<ticket>`` goes where a browser's WebSocket puts it (an offered
    subprotocol), so the session redeems it as it does any ticket."""
    headers = list(scope.get("headers") or [])
    out = {**scope, "headers": headers, "subprotocols": []}
    for name, value in headers:
        if name.lower() == b"authorization":
            text = value.decode("latin-1")
            credential = text[7:].strip() if text[:7].lower() == "bearer " else ""
            if credential.startswith(TICKET_SUBPROTOCOL):
                out["headers"] = [(k, v) for k, v in headers if k.lower() != b"authorization"]
                out["subprotocols"] = [credential]
    return out


def refusal(code: str, message: str, status: int | None = None,
            retry_after_s: float | None = None) -> Response:
    """An error in the OpenAI REST shape."""
    status = status or STATUS.get(code, 400)
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"type": kind, "code": code, "message": message,
                                   "param": None}}, status_code=status, headers=headers)


@dataclass(eq=False)
class Call:
    pc: RTCPeerConnection
    socket: ChannelSocket
    rt: WebRTCRealtimeSocket
    track: ReplyTrack
    id: str = ""
    session: asyncio.Task | None = None        # the native session's
    tasks: set = field(default_factory=set)    # the microphone's, watchers
    overflowed: bool = False
    closed: bool = False

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def mic(self, pcm: bytes) -> None:
        if self.overflowed:
            return
        try:
            self.rt.mic_audio(pcm)
        except Overflow as e:  # the session is not served fast enough: end this call
            self.overflowed = True
            self.spawn(self.rt._overflow(str(e)))


class WebRTCCalls:
    """The calls of one gateway.  ``start_session(socket)`` runs a native session on a
    WebSocket look-alike until it ends (``ClientSession(...).run()``)."""

    def __init__(self, settings: Settings,
                 start_session: Callable[[Any], Awaitable[None]]):
        self.settings = settings
        self.start_session = start_session
        self.calls: set[Call] = set()
        self.opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs
                     if c.mimeType.lower() == "audio/opus"]

    async def endpoint(self, request: Request) -> Response:
        """``POST /v1/realtime/calls``: the SDP offer in, the SDP answer out."""
        if not origin_allowed(request.scope, self.settings):
            return self._invalid("forbidden_origin", "this origin may not open calls", 403)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/sdp":
            return self._invalid("unsupported_media_type", "send the SDP offer as the body, "
                                 "with Content-Type: application/sdp", 415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_OFFER_BYTES:
                return self._invalid("offer_too_large", f"an SDP offer of more than "
                                     f"{MAX_OFFER_BYTES} bytes", 413)
        try:
            offer = body.decode("utf-8")
        except UnicodeDecodeError:
            return self._invalid("invalid_sdp", "the SDP offer is not UTF-8 text")
        if not offer.startswith("v=0"):
            return self._invalid("invalid_sdp", "the body is not an SDP offer (v=0 …)")
        if "m=audio" not in offer and "m=application" not in offer:
            return self._invalid("invalid_sdp", "the offer has neither audio nor a data "
                                 "channel (m=audio, m=application)")
        if len(self.calls) >= self.settings.webrtc_max_calls:
            return self._invalid("too_many_calls", "the gateway holds as many calls as it "
                                 "may; try again later", retry_after_s=1.0)
        call = self._new_call(request.scope, offer)
        self.calls.add(call)
        CALLS_OPEN.inc()
        try:
            return await self._answer(call, offer)
        except Exception:  # never let one call's surprise escape as a 500 without a word
            log.exception("webrtc: a call failed to start")
            CALLS.labels("failed").inc()
            await self._close(call)
            return refusal("internal", "the call could not be set up", 500)

    def _invalid(self, code: str, message: str, status: int | None = None,
                 retry_after_s: float | None = None) -> Response:
        CALLS.labels("invalid").inc()
        metrics.REJECTED.labels(f"webrtc_{code}").inc()
        log.warning("webrtc: refused a call offer: %s: %s", code, message)
        return refusal(code, message, status, retry_after_s)

    def _new_call(self, scope: dict, offer: str) -> Call:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers(self.settings)))
        track = ReplyTrack()
        call: Call | None = None
        socket = ChannelSocket(session_scope(scope), has_channel="m=application" in offer,
                               on_close=lambda: call.spawn(self._close(call)))
        call = Call(pc=pc, socket=socket, track=track,
                    rt=WebRTCRealtimeSocket(socket, self.settings,
                                            track if "m=audio" in offer else None))

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if socket.channel is None:
                socket.attach(channel)

        @pc.on("track")
        def on_track(remote: Any) -> None:
            if remote.kind == "audio":
                for transceiver in pc.getTransceivers():
                    if transceiver.receiver.track is remote:
                        hand_on_at_once(transceiver.receiver)
                call.spawn(MicPump(remote, NATIVE_SR, call.mic).run())

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                socket.disconnect(1006 if pc.connectionState == "failed" else 1000)

        return call

    async def _answer(self, call: Call, offer: str) -> Response:
        pc = call.pc
        try:
            if call.rt.track is not None:  # the offer's audio lands on this transceiver:
                # its codecs are the offer's and these, Opus (none in common: refused)
                pc.addTransceiver(call.track, direction="sendrecv").setCodecPreferences(
                    self.opus)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # malformed SDP, no Opus, no common transport
            await self._close(call)
            return self._invalid("invalid_sdp", f"the offer cannot be answered: "
                                 f"{type(e).__name__}: {str(e)[:160]}")
        call.session = asyncio.create_task(self._run(call))
        done, _ = await asyncio.wait({call.rt.outcome, call.session}, timeout=OPEN_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if call.rt.outcome not in done:
            CALLS.labels("failed").inc()
            await self._close(call)
            return refusal("unavailable", "the session did not open in time", 503, 1.0)
        error = call.rt.outcome.result()
        if error is not None:  # refused by the session (counted and logged there)
            CALLS.labels("refused").inc()
            return refusal(error.get("code", "error"), error.get("message", ""),
                           retry_after_s=error.get("retry_after_s"))
        call.id = "rtc_" + call.rt.sid
        call.spawn(self._connect_watch(call))
        CALLS.labels("answered").inc()
        log.info("webrtc call answered", extra={"sid": call.rt.sid})
        return Response(pc.localDescription.sdp, status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v1/realtime/calls/{call.id}",
                                 "Cache-Control": "no-store"})

    async def _run(self, call: Call) -> None:
        try:
            await self.start_session(call.rt)
        finally:
            await self._close(call)

    async def _connect_watch(self, call: Call) -> None:
        """A peer that never connects (its offer's candidates unreachable) ends the call."""
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if call.pc.connectionState != "connected":
            log.warning("webrtc: the peer did not connect within %.0f s: call ended",
                        CONNECT_TIMEOUT_S, extra={"sid": call.rt.sid})
            metrics.REJECTED.labels("webrtc_not_connected").inc()
            call.socket.disconnect(1006)

    async def _close(self, call: Call) -> None:
        if call.closed:
            return
        call.closed = True
        call.socket.disconnect(1000)  # the session ends too, if it still runs
        call.track.stop()
        for task in list(call.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await asyncio.wait_for(call.pc.close(), 5)
        except Exception as e:
            log.warning("webrtc: closing a peer connection failed: %s", e)
        self.calls.discard(call)
        CALLS_OPEN.dec()

    async def close_all(self) -> None:
        for call in list(self.calls):
            await self._close(call)
