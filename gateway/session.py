"""One client WebSocket session (the protocol is in docs/protocol.md).

The receive loop validates the client's messages (hello, audio, bye) and XADDs
``Audio`` frames; one reader task per session XREADs the session's output stream
``s2s:out:{sid}`` and sends what ``Playback`` decides.  Every client mistake ends
in an ``error`` event (and, when fatal or repeated, a clean close); nothing a
client sends can raise out of here or touch another session.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError
from starlette.websockets import WebSocket

from s2s import metrics
from s2s.bus import REDIS_DOWN, Bus, entry_order
from s2s.config import Settings
from s2s.frames import (SAMPLE_RATES, SID_PATTERN, Audio, FrameError, SessionConfig, SessionEnd,
                        SessionOpen, Transcript, decode, encode)

from .auth import ANONYMOUS, AuthError, Authenticator, Principal, ticket_key
from .failover import REDIS_REFUSED, RESTORED, redis_error_kind
from .playback import Playback

if TYPE_CHECKING:
    from .admission import Admission

log = logging.getLogger("s2s.gateway")

SID_RE = re.compile(SID_PATTERN)
DEFAULT_OUT_SR = 22050      # the default voice's own rate
HELLO_TIMEOUT_S = 10.0
STRIKES = 10                # rejected messages within STRIKE_WINDOW_S that end a session
STRIKE_WINDOW_S = 10.0
RATE_WINDOW_S = 2.0         # max_audio_rate is averaged over this long
RESUME_WAIT_S = 5.0         # how long a resume waits for the old VAD owner to let go
MAX_TEXT_CHARS = 4000       # typed user input, instructions
VAD_LIMITS = {"threshold": (0.05, 0.95), "min_silence_ms": (100, 5000),
              "speech_pad_ms": (0, 2000)}
REPLAY_SCAN = 500           # output entries a resume looks back for the current turn

# close codes
NORMAL, UNSUPPORTED, POLICY, INTERNAL, TRY_LATER = 1000, 1003, 1008, 1011, 1013


class Reject(Exception):
    """A client message refused; ``close`` is the close code when it ends the session."""

    def __init__(self, code: str, message: str, close: int | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.close = code, message, close
        self.extra = extra or {}  # more fields of the error event (retry_after_s)


class ClientSession:
    def __init__(self, ws: WebSocket, bus: Bus, settings: Settings,
                 sessions: dict[str, "ClientSession"], auth: Authenticator | None = None,
                 admission: "Admission | None" = None):
        self.ws = ws
        self.auth = auth or Authenticator(settings)
        self.admission = admission
        self.principal: Principal = ANONYMOUS
        self.last_audio = time.monotonic()  # for the idle timeout
        self.bus = bus
        self.settings = settings
        self.sessions = sessions          # this gateway's open sessions, by sid
        self.sid = ""
        self.in_sr = 16000
        self.out_sr = DEFAULT_OUT_SR
        self.opened = False               # ready sent, counted in ACTIVE_SESSIONS
        self.replaced = False             # a newer connection resumed this sid
        self.closed = False
        self.task: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.strikes: collections.deque[float] = collections.deque()
        self.tokens = settings.max_audio_rate * RATE_WINDOW_S  # seconds of audio allowed now
        self.tokens_at = time.monotonic()
        self.last_unavailable = 0.0
        # failover (gateway/failover.py): this gateway's Failover, when run by the app
        app = ws.scope.get("app") if isinstance(getattr(ws, "scope", None), dict) else None
        self.failover = getattr(getattr(app, "state", None), "failover", None)
        self.cells = getattr(getattr(app, "state", None), "cells", None)  # s2s/cells.py
        self.open_id: bytes | None = None   # the session's entry in s2s:vad:sessions
        self.probe: tuple[bytes, float] | None = None  # (audio id, when) not yet seen read
        self.turn_start: bytes | None = None  # output entry that opened the current turn
        self.hello: dict = {}

    # --- life cycle ----------------------------------------------------------------------
    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            _, _, subprotocol = self.auth.credentials(self.ws.scope)
            await self.ws.accept(subprotocol=subprotocol)
            await self._hello()
            await self._receive_loop()
        except Reject as r:
            await self._reject(r)
        except asyncio.CancelledError:
            if not self.replaced:
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
        if self.opened:
            metrics.ACTIVE_SESSIONS.dec()
            if not self.replaced:  # auth: no longer counted against capacity and limits
                await _quietly(self.bus.unregister_session(self.sid, self.principal.id))
            if self.replaced:
                await self._close(NORMAL, "replaced by a newer connection")
                if self.failover is not None and self.sessions.get(self.sid) is None:
                    try:  # taken over by another gateway: no longer one of ours
                        await self.bus.drop_gateway_session(self.failover.id, self.sid)
                    except Exception:
                        pass
            else:
                try:
                    await asyncio.wait_for(self._end_session(), 3)
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
        if self.cells is not None:
            cell = self.cells.of(key)
            self.bus, self.failover = cell.bus, cell.failover

    # --- failover (driven by gateway/failover.py) ------------------------------------------
    def turn_floor(self) -> int:
        """The highest turn this connection has seen: Redis's counter must not be below it."""
        playback = getattr(self, "playback", None)
        return playback.turn if playback is not None else 0

    def redis_lost(self) -> None:
        """Redis restarted empty: an audio probe from before is void (its VAD position
        went too); judge the VAD owner by audio written from now on, which a surviving
        owner reads (and records) within the stale time."""
        self.probe = None

    def let_go(self) -> None:
        """Another gateway owns the session now: close this connection, end nothing."""
        self.replaced = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def check_vad(self) -> None:
        """Audio written ``gateway_vad_stale_s`` ago and still unread by a VAD owner: if
        the session's entry in s2s:vad:sessions was lost (Redis restarted empty) or
        released, open the session again.  A pending or queued entry means a VAD worker
        has it or will (a dead owner's entry is claimed by the runtime), so nothing is
        done: opening twice would give the session two owners."""
        if self.probe is None or self.closed:
            return
        audio_id, written = self.probe
        if time.monotonic() - written < self.settings.gateway_vad_stale_s:
            return
        pos = await self.bus.vad_position(self.sid)
        if pos is not None and entry_order(pos) >= entry_order(audio_id):
            self.probe = None
            return
        state = await self.bus.session_entry_state(self.open_id) if self.open_id else "gone"
        if state in ("owned", "queued"):
            self.probe = None  # look again at the next unread audio
            return
        turn = self.turn_floor()
        ids = await self.bus.emit(SessionOpen(sid=self.sid, turn=turn, in_sr=self.in_sr,
                                              out_sr=self.out_sr))
        self.open_id = await self.bus.own_session(self.sid, self.failover.id, ids[0]) \
            if self.failover else ids[0]
        self.probe = None
        RESTORED.labels("vad").inc()
        log.warning("session had no VAD owner (its entry was %s): opened again", state,
                    extra={"sid": self.sid, "turn": turn})

    # --- sending -------------------------------------------------------------------------
    async def send(self, message: Any) -> None:
        if self.closed:
            return
        try:
            async with self.send_lock:
                if isinstance(message, bytes):
                    await self.ws.send_bytes(message)
                else:
                    await self.ws.send_text(json.dumps(message))
        except Exception:  # the client is gone; the receive loop notices
            self.closed = True

    async def _close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self.send_lock:
                await self.ws.close(code=code, reason=reason[:120])
        except Exception:
            pass

    async def _reject(self, r: Reject) -> None:
        metrics.REJECTED.labels(r.code).inc()
        log.warning("rejected client input: %s: %s", r.code, r.message,
                    extra={"sid": self.sid or "-", "close": r.close})
        await self.send({"type": "error", "code": r.code, "message": r.message,
                         **r.extra})
        if r.close is not None:
            await self._close(r.close, r.code)
            return
        now = time.monotonic()
        self.strikes.append(now)
        while self.strikes and self.strikes[0] < now - STRIKE_WINDOW_S:
            self.strikes.popleft()
        if len(self.strikes) >= STRIKES:
            raise Reject("abuse", f"{STRIKES} rejected messages in {STRIKE_WINDOW_S:.0f} s: "
                                  "closing", POLICY)

    # --- receiving -----------------------------------------------------------------------
    async def _receive(self, timeout: float | None = None) -> dict | None:
        """The next message, or None when the client is gone."""
        if self.closed:
            return None
        try:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
        except asyncio.TimeoutError:
            raise Reject("hello_timeout", f"no hello within {timeout:.0f} s", POLICY) from None
        except Exception:  # e.g. receive after a disconnect
            return None
        if msg["type"] == "websocket.disconnect":
            self.closed = True
            return None
        return msg

    def _parse_text(self, text: str) -> dict:
        if len(text.encode("utf-8", "replace")) > self.settings.max_message_bytes:
            raise Reject("message_too_large", "text message over the size limit", POLICY)
        try:
            obj = json.loads(text)
        except Exception:
            raise Reject("bad_json", "text messages must be JSON objects", UNSUPPORTED) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise Reject("bad_message", 'a JSON object with a string "type" was expected', POLICY)
        return obj

    async def _hello(self) -> None:
        msg = await self._receive(HELLO_TIMEOUT_S)
        if msg is None:
            return
        if msg.get("text") is None:
            raise Reject("audio_before_hello", 'the first message must be a text '
                         '{"type": "hello", ...}', UNSUPPORTED)
        hello = self._parse_text(msg["text"])
        if hello["type"] != "hello":
            raise Reject("bad_hello", 'the first message must be {"type": "hello", ...}', POLICY)
        self.principal = await self._authenticate(hello)
        self.hello = hello  # failover: "audio_marks" and a resume's "heard" (in _open)
        self.in_sr = _rate(hello, "sample_rate", 16000)
        self.out_sr = _rate(hello, "output_sample_rate", DEFAULT_OUT_SR)
        requested = hello.get("session_id")
        if requested is not None and (not isinstance(requested, str) or
                                      not SID_RE.match(requested)):
            raise Reject("bad_hello", "session_id must match [A-Za-z0-9_.-]{1,64}", POLICY)
        if len(self.sessions) >= self.settings.max_sessions and requested not in self.sessions:
            raise Reject("too_many_sessions", "the gateway is full; try again later", TRY_LATER)
        try:
            if requested is not None:
                self._use_cell(requested)
                owner = await self.bus.session_principal(requested)
                if owner is None or not secrets.compare_digest(owner, self.principal.id):
                    # unknown, expired, client-made or another principal's: one answer for all,
                    # so ids cannot be probed
                    raise Reject("unknown_session", "no session with this id for these "
                                 "credentials; omit session_id to open a new one", POLICY)
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

    async def _authenticate(self, hello: dict) -> Principal:
        """The header/subprotocol credential, else a ticket or token in the hello."""
        cred, ticket, _ = self.auth.credentials(self.ws.scope)
        try:
            if not self.auth.enabled:
                return ANONYMOUS
            if cred:
                return self.auth.check(cred)
            if ticket is None and isinstance(hello.get("ticket"), str):
                ticket = hello["ticket"]
            if ticket:
                self._use_cell(ticket)
                raw = await self.bus.take_ticket(ticket_key(ticket[:200]))
                if raw is None:
                    raise AuthError("unknown, used or expired ticket")
                return Principal.from_json(raw)
            if isinstance(hello.get("token"), str):
                return self.auth.check(hello["token"])
            raise AuthError("no credential: send Authorization: Bearer KEY, a ticket or a token")
        except AuthError as e:
            raise Reject("unauthorized", str(e), POLICY) from None
        except REDIS_DOWN as e:  # a ticket lives in Redis
            log.warning("Redis unavailable at authentication: %s", e)
            raise Reject("unavailable", "the service is unavailable; try again later",
                         TRY_LATER) from None

    async def _admit(self) -> str:
        """A new server-made session id (128 random bits), admitted and bound to the
        principal; Reject when admission control refuses it."""
        sid = secrets.token_urlsafe(16)
        if self.cells is not None and self.admission is not None:
            sid = self.cells.name(await self.admission.place(), sid)
            self._use_cell(sid)
        if self.admission is not None:
            refusal = await self.admission.admit(self.principal, sid)
            if refusal is not None:
                extra = {"retry_after_s": refusal.retry_after_s} \
                    if refusal.retry_after_s is not None else {}
                raise Reject(refusal.code, refusal.message,
                             TRY_LATER if refusal.code == "busy" else POLICY, extra)
        if not await self.bus.claim_session(sid, self.principal.id):
            raise Reject("internal", "session id collision", INTERNAL)  # 2^-128: never
        return sid

    async def end_for(self, code: str, message: str) -> None:
        """Close the session from outside (idle, expired token, over its bytes): an error
        event with the reason, then close; the session ends (its VAD slot is freed)."""
        log.info("closing session: %s", code, extra={"sid": self.sid})
        metrics.REJECTED.labels(code).inc()
        await self.send({"type": "error", "code": code, "message": message})
        await self._close(POLICY, code)

    async def _open(self, requested: str | None) -> None:
        self.sid = requested or await self._admit()
        new_owner = True
        if requested:
            old = self.sessions.get(self.sid)
            if old is not None and old.task is not None:  # same client, new connection
                old.replaced = True
                old.task.cancel()
                await asyncio.wait({old.task}, timeout=3)
            new_owner = await self._needs_vad_owner()
        turn = await self.bus.current_turn(self.sid)
        start = await self._replay_from(turn)
        self.playback = Playback(turn, marks=self.hello.get("audio_marks") is True)
        if requested:
            self.playback.resume(self.hello.get("heard"))
        self.sessions[self.sid] = self
        self.opened = True
        metrics.SESSIONS_TOTAL.inc()
        metrics.ACTIVE_SESSIONS.inc()
        opened = None
        if new_owner:
            opened = (await self.bus.emit(SessionOpen(sid=self.sid, turn=turn, in_sr=self.in_sr,
                                                      out_sr=self.out_sr)))[0]
        await self._own(opened)
        self.reader = asyncio.create_task(self._read_out(start))
        log.info("session open", extra={"sid": self.sid, "in_sr": self.in_sr,
                                        "out_sr": self.out_sr, "resumed": bool(requested),
                                        "new_vad_owner": new_owner})
        await self.send({"type": "ready", "session_id": self.sid, "sample_rate": self.in_sr,
                         "output_sample_rate": self.out_sr, "turn": turn})

    async def _own(self, opened: bytes | None) -> None:
        """Record this gateway as the session's owner (a resume takes it over)."""
        if self.failover is not None:
            self.open_id = await self.bus.own_session(self.sid, self.failover.id, opened)
        else:
            self.open_id = opened

    async def _replay_from(self, turn: int) -> bytes:
        """Where to start reading the output stream: after the last frame of an older
        turn, so a resumed session gets the current turn (a reply in flight) again from
        its start and nothing older."""
        entries = await self.bus.out_tail(self.sid, REPLAY_SCAN)
        for entry_id, data in entries:
            try:
                if decode(data).turn < turn:
                    return entry_id
            except FrameError:
                continue
        if len(entries) < REPLAY_SCAN:
            return b"0-0"  # the whole stream is of the current turn
        return entries[-1][0]

    async def _needs_vad_owner(self) -> bool:
        """Resume rule: audio stream absent -> open it; its last entry a SessionEnd (the
        session was closed) -> wait until the old VAD owner has read it, then open anew;
        otherwise a VAD owner still reads it (the old gateway died): no second open."""
        last = await self.bus.last_audio(self.sid)
        if not last:
            return True
        end_id, data = last
        try:
            ended = isinstance(decode(data), SessionEnd)
        except FrameError:
            ended = False
        if not ended:
            return False
        deadline = time.monotonic() + RESUME_WAIT_S
        while time.monotonic() < deadline:
            pos = await self.bus.vad_position(self.sid)
            if pos is not None and entry_order(pos) >= entry_order(end_id):
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("old VAD owner did not release the session in time",
                        extra={"sid": self.sid})
            await self.bus.force_vad_release(self.sid, end_id)
        return True

    async def _receive_loop(self) -> None:
        while not self.closed:
            msg = await self._receive()
            if msg is None:
                return
            try:
                if msg.get("bytes") is not None:
                    await self._audio(msg["bytes"])
                elif msg.get("text") is not None:
                    obj = self._parse_text(msg["text"])
                    kind = obj["type"]
                    if kind == "bye":
                        await self._close(NORMAL, "bye")
                        return
                    if kind == "ping":
                        await self.send({"type": "pong", "t": obj.get("t")})
                    elif kind == "text":
                        await self._typed_text(obj)
                    elif kind == "cancel":
                        await self._cancel()
                    elif kind == "configure":
                        await self._configure(obj)
                    elif kind == "truncate":
                        await self._truncate(obj)
                    elif kind == "hello":
                        raise Reject("already_open", "hello was already received")
                    else:
                        raise Reject("unknown_type", f"unknown message type {kind[:40]!r}")
            except Reject as r:
                await self._reject(r)

    async def _typed_text(self, obj: dict) -> None:
        """Typed user input: a turn of its own, answered like a transcript."""
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Reject("bad_text", '"text" must be a non-empty string')
        if len(text) > MAX_TEXT_CHARS:
            raise Reject("message_too_large", f"text over {MAX_TEXT_CHARS} characters")
        turn = await self.bus.advance_turn(self.sid)
        await self.bus.emit(Transcript(sid=self.sid, turn=turn, text=text.strip(),
                                       out_sr=self.out_sr, marks={"speech_end": time.time()}))

    async def _cancel(self) -> None:
        """Stop the reply in progress: a new turn supersedes it (every stage drops its
        work of the old turn) and the client is told to flush its playback."""
        turn = await self.bus.advance_turn(self.sid)
        for message in self.playback.supersede(turn):
            await self.send(message)

    async def _configure(self, obj: dict) -> None:
        """Per-session settings: ``instructions`` (the system prompt of this session's
        replies) and ``vad`` (turn detection; applied in order with the audio)."""
        instructions, vad = obj.get("instructions"), obj.get("vad")
        if instructions is not None:
            if not isinstance(instructions, str) or len(instructions) > MAX_TEXT_CHARS:
                raise Reject("bad_configure", f'"instructions" must be a string of at most '
                             f"{MAX_TEXT_CHARS} characters")
            await self.bus.set_prefs(self.sid, instructions=instructions)
        if vad is not None:
            if not isinstance(vad, dict) or not vad or any(
                    k not in VAD_LIMITS or isinstance(v, bool) or not isinstance(v, (int, float))
                    or not VAD_LIMITS[k][0] <= v <= VAD_LIMITS[k][1] for k, v in vad.items()):
                raise Reject("bad_configure", '"vad" takes ' + ", ".join(
                    f"{k} in [{lo}, {hi}]" for k, (lo, hi) in VAD_LIMITS.items()))
            await self.bus.emit(SessionConfig(sid=self.sid, vad={k: float(v)
                                                                 for k, v in vad.items()}))

    async def _truncate(self, obj: dict) -> None:
        """What the user heard of a reply (the client stopped playing it early): the
        conversation history keeps only that."""
        turn, text = obj.get("turn"), obj.get("text")
        if isinstance(turn, bool) or not isinstance(turn, int) or \
                not 0 < turn <= self.playback.turn or \
                not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            raise Reject("bad_truncate", '"turn" (a turn of this session that had a reply) '
                         'and "text" (what was heard of it) are required')
        await self.bus.set_prefs(self.sid, **{f"heard:{turn}": text})

    async def _audio(self, pcm: bytes) -> None:
        if not pcm:
            return
        if len(pcm) > self.settings.max_message_bytes:
            raise Reject("message_too_large", f"audio message of {len(pcm)} bytes is over the "
                         f"{self.settings.max_message_bytes}-byte limit")
        if len(pcm) % 2:
            raise Reject("odd_length", "audio must be 16-bit samples (an even byte count)",
                         UNSUPPORTED)
        seconds = len(pcm) / 2 / self.in_sr
        now = time.monotonic()
        rate = self.settings.max_audio_rate
        self.tokens = min(rate * RATE_WINDOW_S, self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now
        if seconds > self.tokens:
            raise Reject("rate_limited", f"more than {rate:g} s of audio per second: "
                         "message dropped")
        self.tokens -= seconds
        self.last_audio = now
        try:
            allowed = self.admission is None or await self.admission.audio_allowed(
                self.principal, seconds)
        except REDIS_DOWN:
            allowed = True  # the write below reports the outage
        if not allowed:
            raise Reject("audio_limit", "this key or token sent its audio seconds for this "
                         "minute: message dropped")
        try:
            ids = await self.bus.emit(Audio(sid=self.sid, pcm=pcm, sr=self.in_sr,
                                            marks={"recv": time.time()}))
            if self.probe is None and ids:
                self.probe = (ids[0], now)
        except REDIS_DOWN as e:
            self.probe = None
            if now - self.last_unavailable > 2:
                self.last_unavailable = now
                log.warning("Redis unavailable: audio dropped (%s)", e, extra={"sid": self.sid})
                await self.send({"type": "error", "code": "unavailable",
                                 "message": "the service is unavailable: audio dropped"})
        except ResponseError as e:  # OOM, READONLY...: the session stays, this audio is lost
            kind = redis_error_kind(e) or "other"
            REDIS_REFUSED.labels(kind).inc()
            if now - self.last_unavailable > 2:
                self.last_unavailable = now
                log.warning("Redis refused audio (%s): %s", kind, e, extra={"sid": self.sid})
                await self.send({"type": "error", "code": "busy",
                                 "message": f"the service is busy ({kind}): audio dropped"})

    # --- the output stream -------------------------------------------------------------------
    async def _read_out(self, last: bytes) -> None:
        backoff = 0.1
        while not self.closed:
            try:
                entries = await self.bus.read_out(self.sid, last, 200, 1000)
                backoff = 0.1
            except REDIS_DOWN + (ResponseError,) as e:
                kind = redis_error_kind(e)
                if kind:
                    REDIS_REFUSED.labels(kind).inc()
                metrics.REDIS_ERRORS.labels("gateway").inc()
                log.warning("Redis unavailable (%s); retrying", e, extra={"sid": self.sid})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)  # short: a restarted Redis is noticed at once
                continue
            except Exception:  # a surprise must not leave the session mute for good
                log.exception("reading the output stream failed; retrying",
                              extra={"sid": self.sid})
                await asyncio.sleep(1.0)
                continue
            turn = self.playback.turn
            for entry_id, data in entries:
                last = entry_id
                try:
                    frame = decode(data, self.settings.max_frame_bytes)
                    if frame.sid != self.sid:
                        raise FrameError(f"frame of session {frame.sid!r}", "wrong_session")
                except FrameError as e:
                    metrics.BAD_FRAMES.labels("gateway", e.reason).inc()
                    log.warning("skipped a bad output frame: %s", e, extra={"sid": self.sid})
                    continue
                if frame.turn > self.playback.turn:
                    self.turn_start = entry_id
                for message in self.playback.feed(frame):
                    await self.send(message)
            if self.playback.turn > turn and self.turn_start is not None:
                await self._trim_played()
            for message in self.playback.check_gaps():
                await self.send(message)

    async def _trim_played(self) -> None:
        """Older turns are played (or superseded): drop them from the output stream.  A
        resume replays the current turn from its first entry, which stays."""
        try:
            await self.bus.trim_out(self.sid, self.turn_start)
        except REDIS_DOWN + (ResponseError,) as e:  # the next turn trims again
            log.debug("output trim failed: %s", e, extra={"sid": self.sid})


def _rate(hello: dict, field: str, default: int) -> int:
    value = hello.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value not in SAMPLE_RATES:
        raise Reject("bad_hello", f"{field} must be one of {list(SAMPLE_RATES)}", POLICY)
    return value


async def _quietly(coro) -> None:
    try:
        await asyncio.wait_for(coro, 2)
    except (Exception, asyncio.TimeoutError):
        pass
