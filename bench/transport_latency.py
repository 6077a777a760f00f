"""What each transport adds to a turn, without the pipeline: ``python -m s2s.bench.transport_latency``.

Voice-to-voice through the real stack is seconds of model time on a shared CPU, whose
spread hides tens of milliseconds of transport.  This measures the transport alone, on a
real gateway process and a real Redis, the stages played from Redis by this program:

- **input**: the client sends one loud 20 ms frame amid silence (paced like a
  microphone); the time until that audio is in the session's audio stream in Redis,
  where the VAD reads it;
- **output**: a reply (a 440 Hz tone from its first sample) is written to the session's
  output stream; the time until the client has it audible (first sample over ±100).

For each protocol (native ``/ws``, the Realtime WebSocket, a WebRTC call), in turn,
``--rounds`` of each; medians and spreads printed (``--json`` for one object)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from s2s import config, keys
from s2s.bus import FIELD, Bus
from s2s.frames import Audio, ReplyAudio, SpeechStarted, Transcript, decode

RATE = 16000
FRAME = RATE // 50
LOUD = 100          # a received sample above this is the reply


def tone(seconds: float, rate: int, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


@contextlib.contextmanager
def gateway(redis_url: str, key: str):
    """``python -m s2s gateway`` on a free port."""
    from s2s.launcher.redis_server import free_port

    port = free_port()
    log = tempfile.TemporaryFile()
    env = {**os.environ, "S2S_REDIS_URL": redis_url, "S2S_API_KEYS": f"bench:{key}",
           "S2S_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "s2s", "gateway", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError("the gateway did not start:\n" + log.read().decode())
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


async def open_conn(protocol: str, url: str, key: str):
    from s2s.client.protocol import Connection
    from s2s.client.realtime import RealtimeConnection
    from s2s.client.webrtc import WebRTCConnection

    if protocol == "native":
        return await Connection.open(url, RATE, 24000, api_key=key)
    if protocol == "realtime":
        return await RealtimeConnection.open(url, RATE, api_key=key)
    return await WebRTCConnection.open(url, RATE, api_key=key)


async def measure(protocol: str, url: str, key: str, bus: Bus, rounds: int) -> dict:
    conn = await open_conn(protocol, url, key)
    sid = conn.session_id
    opened = [decode(f[FIELD]) for _, f in await bus.redis.xrange(keys.SESSIONS)]
    out_sr = next(f.out_sr for f in reversed(opened) if f.sid == sid)
    silence = bytes(FRAME * 2)
    loud = np.full(FRAME, 12000, "<i2").tobytes()
    heard = asyncio.Event()
    first: dict = {}

    async def receive() -> None:
        while (msg := await conn.recv()) is not None:
            if isinstance(msg, (bytes, bytearray)) and "at" not in first and msg and \
                    np.abs(np.frombuffer(msg, "<i2")).max() > LOUD:
                first["at"] = time.time()
                heard.set()

    async def speak(seconds: float) -> None:
        for _ in range(int(seconds * 50)):
            await conn.send_audio(silence)
            await asyncio.sleep(0.02)

    reader = asyncio.create_task(receive())
    inputs, outputs = [], []
    try:
        for turn in range(1, rounds + 1):
            await speak(0.5)
            last = await bus.redis.xrevrange(keys.audio(sid), count=1)
            after = last[0][0] if last else b"0"
            sent = time.time()
            await conn.send_audio(loud)
            arrived = None
            while arrived is None and time.time() - sent < 3:
                await conn.send_audio(silence)  # the microphone goes on
                tick = time.time()
                for _, entries in await bus.redis.xread({keys.audio(sid): after}, block=20) or []:
                    for entry, fields in entries:
                        after = entry
                        frame = decode(fields[FIELD])
                        if isinstance(frame, Audio) and arrived is None and \
                                np.abs(np.frombuffer(frame.pcm, "<i2")).max() > 3000:
                            arrived = time.time()
                await asyncio.sleep(max(0.0, 0.02 - (time.time() - tick)))
            inputs.append(None if arrived is None else (arrived - sent) * 1000)

            first.clear()
            heard.clear()
            await bus.advance_turn(sid)
            marks = {"speech_end": time.time()}
            written = time.time()
            await bus.emit(SpeechStarted(sid=sid, turn=turn, at_s=0.1),
                           Transcript(sid=sid, turn=turn, text="probe", marks=marks),
                           ReplyAudio(sid=sid, turn=turn, seq=0, pcm=tone(0.3, out_sr),
                                      sr=out_sr, last=True, final=True, marks=marks))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(heard.wait(), speak(10)), 3)
            outputs.append((first["at"] - written) * 1000 if "at" in first else None)
            await speak(0.5)
    finally:
        reader.cancel()
        await conn.close()
    return {"input_ms": inputs, "output_ms": outputs}


def summary(values: list) -> dict:
    got = sorted(v for v in values if v is not None)
    if not got:
        return {"p50": None, "min": None, "max": None, "missing": len(values)}
    return {"p50": round(statistics.median(got), 1), "min": round(got[0], 1),
            "max": round(got[-1], 1), "missing": len(values) - len(got)}


async def run(args: argparse.Namespace) -> dict:
    import secrets

    from s2s.launcher.redis_server import RedisServer

    key = secrets.token_urlsafe(16)
    results: dict = {p: {"input_ms": [], "output_ms": []} for p in args.protocol}
    with RedisServer() as redis:
        settings = config.load({"redis_url": redis.url}, environ={})
        bus = Bus(settings)
        try:
            with gateway(redis.url, key) as url:
                for _ in range(args.repeat):  # protocols interleaved: the same conditions
                    for protocol in args.protocol:
                        got = await measure(protocol, url, key, bus, args.rounds)
                        for k in got:
                            results[protocol][k] += got[k]
        finally:
            await bus.close()
    return {p: {k: summary(v) for k, v in r.items()} for p, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s2s.bench.transport_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", action="append", choices=("native", "realtime", "webrtc"))
    parser.add_argument("--rounds", type=int, default=10, help="turns per connection")
    parser.add_argument("--repeat", type=int, default=2, help="connections per protocol")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.protocol = args.protocol or ["native", "realtime", "webrtc"]
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
        return 0
    print("transport   input p50 (min-max) ms      output p50 (min-max) ms")
    for protocol, r in out.items():
        i, o = r["input_ms"], r["output_ms"]
        print(f"{protocol:10s} {i['p50']!s:>8} ({i['min']}-{i['max']})"
              f"{'':8s}{o['p50']!s:>8} ({o['min']}-{o['max']})"
              + (f"  missing {i['missing']}/{o['missing']}" if i["missing"] or o["missing"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
