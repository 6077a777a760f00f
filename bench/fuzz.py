"""``python -m s2s.bench.fuzz``: hostile inputs into every entry point of a stack.

Targets: the stage streams ``s2s:stt``, ``s2s:llm``, ``s2s:tts``, ``s2s:vad:sessions``
(``stt``, ``llm``, ``tts``, ``vad``), the session audio streams ``s2s:audio:{sid}`` of
live sessions (``audio``), the gateway's WebSocket (``gateway``) and its OpenAI Realtime
endpoint (``realtime``: malformed and unsupported events, bad audio, buffers past their
caps, typed turns past the rate, clients sending faster than they are served).  Inputs: random
bytes, truncated and bit-flipped frames, valid msgpack with wrong types, missing
fields, unknown and wrong kinds, huge fields, wrong sample rates, odd-length PCM,
bad UTF-8, NaN/inf, negative numbers, other schema versions, frames of unknown
sessions and turn numbers from the future (the last two are valid frames: a few of
them, ``--valid``, reach the models).  While it runs, a canary session of the same
entry point must still get its answer.

For each target it prints: inputs sent, the rejections the workers (or the gateway)
counted by reason (deltas of ``s2s_bad_frames_total`` / ``s2s_rejected_inputs_total``
read from their /metrics), the rejections this tool expected by decoding each input
itself, crashes (worker or gateway processes that died, 1011 closes) and whether the
canary was answered.  Without ``--redis-url`` it starts the stack (Redis, one worker
per stage, the gateway); ``--stage llm=pkg.mod:Class`` runs a custom stage instead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis.asyncio as aioredis

from s2s import keys
from s2s.client.protocol import Connection, ProtocolError, auth_headers
from s2s.client.url import GatewayURLError, gateway_url
from s2s.frames import (STAGE_INPUTS, Audio, Frame, FrameError, Notice, ReplyAudio, ReplyText,
                        SessionEnd, SessionOpen, SpeechStarted, Transcript, Utterance, decode,
                        encode)

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "tests" / "data" / "jfk.wav"
TARGETS = ("stt", "llm", "tts", "vad", "audio", "gateway", "realtime")
CLIENT_TARGETS = ("gateway", "realtime")  # WebSocket clients: the gateway counts refusals
FIELD = b"f"
VICTIM_SR = 16000          # the rate the fuzzed sessions of the `audio` target open at
MAX_FRAME_S = 10.0         # the VAD's own limit on one audio frame (services/vad/worker.py)
HUGE_BUDGET = 20           # frames over max_frame_bytes per target (each one is megabytes)
LAG_LIMIT = 2000           # unread entries allowed before injection waits (MAXLEN trims)

# --- hostile inputs (pure functions of a random.Random; tests/test_fuzz.py uses them) -----


def good_frame(target: str, sid: str, rng: random.Random) -> Frame:
    """A valid frame of the kind the target's stream carries."""
    pcm = np.clip(rng.gauss(0, 1) * np.random.default_rng(rng.getrandbits(32)).normal(
        0, 200, rng.randint(1, 1600)), -32768, 32767).astype(np.int16).tobytes()
    if target == "stt":
        return Utterance(sid=sid, pcm=pcm, sr=16000, end_s=len(pcm) / 32000)
    if target == "llm":
        return Transcript(sid=sid, text=rng.choice(["hi", "What is two plus two?", "x" * 50]))
    if target == "tts":
        return ReplyText(sid=sid, text=rng.choice(["Hello.", "Yes", "1 2 3"]), final=True)
    if target == "vad":
        return SessionOpen(sid=sid, in_sr=VICTIM_SR)
    return Audio(sid=sid, pcm=pcm, sr=VICTIM_SR)


OTHER_KINDS = [lambda s: Audio(sid=s, pcm=b"\0\0", sr=16000), lambda s: SessionEnd(sid=s),
               lambda s: SessionOpen(sid=s), lambda s: SpeechStarted(sid=s),
               lambda s: Utterance(sid=s, pcm=b"\0\0", sr=16000),
               lambda s: Transcript(sid=s, text="t"), lambda s: ReplyText(sid=s, text="r"),
               lambda s: ReplyAudio(sid=s, pcm=b"\0\0", sr=22050),
               lambda s: Notice(sid=s, event="error")]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """A msgpack-able value of a random type (nested at most 2 deep)."""
    pick = rng.randrange(9 if depth < 2 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.randint(-2**63, 2**64 - 1)
    if pick == 3:
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, rng.random()])
    if pick == 4:
        return "".join(chr(rng.randint(0, 0xD7FF)) for _ in range(rng.randint(0, 20)))
    if pick == 5:
        return rng.randbytes(rng.randint(0, 40))
    if pick == 6:
        return rng.randint(-5, 5)
    if pick == 7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(rng.random()): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def hostile(target: str, sid: str, rng: random.Random, valid: bool = False,
            huge_ok: bool = False, max_frame_bytes: int = 4 << 20) -> tuple[str, bytes]:
    """One hostile stream entry for ``target``: (category, bytes).  Unless ``valid``, it
    is never a frame the target accepts (a mutation can leave a frame valid: an
    optional field dropped, an unknown one set); with ``valid``, valid frames of
    unknown sessions / turns from the future come too (they reach the model)."""
    for _ in range(20):
        cat, data = _hostile_once(target, sid, rng, valid, huge_ok, max_frame_bytes)
        if valid or expected(target, data, sid, max_frame_bytes) != "ok":
            return cat, data
    return "random_bytes", b"\xc1" + rng.randbytes(8)  # 0xc1: never valid msgpack


def valid_hostile(target: str, sid: str, rng: random.Random) -> tuple[str, bytes]:
    """A valid frame of a session nobody opened, or of a turn from the future."""
    frame = good_frame(target, sid, rng)
    if rng.random() < 0.5:
        return "unknown_session", encode(frame)
    frame.turn = rng.choice([2**53 - 1, 10**9, 1 << 40])
    return "future_turn", encode(frame)


def _hostile_once(target: str, sid: str, rng: random.Random, valid: bool, huge_ok: bool,
                  max_frame_bytes: int) -> tuple[str, bytes]:
    good = good_frame(target, sid, rng)
    raw = msgspec.msgpack.decode(encode(good))
    cats = ["random_bytes", "truncated", "bit_flip", "wrong_type", "missing_field",
            "unknown_kind", "wrong_kind", "huge_field", "bad_rate", "odd_pcm", "bad_utf8",
            "nan_inf", "negative", "bad_version", "not_a_map", "bad_sid", "no_field"]
    if valid:
        cats += ["unknown_session", "future_turn"]
    cat = rng.choice(cats)
    if cat == "random_bytes":
        return cat, rng.randbytes(rng.randint(0, 300))
    if cat == "truncated":
        data = encode(good)
        return cat, data[:rng.randrange(len(data))]
    if cat == "bit_flip":
        data = bytearray(encode(good))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return cat, bytes(data)
    if cat == "no_field":
        return cat, b""  # injected under another field name: the runtime reads b""
    if cat == "not_a_map":
        return cat, msgspec.msgpack.encode(rng.choice([[raw], 7, "audio", None, b"\0"]))
    if cat == "wrong_kind":
        expect = (Audio, SessionEnd) if target == "audio" else STAGE_INPUTS[target]
        kinds = [k for k in OTHER_KINDS if not isinstance(k(sid), expect)]
        return cat, encode(rng.choice(kinds)(sid))
    if cat == "unknown_session":
        return cat, encode(good_frame(target, f"fz-{rng.getrandbits(40):x}", rng))
    if cat == "future_turn":
        good.turn = rng.choice([2**53 - 1, 10**9, 1 << 40])
        return cat, encode(good)
    if cat == "bad_utf8":  # a str of invalid UTF-8 (msgspec will not encode one)
        raw[rng.choice([k for k, v in raw.items() if isinstance(v, str)])] = "\x01ZZZ"
        return cat, msgspec.msgpack.encode(raw).replace(b"\xa4\x01ZZZ", b"\xa4\xff\xc0\x80\xed")
    mutate = {
        "wrong_type": lambda: raw.__setitem__(rng.choice(list(raw)), _random_value(rng)),
        "missing_field": lambda: raw.pop(rng.choice(list(raw))),
        "unknown_kind": lambda: raw.__setitem__("kind", rng.choice(
            ["", "AUDIO", "x" * 300, "utt ", "reply_audio2", 5])),
        "bad_rate": lambda: raw.__setitem__(rng.choice(["sr", "in_sr", "out_sr"]), rng.choice(
            [0, -1, 16001, 96000, 2**40, 7999, 44101, 8000, 48000])),  # the last two: valid
                                                                   # rates, not the session's
        "odd_pcm": lambda: raw.__setitem__("pcm", rng.randbytes(rng.randrange(1, 999, 2))),
        "nan_inf": lambda: raw.__setitem__(rng.choice(["marks", "start_s", "end_s", "at_s"]),
                                           rng.choice([{"t": math.nan}, math.inf, -math.inf,
                                                       math.nan, {"x": 1e300}])),
        "negative": lambda: raw.__setitem__(rng.choice(["turn", "seq", "chunk", "v"]),
                                            rng.choice([-1, -2**63, -7])),
        "bad_version": lambda: raw.__setitem__("v", rng.choice([0, 2, 99, "1", 1.0])),
        "bad_sid": lambda: raw.__setitem__("sid", rng.choice(
            ["", "a b", "x" * 65, "../../etc", "s2s:out:{x}", "\u00e9t\u00e9", "a\nb"])),
        "huge_field": lambda: raw.__setitem__(*rng.choice([
            ("text", "w " * 15000), ("marks", {f"m{i}": 1.0 for i in range(100)}),
            ("message", "m" * 30000), ("language", "l" * 100), ("event", "e" * 100),
            ("sid", "s" * 5000), ("pcm", bytes(max_frame_bytes + 2) if huge_ok else b"")])),
    }
    mutate[cat]()
    return cat, msgspec.msgpack.encode(raw)


def expected(target: str, data: bytes, sid: str, max_frame_bytes: int = 4 << 20) -> str:
    """What a worker should make of an entry: ``ok`` (accepted) or the rejection reason
    it counts (``s2s_bad_frames_total{reason}``), decoded here independently."""
    if target != "audio":
        try:
            decode(data, max_frame_bytes, STAGE_INPUTS[target])
        except FrameError as e:
            return e.reason
        return "ok"
    try:
        frame = decode(data, max_frame_bytes, (Audio, SessionEnd))
    except FrameError as e:
        return e.reason
    if frame.sid != sid:
        return "wrong_session"
    if isinstance(frame, Audio) and (frame.sr != VICTIM_SR or frame.seconds > MAX_FRAME_S):
        return "invalid_audio"  # refused by the VAD stage itself
    return "ok"


def hostile_client(rng: random.Random, max_message_bytes: int = 256 * 1024
                   ) -> list[tuple[str, Any]]:
    """Messages of one hostile WebSocket client: ("text", str), ("bytes", bytes) or
    ("rawtext", bytes): a text frame of the raw bytes (invalid UTF-8)."""
    good_hello = {"type": "hello", "sample_rate": 16000}
    pre = rng.random()
    if pre < 0.35:  # a hostile first message: the gateway closes
        return [rng.choice([
            ("bytes", rng.randbytes(rng.randint(1, 64))), ("text", "not json {"),
            ("text", "[1, 2]"), ("text", '{"type": 5}'), ("text", '{"type": "bye"}'),
            ("text", json.dumps({**good_hello, "sample_rate": rng.choice(
                ["16000", 16001, -1, 1e100, True, [16000], 0])})),
            ("text", '{"type": "hello", "sample_rate": NaN}'),
            ("text", json.dumps({**good_hello, "output_sample_rate": 2**70})),
            ("text", json.dumps({**good_hello, "session_id": rng.choice(
                ["", "a b", "x" * 65, 5, ["x"], "../x", "s2s:out:{x}"])})),
            ("rawtext", b'{"type": "hello\xff\xc0"}'), ("text", "{" * 10000),
            ("text", json.dumps({"type": "hello", "pad": "x" * (max_message_bytes + 1)})),
        ])]
    msgs: list[tuple[str, Any]] = [("text", json.dumps(good_hello))]
    for _ in range(rng.randint(1, 12)):
        msgs.append(rng.choice([
            ("bytes", rng.randbytes(rng.randrange(2, 400, 2))),            # noise: accepted
            ("bytes", rng.randbytes(rng.randrange(1, 400, 2))),            # odd: closes
            ("bytes", bytes(max_message_bytes + 2)),                       # too large
            ("text", json.dumps({"type": "hello"})),                       # already open
            ("text", json.dumps({"type": rng.choice(["audio", "", "x" * 500, "resume"])})),
            ("text", json.dumps({"type": "ping", "t": _random_value(rng)}, default=repr)),
            ("text", json.dumps({"kind": "audio"})), ("text", "[]"), ("text", "nul"),
            ("text", '{"type": "ping", "t": Infinity}'), ("text", '{"type": "ping", "t": 1e999}'),
            ("rawtext", b'{"type": "ping", "t": "\xed\xa0\x80"}'),     # bad UTF-8 text frame
        ]))
    return msgs


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _realtime_event(rng: random.Random, max_message_bytes: int) -> tuple[str, Any]:
    """One hostile (or, now and then, valid) Realtime client event."""
    audio = lambda n: _b64(rng.randbytes(n))  # noqa: E731
    item = lambda content: {"type": "conversation.item.create", "item": {  # noqa: E731
        "type": "message", "role": "user", "content": content}}
    pick = rng.randrange(16)
    if pick == 0:
        return rng.choice([("text", "not json {"), ("text", "[1, 2]"), ("text", '{"type": 5}'),
                           ("text", "[" * 5000), ("bytes", rng.randbytes(rng.randint(1, 64))),
                           ("rawtext", b'{"type": "session.update\xff"}')])
    if pick == 1:
        return "text", json.dumps({"type": rng.choice(
            ["conversation.item.retrieve", "session.create", "", "x" * 300, "response.update"])})
    if pick == 2:
        return "text", json.dumps({"type": "session.update", "session": _random_value(rng)},
                                  default=repr)
    if pick == 3:
        return "text", json.dumps({"type": "session.update", "session": rng.choice([
            {"instructions": "i" * rng.choice([10, 4001])}, {"bogus": 1},
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 7}}}},
            {"audio": {"input": {"turn_detection": None}}}, {"type": "transcription"},
            {"audio": {"input": {"format": {"type": rng.choice(["audio/pcmu", "audio/pcma"])}}}}])})
    if pick in (4, 5):
        return "text", json.dumps({"type": "input_audio_buffer.append", "audio": rng.choice([
            audio(rng.randrange(2, 4000, 2)), audio(rng.randrange(1, 999, 2)), "%%%", 5, None,
            audio(rng.randrange(2, 3 * max_message_bytes, 2))])})
    if pick == 6:
        return "text", json.dumps({"type": rng.choice(["input_audio_buffer.commit",
                                                       "input_audio_buffer.clear"])})
    if pick == 7:
        return "text", json.dumps(item(rng.choice([
            [{"type": "input_text", "text": rng.choice(["hi", "t" * 3000, ""])}],
            [{"type": "input_audio", "audio": audio(rng.randrange(2, 2 * max_message_bytes, 2))}],
            [{"type": "input_audio", "audio": "!!"}], [{"type": "image", "url": "x"}], [7], None])))
    if pick == 8:
        return "text", json.dumps({"type": "conversation.item.create", "item": rng.choice([
            {"type": "function_call"}, {"type": "message", "role": "system", "content": []},
            {"type": "message", "role": "user", "id": "i" * 100,
             "content": [{"type": "input_text", "text": "x"}]}, "item", None])})
    if pick in (9, 10):
        return "text", json.dumps({"type": "response.create", "event_id": f"e{rng.random()}"})
    if pick == 11:
        return "text", json.dumps({"type": rng.choice(["response.cancel",
                                                       "output_audio_buffer.clear"])})
    if pick == 12:
        return "text", json.dumps({"type": "conversation.item.truncate", "item_id":
                                   rng.choice(["x", 5, None]), "audio_end_ms": rng.choice(
                                       [-1, 1.5, "1", 10**12])})
    if pick == 13:
        return "text", json.dumps({"type": "response.create", "response": _random_value(rng)},
                                  default=repr)
    return "text", json.dumps({"type": "input_audio_buffer.append", "audio": audio(3200)})


def hostile_realtime_client(rng: random.Random, max_message_bytes: int = 256 * 1024
                            ) -> list[tuple[str, Any]]:
    """Events of one hostile Realtime client; now and then one that appends far faster
    than real time (the gateway closes it with input_overflow)."""
    if rng.random() < 0.03:  # 2 * max_message_bytes a piece (base64 keeps it under the
        # event limit): 14 pieces are ~150 s at 24 kHz, past the 125 s that may wait
        big = _b64(rng.randbytes(2 * max_message_bytes))
        return [("text", json.dumps({"type": "input_audio_buffer.append", "audio": big}))] * 14
    return [_realtime_event(rng, max_message_bytes) for _ in range(rng.randint(1, 12))]


# --- the run -----------------------------------------------------------------------------
@dataclass
class Result:
    target: str
    sent: int = 0
    expected: collections.Counter = field(default_factory=collections.Counter)
    counted: dict[str, float] = field(default_factory=dict)
    categories: collections.Counter = field(default_factory=collections.Counter)
    crashes: list[str] = field(default_factory=list)
    stage_errors: float = 0.0
    canary: str = "not run"
    canary_ok: bool = False
    seconds: float = 0.0

    def row(self) -> dict:
        return {"target": self.target, "sent": self.sent, "rejected_expected":
                dict(self.expected), "rejected_counted": self.counted,
                "crashes": self.crashes, "stage_errors": self.stage_errors,
                "canary": self.canary, "canary_ok": self.canary_ok,
                "categories": dict(self.categories), "seconds": round(self.seconds, 1)}


def scrape(urls: list[str], metric: str, label: str, where: dict[str, str]) -> dict[str, float]:
    """Sum of a counter over /metrics URLs, by the value of ``label``, for samples whose
    other labels match ``where``."""
    out: dict[str, float] = collections.Counter()
    pat = re.compile(r"^" + re.escape(metric) + r"\{([^}]*)\} (\S+)$")
    for url in urls:
        try:
            text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            m = pat.match(line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if all(labels.get(k) == v for k, v in where.items()) and label in labels:
                out[labels[label]] += float(m.group(2))
    return dict(out)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


class Fuzzer:
    """Drives one target at a time against a running stack (``redis_url``, gateway
    ``ws_url``).  ``alive()`` says which stack processes died (crashes)."""

    def __init__(self, redis_url: str, ws_url: str = "", seed: int = 0, valid: int = 20,
                 max_frame_bytes: int = 4 << 20, max_message_bytes: int = 256 * 1024,
                 canary_timeout: float = 90.0, alive=lambda: [], log=print):
        self.redis = aioredis.from_url(redis_url)
        target = gateway_url(ws_url) if ws_url else None
        self.ws_url = target.url if target else ""
        self.api_key = target.key if target else None  # None: $S2S_API_KEY
        self.rng = random.Random(seed)
        self.valid = valid
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self.canary_timeout = canary_timeout
        self.alive = alive
        self.log = log

    async def close(self) -> None:
        await self.redis.aclose()

    async def worker_urls(self, stage: str) -> list[str]:
        members = await self.redis.zrangebyscore(keys.WORKERS, time.time() - 5, "+inf")
        return [m.decode().split("|", 2)[2] for m in members if m.decode().startswith(stage + "|")]

    async def run(self, target: str, count: int) -> Result:
        res = Result(target)
        t0 = time.monotonic()
        stage = "vad" if target == "audio" else target
        urls = await self.worker_urls(stage) if target not in CLIENT_TARGETS else [
            gateway_url(self.ws_url).http]
        metric, where = (("s2s_rejected_inputs_total", {}) if target in CLIENT_TARGETS else
                         ("s2s_bad_frames_total", {"component": stage}))
        before = scrape(urls, metric, "reason", where)
        items_before = scrape(urls, "s2s_stage_items_total", "outcome", {"stage": stage})
        canary = asyncio.create_task(self._canary(target))
        try:
            if target == "gateway":
                await self._fuzz_gateway(res, count)
            elif target == "realtime":
                await self._fuzz_realtime(res, count)
            elif target == "audio":
                await self._fuzz_audio(res, count)
            else:
                await self._fuzz_stream(res, target, count)
            res.canary_ok, res.canary = await canary
        finally:
            canary.cancel()
        await asyncio.sleep(2.5)  # let the last rejections reach the counters
        res.counted = delta(scrape(urls, metric, "reason", where), before)
        items = delta(scrape(urls, "s2s_stage_items_total", "outcome", {"stage": stage}),
                      items_before)
        # inputs a stage raised on (logged, an error notice sent) rather than refused: the
        # runtime counts refusals as items with outcome "error" too, so subtract them
        if target not in CLIENT_TARGETS + ("vad",):
            res.stage_errors = items.get("error", 0) - sum(res.counted.values())
        res.crashes += self.alive()
        res.seconds = time.monotonic() - t0
        return res

    # --- stage streams ---------------------------------------------------------------------
    async def _wait_lag(self, stream: str, group: str, limit: int, stall_s: float = 300) -> None:
        """Until the group has fewer than ``limit`` entries unread or pending.  A worker
        reads only as many entries as it has free slots, so a few valid inputs on a slow
        model hold the rest back: only no progress at all for ``stall_s`` is an error."""
        last, since = None, time.monotonic()
        while True:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except Exception:
                return
            g = next((g for g in groups if g["name"].decode() == group), None)
            backlog = (g.get("lag") or 0) + (g.get("pending") or 0) if g else 0
            if backlog < limit:
                return
            if backlog != last:
                last, since = backlog, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise TimeoutError(f"{stream}: the {group} workers stopped reading "
                                   f"({backlog} entries waiting)")
            await asyncio.sleep(0.05)

    async def _fuzz_stream(self, res: Result, target: str, count: int) -> None:
        stream = keys.stage_stream(target)
        valid_left, huge_left = self.valid, HUGE_BUDGET
        batch = 200
        opened: list[str] = []
        for start in range(0, count, batch):
            pipe = self.redis.pipeline(transaction=False)
            for _ in range(min(batch, count - start)):
                sid = f"fz-{self.rng.getrandbits(40):x}"
                # valid inputs spread over the run (not all first: they are slow work that
                # every later input, the canary's too, queues behind)
                if valid_left > 0 and self.rng.random() < valid_left / (count - res.sent):
                    cat, data = valid_hostile(target, sid, self.rng)
                else:
                    cat, data = hostile(target, sid, self.rng, huge_ok=huge_left > 0,
                                        max_frame_bytes=self.max_frame_bytes)
                why = expected(target, data, sid, self.max_frame_bytes)
                if why == "ok":
                    valid_left -= 1
                    if target == "vad":  # release the session it opened at once
                        opened.append(decode(data).sid)
                if len(data) > self.max_frame_bytes:
                    huge_left -= 1
                res.categories[cat] += 1
                res.expected[why] += 1
                pipe.xadd(stream, {b"x" if cat == "no_field" else FIELD: data})
                res.sent += 1
            await pipe.execute()
            if opened:
                for s in opened:
                    await self.redis.xadd(keys.audio(s), {FIELD: encode(SessionEnd(sid=s))})
                opened.clear()
            await self._wait_lag(stream, target, LAG_LIMIT)
        await self._wait_lag(stream, target, 1)
        res.expected.pop("ok", None)

    async def _fuzz_audio(self, res: Result, count: int) -> None:
        victims = [f"fz-victim-{self.rng.getrandbits(32):x}-{i}" for i in range(4)]
        for sid in victims:
            await self.redis.xadd(keys.SESSIONS, {FIELD: encode(SessionOpen(sid=sid,
                                                                             in_sr=VICTIM_SR))})
        batch, last = 100, {}
        for start in range(0, count, batch * len(victims)):
            pipe = self.redis.pipeline(transaction=False)
            for sid in victims:
                for _ in range(min(batch, max(0, count - res.sent))):
                    cat, data = hostile("audio", sid, self.rng, valid=True,
                                        huge_ok=False, max_frame_bytes=self.max_frame_bytes)
                    why = expected("audio", data, sid, self.max_frame_bytes)
                    res.categories[cat] += 1
                    res.expected[why] += 1
                    pipe.xadd(keys.audio(sid), {b"x" if cat == "no_field" else FIELD: data})
                    res.sent += 1
            ids = await pipe.execute()
            for sid, eid in zip([s for s in victims for _ in range(batch)], ids):
                last[sid] = eid
            await self._wait_read(last)
        for sid in victims:  # the fuzzed sessions end; their owner must let them go
            await self.redis.xadd(keys.audio(sid), {FIELD: encode(SessionEnd(sid=sid))})
        res.expected.pop("ok", None)

    async def _wait_read(self, last: dict[str, bytes], timeout: float = 120) -> None:
        """Until the VAD owner of each session has processed its audio up to ``last``."""
        def as_id(b):
            ms, _, seq = (b or b"0-0").decode().partition("-")
            return int(ms), int(seq or 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = await self.redis.mget([keys.vad_pos(s) for s in last])
            if all(as_id(p) >= as_id(last[s]) for s, p in zip(last, pos)):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the VAD owner of the fuzzed sessions stopped reading")

    # --- the gateway -------------------------------------------------------------------------
    async def _fuzz_gateway(self, res: Result, count: int, parallel: int = 8) -> None:
        import websockets

        errors: collections.Counter = collections.Counter()

        async def one_client(msgs: list[tuple[str, Any]]) -> None:
            try:
                async with websockets.connect(self.ws_url, compression=None, max_size=None,
                                              open_timeout=30,
                                              additional_headers=auth_headers(self.api_key)) \
                        as ws:
                    for kind, m in msgs:
                        await ws.send(m, text=True if kind == "rawtext" else None)
                        res.sent += 1
                    await ws.send(json.dumps({"type": "ping", "t": "fuzz-end"}))
                    async with asyncio.timeout(30):
                        async for msg in ws:
                            if isinstance(msg, str):
                                event = json.loads(msg)
                                if event.get("type") == "error":
                                    errors[event.get("code")] += 1
                                if event.get("type") == "pong" and event.get("t") == "fuzz-end":
                                    break
                    await ws.send(json.dumps({"type": "bye"}))
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                res.categories[f"closed_{code}"] += 1
                if code == 1011:
                    res.crashes.append("gateway closed a session with 1011 (internal error)")

        for _ in range(count):  # rounds: each sends at least one message, usually many
            remaining = count - res.sent
            if remaining <= 0:
                break
            clients = []
            while remaining > 0 and len(clients) < parallel:
                msgs = hostile_client(self.rng, self.max_message_bytes)[:remaining]
                remaining -= len(msgs)
                clients.append(msgs)
            await asyncio.gather(*(one_client(m) for m in clients))
        res.expected = errors  # the gateway's own answers: error events by code

    async def _fuzz_realtime(self, res: Result, count: int, parallel: int = 8) -> None:
        """Hostile clients of /v1/realtime, ``parallel`` at a time; each ends with a
        session.update it must get answered (the session survived what it sent)."""
        import websockets

        url = gateway_url(self.ws_url, "realtime").url
        errors: collections.Counter = collections.Counter()
        end = json.dumps({"type": "session.update", "session": {"instructions": "fuzz-end"}})

        def done(event: dict) -> bool:
            if event.get("type") == "error":
                errors[f"realtime_{(event.get('error') or {}).get('code')}"] += 1
            return event.get("type") == "session.updated" and \
                event["session"].get("instructions") == "fuzz-end"

        async def one_client(msgs: list[tuple[str, Any]]) -> None:
            try:
                async with websockets.connect(url, compression=None, max_size=None,
                                              open_timeout=30,
                                              additional_headers=auth_headers(self.api_key)) \
                        as ws:
                    async with asyncio.timeout(30):
                        first = json.loads(await ws.recv())
                        if first.get("type") != "session.created":  # refused at its hello
                            done(first)
                            return
                        for kind, m in msgs:
                            await ws.send(m, text=True if kind == "rawtext" else None)
                            res.sent += 1
                        await ws.send(end)
                        async for msg in ws:
                            if isinstance(msg, str) and done(json.loads(msg)):
                                break
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                res.categories[f"closed_{code}"] += 1
                if code == 1011:
                    res.crashes.append("gateway closed a Realtime session with 1011")
            except TimeoutError:
                res.crashes.append("a Realtime session stopped answering (30 s)")

        while res.sent < count:
            clients, remaining = [], count - res.sent
            while remaining > 0 and len(clients) < parallel:
                msgs = hostile_realtime_client(self.rng, self.max_message_bytes)[:remaining]
                remaining -= len(msgs)
                clients.append(msgs)
            await asyncio.gather(*(one_client(m) for m in clients))
        res.expected = errors  # what the gateway told, as counted: realtime_<code>

    # --- canaries ------------------------------------------------------------------------------
    async def _canary(self, target: str) -> tuple[bool, str]:
        """A good session of the same entry point, started while the fuzz runs."""
        from s2s.audio import read_audio

        await asyncio.sleep(1.0)
        sid = f"canary-{target}-{self.rng.getrandbits(24):x}"
        jfk = read_audio(JFK, 16000)
        speech = np.concatenate([jfk, np.zeros(16000 * 2, np.int16)]).tobytes()
        t0 = time.monotonic()
        if target in CLIENT_TARGETS:
            return await self._canary_client(target, speech)
        want = {"stt": Transcript, "llm": ReplyText, "tts": ReplyAudio,
                "vad": SpeechStarted, "audio": SpeechStarted}[target]
        if target == "stt":
            await self.redis.xadd(keys.STAGE_STREAMS["stt"], {FIELD: encode(Utterance(
                sid=sid, pcm=jfk.tobytes(), sr=16000, end_s=len(jfk) / 16000))})
        elif target == "llm":
            await self.redis.xadd(keys.STAGE_STREAMS["llm"], {FIELD: encode(Transcript(
                sid=sid, text="What is the capital of France?"))})
        elif target == "tts":
            await self.redis.xadd(keys.STAGE_STREAMS["tts"], {FIELD: encode(ReplyText(
                sid=sid, text="Paris is the capital of France.", final=True))})
        else:
            await self.redis.xadd(keys.SESSIONS, {FIELD: encode(SessionOpen(sid=sid))})
            step = 16000 // 10 * 2
            for i in range(0, len(speech), step):  # 100 ms pieces, as a client sends
                await self.redis.xadd(keys.audio(sid), {FIELD: encode(Audio(
                    sid=sid, pcm=speech[i:i + step], sr=16000))})
        deadline = time.monotonic() + self.canary_timeout
        last = b"0-0"
        try:
            while time.monotonic() < deadline:
                res = await self.redis.xread({keys.out(sid): last}, block=500)
                for _, entries in res or []:
                    for eid, fields in entries:
                        last = eid
                        frame = decode(fields[FIELD])
                        if isinstance(frame, want):
                            return True, f"{want.__name__} in {time.monotonic() - t0:.1f} s"
                        if isinstance(frame, Notice) and frame.event == "error":
                            return False, f"error: {frame.message[:80]}"
            return False, f"no {want.__name__} in {self.canary_timeout:.0f} s"
        finally:
            if target in ("vad", "audio"):
                await self.redis.xadd(keys.audio(sid), {FIELD: encode(SessionEnd(sid=sid))})

    async def _canary_client(self, target: str, speech: bytes) -> tuple[bool, str]:
        """A client session (native, or Realtime): the speech at 2.5x real time, then its
        events until the first reply audio.  Every way it can fail (refused, connection
        lost, no answer in time) is a failed canary with its reason, never an exception:
        the fuzz's other results still get reported."""
        import websockets

        from s2s.client.realtime import RealtimeConnection

        t0 = time.monotonic()
        heard = ""  # the transcript, once one came
        kind = Connection if target == "gateway" else RealtimeConnection
        try:
            conn = await kind.open(self.ws_url if target == "gateway" else
                                   gateway_url(self.ws_url, "realtime").url, 16000, timeout=30,
                                   api_key=self.api_key)
        except ProtocolError as e:  # the gateway's error event, or no ready at all
            return False, (f"refused: {e.code}: {e.error.get('message')}" if e.code else str(e))
        except (TimeoutError, OSError, websockets.WebSocketException) as e:
            return False, f"cannot connect: {type(e).__name__}: {e}"
        try:
            async with asyncio.timeout(self.canary_timeout):
                step = 3200
                for i in range(0, len(speech), step):
                    await conn.send_audio(speech[i:i + step])
                    await asyncio.sleep(0.04)  # 2.5x real time: under the rate limit
                while (msg := await conn.recv()) is not None:
                    if isinstance(msg, bytes):  # the first reply audio: answered
                        return bool(heard), (f"{heard}, reply audio in "
                                             f"{time.monotonic() - t0:.1f} s")
                    if msg.get("type") == "transcript" and not heard:
                        heard = (f"transcript in {time.monotonic() - t0:.1f} s "
                                 f"({msg.get('text', '')[:24]!r})")
                    if msg.get("type") == "error":
                        return False, f"error {msg.get('code')}: {msg.get('message')}"
            return False, (f"{heard or 'no transcript'}; then closed without an answer "
                           f"(code {conn.close_code})")
        except (TimeoutError, OSError, websockets.WebSocketException) as e:
            return False, f"{heard or 'no transcript'}; then {type(e).__name__}: {e}"
        finally:
            await conn.close()


def table(results: list[Result]) -> str:
    lines = [f"{'target':8} {'sent':>8} {'crashes':>7} {'stage errors':>12}  canary",
             "-" * 78]
    for r in results:
        lines.append(f"{r.target:8} {r.sent:>8} {len(r.crashes):>7} {r.stage_errors:>12g}  "
                     f"{'ok' if r.canary_ok else 'FAILED'}: {r.canary}")
        reasons = sorted(set(r.counted) | set(r.expected))
        for why in reasons:
            lines.append(f"{'':8}   rejected {why:16} counted {r.counted.get(why, 0):>8g}"
                         f"   {'expected' if r.target not in CLIENT_TARGETS else 'told'} "
                         f"{r.expected.get(why, 0):>8}")
        closes = {k: v for k, v in r.categories.items() if k.startswith("closed_")}
        if closes:
            lines.append(f"{'':8}   connections closed by the server, by code: {closes}")
    return "\n".join(lines)


async def fuzz(targets: list[str], count: int, redis_url: str, ws_url: str, seed: int,
               valid: int, canary_timeout: float, alive=lambda: []) -> list[Result]:
    fz = Fuzzer(redis_url, ws_url, seed=seed, valid=valid, canary_timeout=canary_timeout,
                alive=alive)
    results = []
    try:
        for target in targets:
            print(f"fuzzing {target}: {count} inputs…", file=sys.stderr, flush=True)
            results.append(await fz.run(target, count))
    finally:
        await fz.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m s2s.bench.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--target", default=",".join(TARGETS),
                    help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--redis-url", default="", help="fuzz a running stack (default: start one)")
    ap.add_argument("--url", default="",
                    help="its gateway: the URL `s2s up` printed (http://host:port/#key=…) "
                         "or its WebSocket, ws://host:port/ws")
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=MODULE:CLASS",
                    help="run a custom stage for NAME in the stack this starts")
    ap.add_argument("--valid", type=int, default=20,
                    help="valid frames (unknown sessions, future turns) per target: these "
                         "reach the models, so they are few")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--canary-timeout", type=float, default=120.0)
    ap.add_argument("--json", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        ap.error(f"unknown target(s) {sorted(unknown)}")
    if args.url and not args.redis_url:
        ap.error("--url needs --redis-url (the stage targets write to its streams)")
    if set(targets) & set(CLIENT_TARGETS) and args.redis_url and not args.url:
        ap.error("the gateway and realtime targets need --url")
    if args.url:
        try:
            gateway_url(args.url)
        except GatewayURLError as e:
            ap.error(f"--url: {e}")
    if args.redis_url:
        results = asyncio.run(fuzz(targets, args.count, args.redis_url, args.url, args.seed,
                                   args.valid, args.canary_timeout))
    else:
        from s2s.bench.stack import Stack, parse_stages

        with Stack(parse_stages(args.stage)) as stack:
            print(f"stack up (logs in {stack.logdir})", file=sys.stderr)
            results = asyncio.run(fuzz(targets, args.count, stack.redis.url, stack.ws_url,
                                       args.seed, args.valid, args.canary_timeout,
                                       alive=stack.dead))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([r.row() for r in results], indent=1))
    bad = [r for r in results if r.crashes or not r.canary_ok]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
