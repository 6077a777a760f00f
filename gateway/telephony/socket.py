"""A phone call as a native session: ``TelephonySocket`` stands where a Starlette
WebSocket stands for ``ClientSession`` (as ``RealtimeSocket`` does for the Realtime API),
so a call gets the same authentication, limits, admission, cells, failover and metrics as
a session on ``/ws``.

Towards the session it plays a client that said ``hello`` at the call's rate (8 kHz for
G.711) both ways, with ``audio_marks``; the caller's audio goes in as it comes (20 ms
messages).  Towards the provider it speaks through a ``Serializer``: reply audio with a
mark after each piece (``playout.py`` follows what was played), and a ``clear`` when the
caller speaks over a reply; the history then keeps only what the caller heard (a native
``truncate``).  A call whose connection dropped (a gateway died) and that the provider
connects again (``<Connect action>`` fetching the TwiML again) resumes its session: the
session id waits under the call's id in a one-time resume ticket.

The provider sends in real time whatever the session does, so the caller's audio waits in
one queue: 20 ms messages go in one by one while the session keeps up, and when it falls
behind (a loaded machine) what waits is joined into larger messages, so it catches up.
What waits is bounded (``BEHIND_MAX_S`` of audio); past it, or when the provider keeps
sending malformed messages, the call's connection is closed (1008)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
from typing import Any, Callable

import numpy as np

from s2s import metrics
from s2s.audio import StreamResampler
from s2s.config import Settings

from ..errors import POLICY
from ..limits import Strikes, within
from .auth import CallAuthenticator
from .playout import Playout
from .serializer import BadMessage, Dtmf, Media, MarkPlayed, Serializer, Start, Stop

log = logging.getLogger("s2s.gateway.telephony")

BEHIND_MAX_S = 30.0        # caller audio waiting for the session before the call is dropped
JOIN_MAX_S = 0.5           # waiting audio is joined into messages of at most this long
CLOSE_TIMEOUT_S = 2.0
MARK_EVERY_S = 0.2         # a mark after each 200 ms of reply audio: how far the caller heard
RESUME_TICKET_PREFIX = "call:"


def resume_ticket(provider: str, account: str, call: str) -> str:
    """The key the session id of a call waits under (hashed, as tickets are)."""
    return hashlib.sha256(f"{RESUME_TICKET_PREFIX}{provider}:{account}:{call}".encode()
                          ).hexdigest()


def _disconnect(code: int) -> dict:
    return {"type": "websocket.disconnect", "code": code}


class TelephonySocket:
    """A WebSocket look-alike for ``ClientSession``: provider messages in, native messages
    to the session; native events out, provider messages to the call."""

    def __init__(self, ws: Any, serializer: Serializer, settings: Settings,
                 auth: CallAuthenticator, bus: Any = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self._ws = ws
        self.serializer = serializer
        self.settings = settings
        self.auth = auth
        self.bus = bus                          # the home cell's: resume tickets live there
        self.on_event = on_event
        self.inbox: collections.deque[dict] = collections.deque()
        self.waiting_bytes = 0                  # caller audio in the inbox
        self.arrived = asyncio.Event()
        self.final: dict | None = None
        self.pump: asyncio.Task | None = None
        self.start: Start | None = None
        self.sid = ""
        self.playout = Playout()
        self.strikes = Strikes()
        self.out_rate = serializer.sample_rate
        self.resampler: StreamResampler | None = None

    def __getattr__(self, name: str) -> Any:  # headers, scope, client, url, …
        return getattr(self._ws, name)

    # --- the WebSocket interface ClientSession uses --------------------------------------
    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await self._ws.accept(headers=headers)  # the provider offers no subprotocol
        self.pump = asyncio.create_task(self._pump())

    async def receive(self) -> dict:
        while self.final is None and not self.inbox:
            self.arrived.clear()
            await self.arrived.wait()
        if self.final is not None:
            return self.final
        message = self.inbox.popleft()
        if message.get("bytes") is not None:
            message = {**message, "bytes": bytes(message["bytes"])}
            self.waiting_bytes -= len(message["bytes"])
        return message

    async def send_text(self, text: str) -> None:
        await self._native(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        """Reply audio (PCM16 at the rate of its ``audio_start``): to the call, a mark
        after each ``MARK_EVERY_S`` of it."""
        if self.resampler is not None:
            data = np.asarray(self.resampler(np.frombuffer(data, "<i2")), "<i2").tobytes()
        await self._reply_audio(data)

    async def _reply_audio(self, data: bytes) -> None:
        step = int(MARK_EVERY_S * self.serializer.sample_rate) * 2
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            for message in self.serializer.audio(piece):
                await self._send(message)
            mark = self.playout.sent(len(piece) / 2 / self.serializer.sample_rate)
            if mark is not None:
                await self._send(self.serializer.mark(mark))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        if self.pump and self.pump is not asyncio.current_task():
            self.pump.cancel()
        await self._ws.close(code=code, reason=reason)

    # --- the provider -> the session --------------------------------------------------------
    async def _pump(self) -> None:
        try:
            while True:
                msg = await self._ws.receive()
                if msg["type"] == "websocket.disconnect":
                    self._end(msg)
                    return
                try:
                    events = self.serializer.parse(msg.get("text"), msg.get("bytes"))
                except BadMessage as e:
                    if await self._bad(e):
                        return
                    continue
                for event in events:
                    if not await self._provider(event):
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("telephony: provider message pump failed",
                          extra={"sid": self.sid or "-"})
            self._end(_disconnect(1011), in_order=False)

    async def _bad(self, e: BadMessage) -> bool:
        """Count and log a malformed message; True when there were too many: the call's
        connection is given up (the session ends as when the caller hangs up)."""
        metrics.REJECTED.labels(f"telephony_{e.reason}").inc()
        log.warning("telephony: %s message refused: %s", self.serializer.name, e,
                    extra={"sid": self.sid or "-"})
        if self.strikes.add():
            metrics.REJECTED.labels("abuse").inc()
            await self._give_up("abuse")
            return True
        return False

    async def _give_up(self, reason: str) -> None:
        """Close the call's connection (1008) and end its session, whatever is queued."""
        try:
            await within(CLOSE_TIMEOUT_S, self._ws.close(code=POLICY, reason=reason))
        except Exception:  # gone already: the session ends all the same
            pass
        self._end(_disconnect(POLICY), in_order=False)

    async def _provider(self, event: Any) -> bool:
        """One provider event; False when the stream is over."""
        if isinstance(event, Media):
            if self.start is not None and event.pcm:
                return self._audio_in(event.pcm)
        elif isinstance(event, MarkPlayed):
            self.playout.played(event.name)
        elif isinstance(event, Start):
            return await self._started(event)
        elif isinstance(event, Stop):
            await self._forget_call()
            self._end(_disconnect(1000))
            return False
        elif isinstance(event, Dtmf):
            log.info("telephony: key %s pressed", event.digit, extra={"sid": self.sid or "-"})
        return True

    async def _started(self, start: Start) -> bool:
        """The call's stream starts: who calls is settled, and the session opened (or the
        call's session resumed, when this stream is the call connected again)."""
        self.start = start
        self.auth.establish(start)
        hello: dict = {"type": "hello", "sample_rate": self.serializer.sample_rate,
                       "output_sample_rate": self.serializer.sample_rate, "audio_marks": True}
        resumed = await self._resumable(start)
        if resumed:
            hello["session_id"] = resumed
        return self._to_session({"type": "websocket.receive", "text": json.dumps(hello)})

    async def _resumable(self, start: Start) -> str | None:
        if self.bus is None or not start.call_id or self.auth.principal is None:
            return None
        try:
            sid = await self.bus.take_ticket(self._ticket())
        except Exception as e:  # Redis trouble: a new session (the hello will say more)
            log.warning("telephony: resume lookup failed: %s", e)
            return None
        return sid.decode() if sid else None

    def _ticket(self) -> str:
        start = self.start
        assert start is not None
        return resume_ticket(self.serializer.name, start.account_id, start.call_id)

    def _to_session(self, message: dict) -> bool:
        self.inbox.append(message)
        self.arrived.set()
        return True

    def _audio_in(self, pcm: bytes) -> bool:
        """Queue caller audio, joined to audio already waiting; False when the session
        has fallen too far behind the call: the call is then dropped."""
        rate = self.serializer.sample_rate
        if self.waiting_bytes + len(pcm) > BEHIND_MAX_S * rate * 2:
            metrics.REJECTED.labels("input_overflow").inc()
            log.warning("telephony: more than %.0f s of the caller's audio wait for the "
                        "session: call dropped", BEHIND_MAX_S, extra={"sid": self.sid or "-"})
            self.final = _disconnect(POLICY)
            self.arrived.set()
            asyncio.ensure_future(self._give_up("input_overflow"))
            return False
        last = self.inbox[-1] if self.inbox else None
        join = min(int(JOIN_MAX_S * rate) * 2, self.settings.max_message_bytes // 2 * 2)
        self.waiting_bytes += len(pcm)
        if last is not None and isinstance(last.get("bytes"), bytearray) and \
                len(last["bytes"]) + len(pcm) <= join:
            last["bytes"] += pcm
            return True
        return self._to_session({"type": "websocket.receive", "bytes": bytearray(pcm)})

    def _end(self, message: dict, in_order: bool = True) -> None:
        """The session's last message: after what is queued (the call ended), or before
        it (the connection is given up)."""
        if in_order:
            self._to_session(message)
        else:
            self.final = message
            self.arrived.set()

    # --- the session -> the provider -------------------------------------------------------
    async def _native(self, msg: dict) -> None:
        kind = msg.get("type")
        if self.on_event is not None:
            self.on_event(str(kind), msg)
        if kind == "ready":
            self.sid = msg["session_id"]
            await self._keep_resumable()
        elif kind in ("speech_started", "interrupt"):
            await self._barge_in()
        elif kind == "reply_text":
            self.playout.text(msg["turn"], msg["seq"], msg.get("text") or "")
        elif kind == "audio_chunk":
            self.playout.audio_chunk(msg["turn"], msg["seq"])
        elif kind == "audio_start":
            rate = msg.get("sample_rate") or self.serializer.sample_rate
            self.resampler = None if rate == self.serializer.sample_rate else \
                StreamResampler(rate, self.serializer.sample_rate, dtype="int16")
        elif kind == "reply_done":
            if self.resampler is not None:  # what the resampler's filter still holds
                tail = self.resampler(np.zeros(0, np.int16), last=True)
                self.resampler = None
                await self._reply_audio(np.asarray(tail, "<i2").tobytes())
            mark = self.playout.finished(msg["turn"])
            if mark is not None:
                await self._send(self.serializer.mark(mark))
        elif kind == "error":
            log.info("telephony: session says %s: %s", msg.get("code"), msg.get("message"),
                     extra={"sid": self.sid or "-"})
        # transcript, pong, notice: nothing a phone call carries

    async def _barge_in(self) -> None:
        """The caller spoke over a reply: the provider drops what it has not played, and
        the history keeps what was heard."""
        reply = self.playout.barge_in()
        if reply is None:
            return
        await self._send(self.serializer.clear())
        self._to_session({"type": "websocket.receive", "text": json.dumps(
            {"type": "truncate", "turn": reply.turn, "text": reply.heard_text()})})
        log.info("telephony: barge-in: cleared turn %d after %.2f s of %.2f s heard",
                 reply.turn, reply.played_s, reply.sent_s, extra={"sid": self.sid})

    async def _keep_resumable(self) -> None:
        """The call's session id, for the call's next stream if this connection drops."""
        if self.bus is None or self.start is None or not self.start.call_id:
            return
        try:
            await self.bus.put_ticket(self._ticket(), self.sid, self.settings.session_ttl_s)
        except Exception as e:
            log.warning("telephony: resume ticket not kept: %s", e, extra={"sid": self.sid})

    async def _forget_call(self) -> None:
        """The call ended: its session is not to be resumed."""
        if self.bus is not None and self.start is not None and self.start.call_id:
            try:
                await self.bus.take_ticket(self._ticket())
            except Exception:  # it expires with the session's keys
                pass

    async def _send(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._ws.send_bytes(message)
        else:
            await self._ws.send_text(message)
