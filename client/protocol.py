"""Asyncio client of the gateway's WebSocket protocol (docs/protocol.md).

Talk to a running stack from recorded speech in one call::

    import asyncio, numpy as np
    from s2s.client import talk

    result = asyncio.run(talk("ws://127.0.0.1:8000/ws", pcm_int16_16k, 16000))  # key: $S2S_API_KEY
    # or the URL `s2s up` printed, key included: talk("http://127.0.0.1:8000/#key=…", …)
    print(result.transcript, result.reply, result.voice_to_voice_ms)
    # result.audio: reply PCM int16 at result.sample_rate; result.turns: per-turn details

``talk`` streams the audio in 20 ms frames paced in real time (``realtime=False``:
3x, below the gateway's default rate limit), then silence until every turn the user
started has been answered (or ``reply_timeout_s`` passed), and measures latencies
itself: voice-to-voice = arrival of a turn's first reply audio byte - the wall time
at which the client had sent the audio up to the end of that speech (``end_s`` of
the transcript).  ``Connection`` is the low-level session (hello, audio, events) for
live use (``s2s talk --mic``) and scripted tests.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ProtocolError, auth_headers
from .realtime import RealtimeConnection
from .url import gateway_url
from .webrtc import WebRTCConnection

__all__ = ["FRAME_MS", "Connection", "ProtocolError", "TalkResult", "Tracker", "TurnResult",
           "auth_headers", "talk"]

FRAME_MS = 20


# --- results ---------------------------------------------------------------------------------
@dataclass
class TurnResult:
    turn: int
    transcript: str = ""
    start_s: float | None = None          # session audio position of the speech
    end_s: float | None = None
    reply: str = ""
    voice_to_voice_ms: float | None = None     # measured by this client
    first_transcript_ms: float | None = None
    first_reply_text_ms: float | None = None
    server_voice_to_voice_ms: float | None = None  # the gateway's own measure (audio_start)
    first_audio_at: float | None = None   # wall clock (time.time) of the first reply audio byte
    interrupted: bool = False             # the user spoke over this reply (barge-in)
    superseded: bool = False              # a newer turn started before any reply
    done: bool = False                    # reply_done received
    sample_rate: int = 0
    audio: bytes = b""
    chunks: list = field(default_factory=list)  # (seq, chunk, last) of each audio piece heard

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "audio"}
        d["audio_s"] = round(len(self.audio) / 2 / self.sample_rate, 3) if self.sample_rate else 0
        return d


@dataclass
class TalkResult:
    session_id: str = ""
    transcript: str = ""       # all transcripts joined (speculative parts re-heard dropped)
    reply: str = ""            # replies of the turns answered to the end, joined
    turns: list[TurnResult] = field(default_factory=list)
    voice_to_voice_ms: float | None = None  # of the first turn that got reply audio
    audio: bytes = b""         # all reply audio, int16 LE mono at sample_rate
    sample_rate: int = 0
    events: list[dict] = field(default_factory=list)  # JSON events, with "t" (s since start)
    errors: list[dict] = field(default_factory=list)
    timed_out: bool = False
    resumes: int = 0           # connections lost and resumed (same session id)
    marks_at: list = field(default_factory=list)  # per talk(marks=...): wall clock of its frame

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "transcript": self.transcript,
                "reply": self.reply, "voice_to_voice_ms": self.voice_to_voice_ms,
                "turns": [t.to_dict() for t in self.turns], "sample_rate": self.sample_rate,
                "audio_s": round(len(self.audio) / 2 / self.sample_rate, 3)
                if self.sample_rate else 0, "errors": self.errors, "timed_out": self.timed_out,
                "resumes": self.resumes, "marks_at": self.marks_at}


# --- the low-level session -------------------------------------------------------------------
class Connection:
    """One WebSocket session: ``await Connection.open(url)``, ``send_audio``,
    ``recv`` (a dict for JSON events, bytes for reply audio, None once closed)."""

    def __init__(self, ws: Any, ready: dict):
        self.ws = ws
        self.ready = ready
        self.close_code: int | None = None  # once closed: the code (1006: no close frame)
        self.session_id: str = ready["session_id"]
        self.sample_rate: int = ready["sample_rate"]
        self.output_sample_rate: int = ready["output_sample_rate"]
        self.api_key: str | None = None  # what open() authenticated with (None: $S2S_API_KEY)

    @classmethod
    async def open(cls, url: str, sample_rate: int = 16000, out_rate: int | None = None,
                   session_id: str | None = None, timeout: float = 10.0,
                   api_key: str | None = None, extra: dict | None = None) -> "Connection":
        """``url``: any form :func:`s2s.client.url.gateway_url` takes, the page URL of
        ``s2s up`` included.  ``api_key``: an API key or signed token (default: the
        ``#key=`` of ``url``, else env S2S_API_KEY), sent as ``Authorization: Bearer``,
        never in the URL.  ``extra``: more hello fields (``audio_marks``, a resume's
        ``heard``)."""
        import websockets

        target = gateway_url(url, "native")
        api_key = api_key if api_key is not None else target.key
        ws = await websockets.connect(target.url, max_size=1 << 24, open_timeout=timeout,
                                      ping_interval=20, ping_timeout=20, compression=None,
                                      additional_headers=auth_headers(api_key))
        hello: dict[str, Any] = {"type": "hello", "sample_rate": sample_rate}
        if out_rate:
            hello["output_sample_rate"] = out_rate
        if session_id:
            hello["session_id"] = session_id
        hello.update(extra or {})
        await ws.send(json.dumps(hello))
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout)
        except Exception as e:
            await ws.close()
            raise ProtocolError(f"no ready from the gateway: {e}") from None
        ready = json.loads(raw) if isinstance(raw, str) else {}
        if ready.get("type") != "ready":
            await ws.close()
            raise ProtocolError(f"session refused: {ready}",
                                ready if ready.get("type") == "error" else None)
        conn = cls(ws, ready)
        conn.api_key = api_key  # a reconnect (resume) must present the same principal
        return conn

    async def send_audio(self, pcm: bytes | np.ndarray) -> None:
        if isinstance(pcm, np.ndarray):
            pcm = pcm.astype("<i2", copy=False).tobytes()
        await self.ws.send(pcm)

    async def send_json(self, obj: dict) -> None:
        await self.ws.send(json.dumps(obj))

    async def recv(self) -> dict | bytes | None:
        try:
            msg = await self.ws.recv()
        except Exception as e:  # closed (normally or not)
            rcvd = getattr(e, "rcvd", None)
            self.close_code = rcvd.code if rcvd is not None else 1006
            return None
        return json.loads(msg) if isinstance(msg, str) else msg

    async def close(self, bye: bool = True) -> None:
        try:
            if bye:
                await self.send_json({"type": "bye"})
            await self.ws.close()
        except Exception:
            pass

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# --- the one-call conversation -----------------------------------------------------------------
class Tracker:
    """Turn-by-turn bookkeeping of the events of one session, and the client-side
    latencies: ``sent(pos_s)`` records when audio up to ``pos_s`` had been sent."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.turns: dict[int, TurnResult] = {}
        self.events: list[dict] = []
        self.errors: list[dict] = []
        self.audio_turn: int | None = None
        self.text_seqs: dict[int, set[int]] = {}   # reply_text seqs seen, per turn
        self.audio_next: dict[int, tuple[int, int]] = {}  # next (seq, chunk), per turn
        self.sent_pos: list[float] = []
        self.sent_wall: list[float] = []

    def sent(self, pos_s: float, wall: float | None = None) -> None:
        self.sent_pos.append(pos_s)
        self.sent_wall.append(time.time() if wall is None else wall)

    def wall_at(self, pos_s: float | None) -> float | None:
        """Wall time at which the audio up to session position pos_s had been sent."""
        if pos_s is None or not self.sent_pos:
            return None
        i = bisect.bisect_left(self.sent_pos, pos_s - 1e-6)
        return self.sent_wall[min(i, len(self.sent_wall) - 1)]

    def sent_at(self, pos_s: float) -> float | None:
        """Wall time at which the frame holding the sample that ends at session position
        ``pos_s`` was sent; None when the audio never got that far."""
        if not self.sent_pos or pos_s > self.sent_pos[-1] + 1e-6:
            return None
        return self.wall_at(pos_s)

    def _ms(self, turn: TurnResult, now: float) -> float | None:
        end = self.wall_at(turn.end_s)
        return round((now - end) * 1000, 1) if end is not None else None

    def turn(self, n: int) -> TurnResult:
        if n not in self.turns:
            self.turns[n] = TurnResult(turn=n)
            for old in self.turns.values():
                if old.turn < n and not old.done and not old.interrupted and not old.reply:
                    old.superseded = True
        return self.turns[n]

    def handle(self, msg: dict | bytes, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if isinstance(msg, (bytes, bytearray)):
            if self.audio_turn is None:
                return
            t = self.turns[self.audio_turn]
            if not t.audio and t.voice_to_voice_ms is None:
                t.voice_to_voice_ms = self._ms(t, now)
            if t.first_audio_at is None:
                t.first_audio_at = now
            t.audio += bytes(msg)
            return
        kind, n = msg.get("type"), msg.get("turn")
        if kind == "audio_chunk":  # (seq, chunk) of the binary message that follows
            if isinstance(n, int):
                seq, chunk = msg.get("seq", 0), msg.get("chunk", 0)
                self.turn(n).chunks.append((seq, chunk, bool(msg.get("last"))))
                self.audio_next[n] = (seq + 1, 0) if msg.get("last") else (seq, chunk + 1)
            return
        msg = dict(msg, t=round(now - self.t0, 3))
        self.events.append(msg)
        if kind == "error":
            self.errors.append(msg)
        if not isinstance(n, int):
            return
        if kind == "speech_started":
            self.turn(n)
        elif kind == "interrupt":
            for old in self.turns.values():
                if old.turn < n and (old.reply or old.audio) and not old.interrupted:
                    old.interrupted = True
            self.turn(n)
        elif kind == "transcript":
            t = self.turn(n)
            t.transcript, t.start_s, t.end_s = msg.get("text", ""), msg.get("start_s"), \
                msg.get("end_s")
            t.first_transcript_ms = self._ms(t, now)
        elif kind == "reply_text":
            seen = self.text_seqs.setdefault(n, set())
            if msg.get("seq") in seen:  # replayed after a resume
                return
            seen.add(msg.get("seq"))
            t = self.turn(n)
            if t.first_reply_text_ms is None:
                t.first_reply_text_ms = self._ms(t, now)
            text = (msg.get("text") or "").strip()
            t.reply = f"{t.reply} {text}".strip() if text else t.reply
        elif kind == "audio_start":
            t = self.turn(n)
            t.sample_rate = msg.get("sample_rate") or t.sample_rate
            t.server_voice_to_voice_ms = msg.get("voice_to_voice_ms")
            self.audio_turn = n
        elif kind == "reply_done":
            self.turn(n).done = True

    def heard(self) -> dict:
        """What of the newest turn this client already got (a resume's hello ``heard``,
        so the gateway does not send it again)."""
        if not self.turns:
            return {}
        n = max(self.turns)
        t, seqs = self.turns[n], self.text_seqs.get(n, set())
        text_next = 0
        while text_next in seqs:
            text_next += 1
        return {"turn": n, "transcript": bool(t.transcript), "text_next": text_next,
                "audio_next": list(self.audio_next.get(n, (0, 0))),
                "sample_rate": t.sample_rate}

    def outstanding(self) -> list[TurnResult]:
        """Turns the user started that are neither answered nor given up."""
        out = []
        for t in self.turns.values():
            if t.done or t.interrupted or t.superseded:
                continue
            if t.end_s is not None and not t.transcript.strip():
                continue  # heard nothing: no reply will come
            out.append(t)
        return out

    def result(self, session_id: str = "") -> TalkResult:
        turns = [self.turns[n] for n in sorted(self.turns)]
        heard: list[TurnResult] = []
        for t in turns:
            if not t.transcript.strip():
                continue
            # a speculative early utterance re-heard by a later turn: keep the later one
            while heard and t.start_s is not None and heard[-1].end_s is not None and \
                    t.start_s < heard[-1].end_s - 0.05:
                heard.pop()
            heard.append(t)
        done = [t.reply for t in turns if t.done and t.reply]
        rates = [t.sample_rate for t in turns if t.audio]
        first = next((t for t in turns if t.audio), None)
        return TalkResult(
            session_id=session_id, transcript=" ".join(t.transcript.strip() for t in heard),
            reply=" ".join(done) if done else " ".join(t.reply for t in turns if t.reply),
            turns=turns, voice_to_voice_ms=first.voice_to_voice_ms if first else None,
            audio=b"".join(t.audio for t in turns), sample_rate=rates[0] if rates else 0,
            events=self.events, errors=self.errors)


async def talk(url: str | list[str], pcm: np.ndarray | bytes, sample_rate: int = 16000, *,
               out_rate: int | None = None, realtime: bool = True, speed: float | None = None,
               tail_silence_s: float = 3.0, reply_timeout_s: float = 30.0,
               session_id: str | None = None, resume_timeout_s: float = 20.0,
               protocol: str = "native", marks: Sequence[float] = (),
               on_event: Callable[[dict | bytes], None] | None = None,
               api_key: str | None = None) -> TalkResult:
    """Send ``pcm`` (int16 mono at ``sample_rate``) as one session and collect the answer.

    After the audio, silence is sent until at least ``tail_silence_s`` passed and every
    turn is answered, or ``reply_timeout_s`` passed (``timed_out`` is then set).
    ``speed``: seconds of audio sent per wall second (default 1 when ``realtime``,
    else 3).  ``on_event`` sees every message as it arrives.  ``protocol="realtime"``
    talks to the OpenAI Realtime endpoint (``/v1/realtime`` of the same gateway)
    instead, with the same measures (no resume there: the Realtime API has none);
    ``protocol="webrtc"`` makes a Realtime WebRTC call (``POST /v1/realtime/calls``).

    ``url``: the page URL ``s2s up`` prints (its ``#key=`` is the credential unless
    ``api_key`` is given) or a WebSocket URL (:func:`s2s.client.url.gateway_url`); or a
    list of them.  A connection lost mid-session (gateway
    killed, restarted, network) is resumed with the same session id on the next URL
    (round robin, for up to ``resume_timeout_s``; 0: never), telling the gateway what
    of the current turn was already heard so nothing is heard twice; the audio not
    yet sent waits meanwhile (it is delayed, not dropped).

    ``marks``: positions (s) in ``pcm``, e.g. where its speech is known to end; the result's
    ``marks_at`` holds, for each, the wall clock (``time.time``) at which the 20 ms frame
    holding the sample that ends there was sent (None if never sent), to compare with a
    turn's ``first_audio_at``."""
    urls = [url] if isinstance(url, str) else list(url)
    samples = np.frombuffer(pcm, np.int16) if isinstance(pcm, (bytes, bytearray)) else \
        np.asarray(pcm).astype(np.int16, copy=False)
    speed = speed or (1.0 if realtime else 3.0)
    step = sample_rate * FRAME_MS // 1000
    silence = np.zeros(step, np.int16).tobytes()
    if protocol == "realtime":
        conn: Any = await RealtimeConnection.open(urls[0], sample_rate, out_rate, session_id,
                                                  api_key=api_key)
        resume_timeout_s = 0.0
    elif protocol == "webrtc":  # a Realtime WebRTC call (client/webrtc.py): no resume either
        conn = await WebRTCConnection.open(urls[0], sample_rate, out_rate, session_id,
                                           api_key=api_key)
        resume_timeout_s = 0.0
    else:
        conn = await Connection.open(urls[0], sample_rate, out_rate, session_id,
                                     api_key=api_key, extra={"audio_marks": True})
    tracker = Tracker()
    finished = asyncio.Event()
    connected = asyncio.Event()
    connected.set()
    timed_out = False
    sending_done = False
    resumes = 0

    async def reconnect() -> Connection | None:
        deadline = time.monotonic() + resume_timeout_s
        i = 0
        while time.monotonic() < deadline:
            i += 1
            try:
                return await Connection.open(
                    urls[i % len(urls)], sample_rate, out_rate, conn.session_id,
                    timeout=min(5.0, max(0.5, deadline - time.monotonic())),
                    api_key=api_key, extra={"audio_marks": True, "heard": tracker.heard()})
            except Exception:  # refused, not listening yet, timed out: try the next one
                await asyncio.sleep(0.25)
        return None

    async def receive() -> None:
        nonlocal conn, resumes
        while True:
            msg = await conn.recv()
            if msg is None:
                lost = conn.close_code not in (1000, 1003, 1008) or not sending_done
                if sending_done or resume_timeout_s <= 0 or not lost or \
                        conn.close_code in (1003, 1008):
                    finished.set()
                    return
                connected.clear()
                new = await reconnect()
                if new is None:
                    finished.set()
                    return
                conn, resumes = new, resumes + 1
                connected.set()
                continue
            tracker.handle(msg)
            if on_event:
                on_event(msg)

    async def send() -> None:
        nonlocal timed_out
        start = time.monotonic()
        pos = 0  # samples sent
        audio_end: float | None = None
        while not finished.is_set():
            if not connected.is_set():  # resuming: hold the audio, keep the pace after
                paused = time.monotonic()
                waiters = {asyncio.ensure_future(connected.wait()),
                           asyncio.ensure_future(finished.wait())}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                gap = time.monotonic() - paused
                start += gap
                if audio_end is not None:
                    audio_end += gap
                continue
            if pos < len(samples):
                frame = samples[pos:pos + step].tobytes()
            else:
                frame = silence
                if audio_end is None:
                    audio_end = time.monotonic()
                waited = time.monotonic() - audio_end
                if waited >= tail_silence_s and not tracker.outstanding():
                    return
                if waited >= max(tail_silence_s, reply_timeout_s):
                    timed_out = True
                    return
            delay = start + pos / sample_rate / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await conn.send_audio(frame)
            except Exception:  # closed: the receiver resumes (or has the reason)
                await asyncio.sleep(0.02)
                continue
            pos += len(frame) // 2
            tracker.sent(pos / sample_rate)

    receiver = asyncio.create_task(receive())
    try:
        await send()
    finally:
        sending_done = True
        await conn.close()
        try:
            await asyncio.wait_for(receiver, 5)
        except (asyncio.TimeoutError, Exception):
            receiver.cancel()
    result = tracker.result(conn.session_id)
    result.timed_out = timed_out
    result.resumes = resumes
    result.marks_at = [tracker.sent_at(m) for m in marks]
    return result
