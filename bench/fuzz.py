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
import random
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from s2s import keys
from s2s.bench.fuzz_inputs import (VICTIM_SR, expected, hostile, hostile_client,
                                   hostile_realtime_client, valid_hostile)
from s2s.client.protocol import Connection, ProtocolError, auth_headers
from s2s.client.url import GatewayURLError, gateway_url
from s2s.frames import (Audio, Notice, ReplyAudio, ReplyText, SessionEnd, SessionOpen,
                        SpeechStarted, Transcript, Utterance, decode, encode)

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "tests" / "data" / "jfk.wav"
TARGETS = ("stt", "llm", "tts", "vad", "audio", "gateway", "realtime")
CLIENT_TARGETS = ("gateway", "realtime")  # WebSocket clients: the gateway counts refusals
FIELD = b"f"
HUGE_BUDGET = 20           # frames over max_frame_bytes per target (each one is megabytes)
LAG_LIMIT = 2000           # unread entries allowed before injection waits (MAXLEN trims)

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
                    res.sent += 1  # the connection: the session's hello, sent for it
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

        valid_left = self.valid
        for _ in range(count):  # rounds: each client sends at least its opening
            remaining = count - res.sent
            if remaining <= 0:
                break
            clients = []
            while remaining > 0 and len(clients) < parallel:
                valid = valid_left > 0 and self.rng.random() < 0.05
                valid_left -= valid
                msgs = hostile_realtime_client(self.rng, self.max_message_bytes,
                                               valid)[:remaining - 1]
                remaining -= len(msgs) + 1
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
