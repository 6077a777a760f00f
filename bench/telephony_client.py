"""A caller as Twilio Media Streams makes one, for tests and benches: it connects to the
stream URL (signing the upgrade as Twilio does when given the auth token), sends
``connected`` and ``start`` (``streamSid``, ``callSid``, ``accountSid``, ``tracks``,
``mediaFormat`` audio/x-mulaw 8000 Hz mono, ``customParameters``), then the caller's
audio as ``media`` messages of 20 ms of μ-law (``track``, ``chunk``, ``timestamp``,
``sequenceNumber``) paced in real time, and ``stop``.  What comes back is played as
Twilio plays it: reply ``media`` is queued and played in real time; a ``mark`` is sent
back once what was queued before it has played; ``clear`` drops what is queued and sends
every pending mark back at once.

    call = await TwilioCall.open("ws://127.0.0.1:8000/telephony/twilio", api_key=KEY)
    await call.speak(pcm_16k)          # real time, 20 ms a message
    ...; await call.hang_up()
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s2s.audio import resample
from s2s.gateway import g711
from s2s.gateway.telephony.twilio import signature

RATE = 8000
FRAME = RATE * 20 // 1000      # samples in one 20 ms media message


def to_phone(pcm16k: np.ndarray) -> bytes:
    """16 kHz int16 speech -> what a phone network carries: 8 kHz μ-law (band-limited by
    the resampler's anti-aliasing filter)."""
    x = resample(np.asarray(pcm16k, np.float32) / 32768, 16000, RATE)
    pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2").tobytes()
    return g711.encode(pcm, "ulaw")


def from_phone(ulaw: bytes) -> np.ndarray:
    """8 kHz μ-law -> int16 PCM at 8 kHz."""
    return np.frombuffer(g711.decode(ulaw, "ulaw"), "<i2")


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class Heard:
    """What the caller got: reply audio (μ-law, as played), and when things arrived."""
    media: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, μ-law)
    clears: list[float] = field(default_factory=list)
    marks_sent_back: list[tuple[float, str]] = field(default_factory=list)
    marks_flushed: list[str] = field(default_factory=list)   # returned by a clear, unplayed
    played_s: float = 0.0

    @property
    def first_media_at(self) -> float | None:
        return self.media[0][0] if self.media else None

    def media_after(self, t: float) -> float | None:
        return next((at for at, _ in self.media if at >= t), None)

    def audio_s(self) -> float:
        return sum(len(m) for _, m in self.media) / RATE


class TwilioCall:
    def __init__(self, ws: Any, stream_sid: str, call_sid: str, account_sid: str):
        self.ws = ws
        self.stream_sid, self.call_sid, self.account_sid = stream_sid, call_sid, account_sid
        self.seq = 0
        self.chunk = 0
        self.t0 = time.monotonic()
        self.heard = Heard()
        self.close_code: int | None = None
        self.close_reason = ""
        self._play_end = 0.0                       # monotonic time the queued audio ends
        self._marks: list[tuple[float, str]] = []  # (due, name): played when due
        self._reader = asyncio.create_task(self._read())
        self._marker = asyncio.create_task(self._return_marks())
        self.closed = asyncio.Event()
        self.sent: list[tuple[float, float]] = []  # (audio position s, wall time.time())
        self.violations: list[str] = []            # what Twilio would refuse

    @classmethod
    async def open(cls, url: str, *, api_key: str | None = None, auth_token: str | None = None,
                   signed_url: str | None = None, account_sid: str | None = None,
                   call_sid: str | None = None, parameters: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> "TwilioCall":
        """``auth_token``: sign the upgrade (X-Twilio-Signature over ``signed_url``, by
        default ``url``); ``api_key``: send it as the ``token`` parameter, as a TwiML
        ``<Parameter>`` would; ``headers``: exactly these upgrade headers besides."""
        import websockets

        hdrs = dict(headers or {})
        if auth_token:
            hdrs["X-Twilio-Signature"] = signature(auth_token, signed_url or url)
        params = dict(parameters or {})
        if api_key:
            params["token"] = api_key
        ws = await websockets.connect(url, additional_headers=hdrs, compression=None,
                                      max_size=1 << 22)
        call = cls(ws, _sid("MZ"), call_sid or _sid("CA"), account_sid or _sid("AC"))
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await call._send("start", start={
            "accountSid": call.account_sid, "streamSid": call.stream_sid,
            "callSid": call.call_sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            "customParameters": params})
        return call

    async def _send(self, event: str, **fields: Any) -> None:
        self.seq += 1
        await self.ws.send(json.dumps({"event": event, "sequenceNumber": str(self.seq),
                                       **fields, "streamSid": self.stream_sid}))

    async def media(self, ulaw: bytes) -> None:
        """One inbound media message (Twilio sends 20 ms each)."""
        self.chunk += 1
        ts = int((time.monotonic() - self.t0) * 1000)
        await self._send("media", media={"track": "inbound", "chunk": str(self.chunk),
                                         "timestamp": str(ts),
                                         "payload": base64.b64encode(ulaw).decode()})

    async def speak(self, ulaw: bytes, position_s: float = 0.0) -> float:
        """Send μ-law audio in 20 ms messages paced in real time; returns the audio
        position after it.  ``self.sent`` records when each position was sent."""
        start = time.monotonic()
        for i in range(0, len(ulaw), FRAME):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.closed.is_set():
                break
            await self.media(ulaw[i:i + FRAME])
            position_s += len(ulaw[i:i + FRAME]) / RATE
            self.sent.append((position_s, time.time()))
        return position_s

    async def silence(self, seconds: float, position_s: float = 0.0) -> float:
        return await self.speak(g711.encode(bytes(int(seconds * RATE) * 2), "ulaw"),
                                position_s)

    def sent_at(self, position_s: float) -> float | None:
        """Wall time the message holding audio position ``position_s`` was sent."""
        return next((at for pos, at in self.sent if pos >= position_s - 1e-6), None)

    async def hang_up(self) -> None:
        if not self.closed.is_set():
            try:
                await self._send("stop", stop={"accountSid": self.account_sid,
                                               "callSid": self.call_sid})
                await asyncio.wait_for(self.closed.wait(), 5)
            except Exception:
                pass
        await self.close()

    async def close(self) -> None:
        self._marker.cancel()
        try:
            await self.ws.close()
        except Exception:
            pass
        try:
            await asyncio.wait_for(self._reader, 5)
        except (asyncio.TimeoutError, Exception):
            self._reader.cancel()

    # --- what Twilio does with what the server sends -------------------------------------------
    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                now, wall = time.monotonic(), time.time()
                if not isinstance(raw, str):
                    self.violations.append("a binary message: Twilio takes JSON text only "
                                           "(error 31950)")
                    continue
                msg = json.loads(raw)
                kind = msg.get("event")
                if msg.get("streamSid") != self.stream_sid:
                    self.violations.append(f"{kind} without this stream's streamSid")
                if kind == "media":
                    ulaw = base64.b64decode(msg["media"]["payload"], validate=True)
                    self.heard.media.append((wall, ulaw))
                    self._play_end = max(self._play_end, now) + len(ulaw) / RATE
                elif kind == "mark":
                    self._marks.append((max(self._play_end, now), msg["mark"]["name"]))
                elif kind == "clear":
                    self.heard.clears.append(wall)
                    self._play_end = now
                    pending, self._marks = self._marks, []
                    for _, name in pending:
                        self.heard.marks_flushed.append(name)
                        await self._send("mark", mark={"name": name})
                else:
                    self.violations.append(f"{kind!r}: Twilio takes media, mark and clear "
                                           "only (error 31924)")
        except Exception as e:  # the connection closed (its code is read below)
            if not hasattr(e, "rcvd"):
                self.violations.append(f"reading failed: {type(e).__name__}: {e}")
        finally:
            self.close_code = self.ws.close_code or 1006
            self.close_reason = self.ws.close_reason or ""
            self.closed.set()

    async def _return_marks(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            while self._marks and self._marks[0][0] <= now:
                _, name = self._marks.pop(0)
                self.heard.marks_sent_back.append((time.time(), name))
                try:
                    await self._send("mark", mark={"name": name})
                except Exception:
                    return
