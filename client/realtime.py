"""A client of the gateway's OpenAI Realtime endpoint (``/v1/realtime``) with the same
interface as the native ``Connection``: ``recv`` yields the native protocol's events
(``speech_started``, ``transcript``, ``reply_text``, ``audio_start``, reply audio bytes,
``reply_done``, ``interrupt``), so ``talk()``, the ``Tracker`` and ``s2s bench`` measure
both protocols the same way (``s2s bench --protocol realtime``).

Realtime events carry no turn numbers: each ``speech_started`` (or typed request) opens
the next turn here, and a response belongs to the newest turn when it is created."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np

from .errors import ProtocolError, auth_headers
from .url import gateway_url

RATE = 24000  # audio/pcm in the Realtime API


class RealtimeConnection:
    def __init__(self, ws: Any, session: dict, sample_rate: int):
        self.ws = ws
        self.session_id = str(session.get("id", "")).removeprefix("sess_")
        self.sample_rate = sample_rate          # what the caller sends; resampled to 24 kHz
        self.output_sample_rate = RATE
        self.turn = 0
        self.item_turn: dict[str, int] = {}     # user item id -> turn
        self.item_span: dict[str, list] = {}    # user item id -> [start_s, end_s]
        self.response_turn: dict[str, int] = {}
        self.pieces: dict[str, int] = {}        # response id -> reply text pieces so far
        self.audio_started: set[str] = set()
        self.replying: str | None = None        # response in progress
        self.pending: list[dict] = []
        self.close_code: int | None = None  # once closed: the code (1006: no close frame)
        self._resampler = None

    @classmethod
    async def open(cls, url: str, sample_rate: int = 16000, out_rate: int | None = None,
                   session_id: str | None = None, timeout: float = 10.0,
                   api_key: str | None = None) -> "RealtimeConnection":
        """``url``: the gateway's page, ``/ws`` or ``/v1/realtime`` URL (any form
        :func:`s2s.client.url.gateway_url` takes).  ``api_key``: as for
        ``Connection.open`` (default: the ``#key=`` of ``url``, else env S2S_API_KEY)."""
        import websockets

        if session_id:
            raise ProtocolError("the Realtime API has no session resume")
        target = gateway_url(url, "realtime")
        api_key = api_key if api_key is not None else target.key
        ws = await websockets.connect(target.url, max_size=1 << 24, open_timeout=timeout,
                                      additional_headers=auth_headers(api_key),
                                      compression=None)
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        except Exception as e:
            await ws.close()
            raise ProtocolError(f"no session.created from the gateway: {e}") from None
        if first.get("type") != "session.created":
            await ws.close()
            raise ProtocolError(f"session refused: {first}")
        return cls(ws, first["session"], sample_rate)

    async def send_audio(self, pcm: bytes | np.ndarray) -> None:
        samples = np.frombuffer(pcm, "<i2") if isinstance(pcm, (bytes, bytearray)) else pcm
        if self.sample_rate != RATE:
            if self._resampler is None:
                from s2s.audio import StreamResampler

                self._resampler = StreamResampler(self.sample_rate, RATE, dtype="int16")
            samples = self._resampler(np.asarray(samples, np.int16))
        data = np.asarray(samples, "<i2").tobytes()
        if data:
            await self.send_json({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(data).decode()})

    async def send_json(self, obj: dict) -> None:
        await self.ws.send(json.dumps(obj))

    async def recv(self) -> dict | bytes | None:
        while not self.pending:
            try:
                raw = await self.ws.recv()
            except Exception:
                self.close_code = getattr(self.ws, "close_code", None) or 1006
                return None
            self.pending.extend(self._translate(json.loads(raw)))
        return self.pending.pop(0)

    async def close(self, bye: bool = True) -> None:
        try:
            await self.ws.close()
        except Exception:
            pass

    def _translate(self, ev: dict) -> list:
        kind = ev.get("type")
        if kind == "input_audio_buffer.speech_started":
            out = []
            if self.replying is not None:
                out.append({"type": "interrupt", "turn": self.turn + 1})
            self.turn += 1
            self.item_turn[ev["item_id"]] = self.turn
            self.item_span[ev["item_id"]] = [ev.get("audio_start_ms", 0) / 1000, None]
            return out + [{"type": "speech_started", "turn": self.turn,
                           "at_s": ev.get("audio_start_ms", 0) / 1000}]
        if kind == "input_audio_buffer.speech_stopped":
            self.item_span.setdefault(ev["item_id"], [None, None])[1] = \
                ev.get("audio_end_ms", 0) / 1000
        elif kind == "conversation.item.input_audio_transcription.completed":
            item = ev["item_id"]
            if item not in self.item_turn:
                self.turn += 1
                self.item_turn[item] = self.turn
            start, end = self.item_span.get(item, [None, None])
            return [{"type": "transcript", "turn": self.item_turn[item],
                     "text": ev.get("transcript", ""), "start_s": start, "end_s": end}]
        elif kind == "response.created":
            rid = ev["response"]["id"]
            self.response_turn[rid] = self.turn
            self.replying = rid
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            rid = ev["response_id"]
            seq = self.pieces[rid] = self.pieces.get(rid, -1) + 1
            return [{"type": "reply_text", "turn": self.response_turn.get(rid, self.turn),
                     "seq": seq, "text": ev.get("delta", ""), "final": False}]
        elif kind == "response.output_audio.delta":
            rid = ev["response_id"]
            out: list = []
            if rid not in self.audio_started:
                self.audio_started.add(rid)
                out.append({"type": "audio_start", "turn": self.response_turn.get(rid, self.turn),
                            "sample_rate": RATE, "voice_to_voice_ms": None})
            return out + [base64.b64decode(ev.get("delta", ""))]
        elif kind == "response.done":
            rid = ev["response"]["id"]
            if self.replying == rid:
                self.replying = None
            if ev["response"].get("status") == "completed":
                return [{"type": "reply_done", "turn": self.response_turn.get(rid, self.turn)}]
        elif kind == "error":
            err = ev.get("error") or {}
            return [{"type": "error", "code": err.get("code"), "message": err.get("message")}]
        return []
