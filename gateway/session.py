"""One client session on the native protocol (docs/protocol.md): its life cycle and what
each client message does.

The receive loop takes the client's messages (hello, audio, text, ...) and writes
frames to Redis; an ``OutputPump`` task sends what the session's output stream holds.
The parts live beside this file: the hello and credentials (handshake.py), resuming
(resume.py), message validation (messages.py), rate limits (limits.py), per-principal
slots (slots.py), the output pump (output.py).  The session gets its collaborators from
the app (``GatewayContext``).  Every client mistake ends in an ``error`` event (and, when
fatal or repeated, a clean close); nothing a client sends or fails to read can raise out
of here, hold up another session or touch it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

from redis.exceptions import ResponseError

from s2s import metrics
from s2s.bus import REDIS_DOWN
from s2s.frames import SessionEnd, SessionOpen, encode

from . import messages, resume
from .audio_in import AudioIn
from .auth import ANONYMOUS, Principal
from .commands import Commands
from .context import GatewayContext
from .errors import INTERNAL, NORMAL, NOT_READING, POLICY, TRY_LATER, Reject
from .faults import REDIS_REFUSED, redis_error_kind
from .handshake import DEFAULT_OUT_SR, Handshake, Hello
from .limits import STRIKE_WINDOW_S, STRIKES, Strikes, typed_bucket, within
from .output import OutputPump
from .playback import Playback

log = logging.getLogger("s2s.gateway")

HELLO_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0       # a client that takes no data for this long is not reading
CLOSE_TIMEOUT_S = 2.0
END_TIMEOUT_S = 3.0


class ClientSession:
    def __init__(self, ws: Any, ctx: GatewayContext, limit_typed: bool = True):
        """``limit_typed``: False when the transport charges typed input to its own
        bucket (the Realtime translation, where one turn takes several client events)."""
        self.ws = ws
        self.ctx = ctx
        self.settings = ctx.settings
        self.sessions = ctx.sessions              # this gateway's open sessions, by sid
        self.bus, self.failover = ctx.bus, ctx.failover
        self.principal: Principal = ANONYMOUS
        self.hello: Hello | None = None
        self.sid = ""
        self.in_sr = 16000
        self.out_sr = DEFAULT_OUT_SR
        self.opened = False                       # ready sent, counted in ACTIVE_SESSIONS
        self.replaced = False                     # a newer connection resumed this sid
        self.closed = False                       # the client is gone, or is being closed
        self.close_sent = False
        self.dropped = False                      # its client stopped reading: given up
        self.ending: tuple[str, str] | None = None  # (code, message) of end_for
        self.task: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.playback: Playback | None = None
        self.send_lock = asyncio.Lock()
        self.strikes = Strikes()
        self.typed = typed_bucket(self.settings) if limit_typed else None
        self.commands: Commands | None = None    # once open
        self.audio = AudioIn(self.settings, ctx.admission, self.send)

    @property
    def last_audio(self) -> float:
        """When the client last sent audio (monotonic): admission's idle timeout."""
        return self.audio.last_audio

    # --- life cycle ----------------------------------------------------------------------
    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            _, _, subprotocol = self.ctx.auth.credentials(self.ws.scope)
            await self.ws.accept(subprotocol=subprotocol)
            await self._hello()
            await self._receive_loop()
        except Reject as r:
            await self._reject(r)
        except asyncio.CancelledError:
            if self.ending is not None:
                code, message = self.ending
                await self._say_and_close({"type": "error", "code": code, "message": message},
                                          POLICY, code)
            elif not (self.replaced or self.dropped):
                raise
        except Exception:  # never let one session's surprise escape
            log.exception("session failed", extra={"sid": self.sid})
            await self._close(INTERNAL, "internal error")
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self.reader:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self._release()
        if self.opened:
            metrics.ACTIVE_SESSIONS.dec()
            if self.replaced:
                await self._close(NORMAL, "replaced by a newer connection")
                if self.sessions.get(self.sid) is None:  # taken over by another gateway
                    self.ctx.slots.forget(self.sid)      # (its slot is counted there now)
                if self.failover is not None and self.sessions.get(self.sid) is None:
                    try:  # no longer one of ours
                        await self.bus.drop_gateway_session(self.failover.id, self.sid)
                    except Exception:
                        pass
            else:
                try:
                    await asyncio.wait_for(self._end_session(), END_TIMEOUT_S)
                except asyncio.CancelledError:  # a resume took over while it ended: fine,
                    if not self.replaced:       # the resume looks at the stream after this
                        raise
                except (Exception, asyncio.TimeoutError) as e:
                    log.warning("could not end the session cleanly: %s", e, extra={"sid": self.sid})
            # Only now: a resume arriving meanwhile finds this connection and waits for it,
            # so it sees the SessionEnd and opens a new VAD owner (before, it could miss it
            # and the SessionEnd written after released the owner of the resumed session).
            if self.sessions.get(self.sid) is self:
                del self.sessions[self.sid]
            log.info("session closed", extra={"sid": self.sid, "replaced": self.replaced})
        await self._close(NORMAL, "bye")

    async def _release(self) -> None:
        """Give the principal's slot back (not when a newer connection carries the session
        on): before the client can see its session end, so it may open another at once."""
        if self.sid and not self.replaced:
            await self.ctx.slots.release(self.sid)

    async def _end_session(self) -> None:
        end = SessionEnd(sid=self.sid, turn=await self.bus.current_turn(self.sid))
        if self.failover is None:  # no failover loop (a bare ClientSession): end it outright
            await self.bus.emit(end)
            await self.bus.close_session(self.sid)
        else:
            if not await self.bus.end_session_if_owner(self.sid, self.failover.id, encode(end)):
                # resumed on another gateway meanwhile: ending it would mute that client
                log.info("session owned by another gateway now: not ended",
                         extra={"sid": self.sid})
            await self.bus.drop_gateway_session(self.failover.id, self.sid)

    def _use_cell(self, key: str) -> None:
        """Talk to the cell a session id (or ticket) names, and to that cell's failover."""
        self.bus, self.failover = self.ctx.cell(key)

    async def end_for(self, code: str, message: str) -> None:
        """Close the session from outside (idle, expired token, over its bytes): an error
        event with the reason, then close; the session ends (its VAD slot is freed).  The
        session's own task does it, so a client that does not read holds up no caller
        (admission's loop serves every session)."""
        if self.closed or self.task is None or self.task.done() or self.ending is not None:
            return
        log.info("closing session: %s", code, extra={"sid": self.sid})
        metrics.REJECTED.labels(code).inc()
        self.ending = (code, message)
        self.task.cancel()

    # --- failover (driven by gateway/failover.py) ------------------------------------------
    def turn_floor(self) -> int:
        """The highest turn this connection has seen: Redis's counter must not be below it."""
        return self.playback.turn if self.playback is not None else 0

    def redis_lost(self) -> None:
        """Redis restarted empty: an audio probe from before is void (its VAD position
        went too); judge the VAD owner by audio written from now on, which a surviving
        owner reads (and records) within the stale time."""
        self.audio.probe = None

    def let_go(self) -> None:
        """Another gateway owns the session now: close this connection, end nothing."""
        self.replaced = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def check_vad(self) -> None:
        """The failover loop's check that a VAD owner reads this session's audio."""
        if self.closed:
            return
        await self.audio.check_vad(
            self.bus, self.sid, SessionOpen(sid=self.sid, turn=self.turn_floor(),
                                            in_sr=self.in_sr, out_sr=self.out_sr),
            self.failover.id if self.failover else None)

    # --- sending -------------------------------------------------------------------------
    async def send(self, message: Any) -> None:
        if self.closed:
            return
        try:
            await within(SEND_TIMEOUT_S, self._send_now(message))
        except asyncio.TimeoutError:
            self._drop()
        except Exception:  # the client is gone; the receive loop notices
            self.closed = True

    async def _send_now(self, message: Any) -> None:
        async with self.send_lock:
            if self.closed:
                return
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_text(json.dumps(message))

    def _drop(self) -> None:
        """The client takes nothing we send (its buffers are full): it is not reading.
        Waiting on it would hold the session's slot and whoever sends to it; the session
        ends without a word (it would not be read) and the connection is left to close."""
        if self.closed:
            return
        metrics.REJECTED.labels("not_reading").inc()
        log.warning("client took no data for %.0f s: session dropped", SEND_TIMEOUT_S,
                    extra={"sid": self.sid or "-"})
        self.closed = self.dropped = True
        if self.task is not None and self.task is not asyncio.current_task() \
                and not self.task.done():
            self.task.cancel()

    async def _close(self, code: int, reason: str) -> None:
        """End the connection, once; also after the client left or was given up, so the
        transport (the Realtime translation's tasks with it) is let go."""
        self.closed = True
        if self.close_sent:
            return
        self.close_sent = True
        await self._release()
        try:
            await within(CLOSE_TIMEOUT_S, self._close_now(code, reason))
        except Exception:
            pass

    async def _close_now(self, code: int, reason: str) -> None:
        async with self.send_lock:
            await self.ws.close(code=code, reason=reason[:120])

    async def _say_and_close(self, event: dict, close: int, reason: str) -> None:
        await self._release()  # first: the client may open another session once it reads this
        await self.send(event)
        await self._close(close, reason)

    async def _reject(self, r: Reject) -> None:
        metrics.REJECTED.labels(r.code).inc()
        log.warning("rejected client input: %s: %s", r.code, r.message,
                    extra={"sid": self.sid or "-", "close": r.close})
        if r.close is not None:
            await self._say_and_close(r.event(), r.close, r.code)
            return
        await self.send(r.event())
        if self.strikes.add():
            raise Reject("abuse", f"{STRIKES} rejected messages in {STRIKE_WINDOW_S:.0f} s: "
                                  "closing", POLICY)

    # --- receiving -----------------------------------------------------------------------
    async def _receive(self, timeout: float | None = None) -> dict | None:
        """The next message, or None when the client is gone."""
        if self.closed:
            return None
        try:
            msg = await within(timeout, self.ws.receive())
        except asyncio.TimeoutError:
            raise Reject("hello_timeout", f"no hello within {timeout:.0f} s", POLICY) from None
        except Exception:  # e.g. receive after a disconnect
            return None
        if msg["type"] == "websocket.disconnect":
            if msg.get(NOT_READING):
                self._drop()
            self.closed = True
            return None
        return msg

    async def _hello(self) -> None:
        msg = await self._receive(HELLO_TIMEOUT_S)
        if msg is None:
            return
        handshake = Handshake(self.ctx.auth, self.ws.scope, lambda key: self.ctx.cell(key)[0],
                              self.settings.max_message_bytes)
        self.hello = hello = await handshake.hello(msg)
        self.principal, self.in_sr, self.out_sr = hello.principal, hello.in_sr, hello.out_sr
        if hello.ticket:
            self._use_cell(hello.ticket)
        requested = hello.requested
        if len(self.sessions) >= self.settings.max_sessions and requested not in self.sessions:
            raise Reject("too_many_sessions", "the gateway is full; try again later", TRY_LATER)
        try:
            if requested is not None:
                self._use_cell(requested)
                await resume.check_owner(self.bus, requested, self.principal.id)
            await self._open(requested)
        except REDIS_DOWN as e:
            log.warning("Redis unavailable at session open: %s", e)
            raise Reject("unavailable", "the service is unavailable; try again later",
                         TRY_LATER) from None
        except ResponseError as e:  # up but refusing (OOM, READONLY, ...): not a crash
            kind = redis_error_kind(e) or "other"
            REDIS_REFUSED.labels(kind).inc()
            log.warning("Redis refused the session open (%s): %s", kind, e)
            raise Reject("busy", f"the service is busy ({kind}); try again later",
                         TRY_LATER) from None

    async def _admit(self) -> str:
        """A new server-made session id (128 random bits), admitted and bound to the
        principal; Reject when admission control refuses it."""
        sid = secrets.token_urlsafe(16)
        admission = self.ctx.admission
        if self.ctx.cells is not None and admission is not None:
            sid = self.ctx.cells.name(await admission.place(), sid)
            self._use_cell(sid)
        refusal = await self.ctx.slots.admit(self.principal, sid, self.bus)
        if refusal is not None:
            extra = {"retry_after_s": refusal.retry_after_s} \
                if refusal.retry_after_s is not None else {}
            raise Reject(refusal.code, refusal.message,
                         TRY_LATER if refusal.code == "busy" else POLICY, extra)
        self.sid = sid  # holds a slot from here: whatever fails next, cleanup gives it back
        if not await self.bus.claim_session(sid, self.principal.id):
            raise Reject("internal", "session id collision", INTERNAL)  # 2^-128: never
        return sid

    async def _open(self, requested: str | None) -> None:
        assert self.hello is not None
        self.sid = requested or await self._admit()
        new_owner = True
        if requested:
            await resume.replace_open(self.sessions.get(self.sid))
            new_owner = await resume.needs_vad_owner(self.bus, self.sid)
            self.ctx.slots.hold(self.sid, self.principal, self.bus)
        turn = await self.bus.current_turn(self.sid)
        start = await resume.replay_from(self.bus, self.sid, turn)
        self.playback = Playback(turn, marks=self.hello.audio_marks)
        if requested:
            self.playback.resume(self.hello.fields.get("heard"))
        self.sessions[self.sid] = self
        self.opened = True
        metrics.SESSIONS_TOTAL.inc()
        metrics.ACTIVE_SESSIONS.inc()
        opened = None
        if new_owner:
            opened = (await self.bus.emit(SessionOpen(sid=self.sid, turn=turn, in_sr=self.in_sr,
                                                      out_sr=self.out_sr)))[0]
        await self._own(opened)
        self.commands = Commands(self.bus, self.sid, self.out_sr, self.playback, self.send,
                                 self.typed, self.settings.max_typed_rate)
        pump = OutputPump(self.bus, self.sid, self.playback, self.settings.max_frame_bytes,
                          self.send, lambda: not self.closed)
        self.reader = asyncio.create_task(pump.run(start))
        log.info("session open", extra={"sid": self.sid, "in_sr": self.in_sr,
                                        "out_sr": self.out_sr, "resumed": bool(requested),
                                        "new_vad_owner": new_owner})
        await self.send({"type": "ready", "session_id": self.sid, "sample_rate": self.in_sr,
                         "output_sample_rate": self.out_sr, "turn": turn})
        if not self.closed:
            self.ctx.slots.settled(self.sid)

    async def _own(self, opened: bytes | None) -> None:
        """Record this gateway as the session's owner (a resume takes it over)."""
        if self.failover is not None:
            self.audio.open_id = await self.bus.own_session(self.sid, self.failover.id, opened)
        else:
            self.audio.open_id = opened

    async def _receive_loop(self) -> None:
        while not self.closed:
            msg = await self._receive()
            if msg is None:
                return
            try:
                if msg.get("bytes") is not None:
                    await self.audio.write(self.bus, self.sid, self.principal, self.in_sr,
                                           msg["bytes"])
                elif msg.get("text") is not None:
                    obj = messages.parse_text(msg["text"], self.settings.max_message_bytes)
                    kind = obj["type"]
                    if kind == "bye":
                        await self._close(NORMAL, "bye")
                        return
                    if kind == "ping":
                        await self.send({"type": "pong", "t": obj.get("t")})
                    elif await self.commands.handle(kind, obj):
                        pass
                    elif kind == "hello":
                        raise Reject("already_open", "hello was already received")
                    else:
                        raise Reject("unknown_type", f"unknown message type {kind[:40]!r}")
            except Reject as r:
                await self._reject(r)
            except REDIS_DOWN + (ResponseError,) as e:  # the message is lost, not the session
                await self._redis_trouble(e)

    async def _redis_trouble(self, e: Exception) -> None:
        kind = redis_error_kind(e)
        if kind:
            REDIS_REFUSED.labels(kind).inc()
        log.warning("Redis trouble: a client message dropped (%s)", e, extra={"sid": self.sid})
        await self.send({"type": "error", "code": "busy" if kind else "unavailable",
                         "message": f"the service is {'busy' if kind else 'unavailable'}: "
                                    "message dropped"})
