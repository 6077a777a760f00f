"""The hostile inputs of ``python -m s2s.bench.fuzz``: pure functions of a
``random.Random``, so a run is reproduced by its seed (tests/test_fuzz.py uses them too).
Stage-stream entries (``hostile``, with ``expected``: what the target should make of
one, decoded here independently), native WebSocket clients (``hostile_client``) and
Realtime clients (``hostile_realtime_client``)."""

from __future__ import annotations

import base64
import json
import math
import random
from typing import Any

import msgspec
import numpy as np

from s2s.frames import (STAGE_INPUTS, Audio, Frame, FrameError, Notice, ReplyAudio, ReplyText,
                        SessionEnd, SessionOpen, SpeechStarted, Transcript, Utterance, decode,
                        encode)

VICTIM_SR = 16000          # the rate the fuzzed sessions of the `audio` target open at
MAX_FRAME_S = 10.0         # the VAD's own limit on one audio frame (services/vad/worker.py)


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
    return base64.b64encode(data).decode()


def _quiet(rng: random.Random, n: int) -> bytes:
    """``n`` bytes of near silence whichever way they are read (16-bit PCM, μ-law or
    A-law): audio the gateway takes gives the VAD no speech, so no model work follows."""
    return np.random.default_rng(rng.getrandbits(32)).choice(
        np.array([0xFE, 0xFF], np.uint8), n).tobytes()


def _realtime_event(rng: random.Random, max_message_bytes: int, valid: bool) -> tuple[str, Any]:
    """One hostile Realtime client event; with ``valid``, typed text may be a real turn
    (it reaches the LLM: the fuzz keeps those few)."""
    audio = lambda n: _b64(_quiet(rng, n))  # noqa: E731
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
            [{"type": "input_text", "text": rng.choice(
                ["   ", "", "t" * 4001] + (["What is two plus two?"] * 6 if valid else []))}],
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


def hostile_realtime_client(rng: random.Random, max_message_bytes: int = 256 * 1024,
                            valid: bool = False) -> list[tuple[str, Any]]:
    """Events of one hostile Realtime client; now and then one that appends far faster
    than real time (the gateway closes it with input_overflow).  Typed text is a turn the
    LLM answers only with ``valid``; audio is near silence."""
    if rng.random() < 0.03:  # 2 * max_message_bytes a piece (base64 keeps it under the
        # event limit): 14 pieces are ~150 s at 24 kHz, past the 125 s that may wait
        big = _b64(_quiet(rng, 2 * max_message_bytes))
        return [("text", json.dumps({"type": "input_audio_buffer.append", "audio": big}))] * 14
    return [_realtime_event(rng, max_message_bytes, valid) for _ in range(rng.randint(1, 12))]
