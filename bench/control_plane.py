"""The control plane's cost per session: Redis connections per process, gateway memory
per session and Redis commands per session-second, at several session counts.

    python -m s2s.bench.control_plane [--sessions 8,100,200] [--hold 15] [--profile]

A real stack on a fresh Redis: the real gateway, the real VAD worker (Silero and the
end-of-turn model), and the worker runtime of STT, LLM and TTS around the TIMING STUBS of
``s2s.bench.stub_stages`` (no STT/LLM/TTS model runs: those stages only answer, after
the time a model would take).  The clients are as light as can be: each session sends
100 ms audio messages in real time (silence; with ``--profile`` one session first speaks
tests/data/jfk.wav, in ``--message-ms`` messages, and waits for the reply) and reads what
comes back.

Redis connections are counted per process from the operating system's socket table (the
TCP connections of each process to Redis's port), commands from ``INFO commandstats``
deltas: "per session-second" is (commands during the window - the idle stack's rate *
window) / (sessions * window)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from s2s.launcher.proc import stop_processes

ROOT = Path(__file__).resolve().parents[1]
JFK = ROOT / "tests" / "data" / "jfk.wav"
SR = 16000
MESSAGE_S = 0.1
STUBS = {"stt": "s2s.bench.stub_stages:StubStt", "llm": "s2s.bench.stub_stages:StubLlm",
         "tts": "s2s.bench.stub_stages:StubTts"}


class Stack:
    """Redis, one gateway, one worker per stage (VAD real, the rest stubs), as processes."""

    def __init__(self, max_sessions: int, logdir: Path):
        self.max_sessions = max_sessions
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.server: Any = None
        self.url = ""
        self.port = 0

    def start(self, redis_url: str | None = None) -> "Stack":
        from s2s.launcher.redis_server import RedisServer, free_port

        from .stack import with_private_key

        if redis_url is None:
            self.server = RedisServer()
            self.server.start()
            redis_url = self.server.url
        self.redis_url = redis_url
        slots = str(self.max_sessions + 8)
        env = with_private_key({
            **os.environ, "S2S_REDIS_URL": redis_url, "S2S_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "S2S_STUB_LOAD_S": "0.2"})
        os.environ["S2S_API_KEY"] = env["S2S_API_KEY"]
        for stage, spec in {"vad": "vad", **STUBS}.items():
            extra = {"S2S_CONCURRENCY": slots} if stage == "vad" else {}
            self._spawn(stage, [sys.executable, "-m", "s2s", "worker", spec], {**env, **extra})
        self.port = free_port()
        self._spawn("gateway", [sys.executable, "-m", "s2s.bench.stub_stages", "gateway",
                                "--host", "127.0.0.1", "--port", str(self.port)],
                    {**env, "S2S_MAX_SESSIONS": slots, "S2S_AUTOSCALE_VAD_SESSIONS": slots,
                     "S2S_PRINCIPAL_MAX_SESSIONS": "0"})
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        with open(self.logdir / f"{name}.log", "wb") as out:
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out,
                                                stderr=subprocess.STDOUT, cwd=ROOT)

    async def ready(self, timeout: float = 180) -> None:
        import httpx
        import redis.asyncio as aredis

        r = aredis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            async with httpx.AsyncClient() as http:
                while time.monotonic() < deadline:
                    for name, p in self.procs.items():
                        if p.poll() is not None:
                            raise RuntimeError(f"{name} exited {p.returncode}: "
                                               f"{(self.logdir / f'{name}.log').read_text()[-2000:]}")
                    members = await r.zrangebyscore("s2s:workers", time.time() - 3, "+inf")
                    stages = {m.decode().split("|", 1)[0] for m in members}
                    try:
                        gw = (await http.get(self.url + "/healthz", timeout=2)).status_code
                    except httpx.HTTPError:
                        gw = 0
                    if {"vad", "stt", "llm", "tts"} <= stages and gw == 200:
                        return
                    await asyncio.sleep(0.5)
        finally:
            await r.aclose()
        raise TimeoutError("the stack did not get ready")

    def redis_port(self) -> int:
        from urllib.parse import urlparse
        return urlparse(self.redis_url).port or 6379

    def connections(self) -> dict[str, int]:
        """Established TCP connections of each process to Redis."""
        import psutil

        port, out = self.redis_port(), {}
        for name, p in self.procs.items():
            try:
                conns = psutil.Process(p.pid).net_connections("tcp")
            except psutil.Error:
                continue
            out[name] = sum(1 for c in conns if c.raddr and c.raddr.port == port
                            and c.status == psutil.CONN_ESTABLISHED)
        return out

    def rss(self, name: str) -> int:
        import psutil
        return psutil.Process(self.procs[name].pid).memory_info().rss

    def stop(self) -> None:
        stop_processes(self.procs.values(), grace_s=15)
        if self.server is not None:
            self.server.stop()


async def commandstats(r) -> dict[str, tuple[int, int]]:
    """cmd -> (calls, usec) from INFO commandstats."""
    info = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for k, v in info.items()}


def delta(after: dict, before: dict) -> dict[str, tuple[int, int]]:
    out = {}
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0))
        if calls - c0 > 0:
            out[cmd] = (calls - c0, usec - u0)
    return out


class Sessions:
    """``n`` client sessions sending 100 ms audio messages in real time and reading."""

    def __init__(self, url: str, n: int, speech: np.ndarray | None = None,
                 message_s: float = MESSAGE_S):
        self.url, self.n, self.speech, self.message_s = url, n, speech, message_s
        self.conns: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.received = 0
        self.replies = 0
        self.refused: list[str] = []
        self.stop = asyncio.Event()

    async def open(self, rate_per_s: float = 25.0) -> None:
        from s2s.client.protocol import Connection, ProtocolError

        for i in range(self.n):
            try:
                conn = await Connection.open(self.url, SR, timeout=30)
            except ProtocolError as e:  # counted, not fatal: the row says how many opened
                self.refused.append(e.code or str(e)[:80])
                continue
            self.conns.append(conn)
            self.tasks.append(asyncio.create_task(self._read(conn)))
            self.tasks.append(asyncio.create_task(self._send(conn, i)))
            await asyncio.sleep(1 / rate_per_s)

    async def _read(self, conn) -> None:
        while True:
            msg = await conn.recv()
            if msg is None:
                return
            self.received += 1
            if isinstance(msg, dict) and msg.get("type") == "reply_done":
                self.replies += 1

    async def _send(self, conn, i: int) -> None:
        step = int(self.message_s * SR)
        pcm = self.speech if self.speech is not None and i == 0 else np.zeros(step, np.int16)
        pos, t = 0, time.monotonic()
        while not self.stop.is_set():
            chunk = pcm[pos:pos + step] if pos < len(pcm) else np.zeros(step, np.int16)
            pos += step
            try:
                await conn.send_audio(chunk)
            except Exception:
                return
            t += self.message_s
            await asyncio.sleep(max(0.0, t - time.monotonic()))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def measure(stack: Stack, counts: list[int], hold_s: float, idle_s: float = 5.0,
                  settle_s: float = 3.0, out=print) -> list[dict]:
    """One row per session count: connections per process, gateway memory per session,
    commands per session-second (beyond the idle stack)."""
    import redis.asyncio as aredis

    r = aredis.Redis.from_url(stack.redis_url)
    rows = []
    try:
        before = await commandstats(r)
        await asyncio.sleep(idle_s)
        idle = delta(await commandstats(r), before)
        idle_rate = sum(c for c, _ in idle.values()) / idle_s
        idle_conns = stack.connections()
        gw_rss0 = stack.rss("gateway")
        out(f"idle stack: {idle_rate:.0f} commands/s, connections {idle_conns}")
        for n in counts:
            sessions = Sessions(stack.url, n)
            t_open = time.monotonic()
            await sessions.open()
            open_s = time.monotonic() - t_open
            await asyncio.sleep(settle_s)
            before = await commandstats(r)
            t0 = time.monotonic()
            await asyncio.sleep(hold_s)
            window = time.monotonic() - t0
            d = delta(await commandstats(r), before)
            conns = stack.connections()
            rss = stack.rss("gateway")
            await sessions.close()
            total = sum(c for c, _ in d.values())
            usec = sum(u for _, u in d.values())
            n = max(len(sessions.conns), 1)
            row = {"sessions": n, "refused": len(sessions.refused), "open_s": round(open_s, 1), "connections": conns,
                   "gateway_kib_per_session": round((rss - gw_rss0) / 1024 / n, 1),
                   "commands_per_session_s": round((total - idle_rate * window) / n / window, 1),
                   "redis_cpu_ms_per_session_s": round(usec / 1000 / n / window, 3),
                   "top": sorted(d.items(), key=lambda kv: -kv[1][0])[:6]}
            rows.append(row)
            out(format_row(row))
            await asyncio.sleep(settle_s)  # the sessions end (VAD releases them)
    finally:
        await r.aclose()
    return rows


async def profile(stack: Stack, message_s: float = MESSAGE_S, out=print) -> dict:
    """One session speaking jfk.wav (then 8 s of silence for the reply): every Redis
    command it cost beyond the idle stack, by command."""
    import redis.asyncio as aredis

    from s2s.audio import read_audio

    r = aredis.Redis.from_url(stack.redis_url)
    try:
        before = await commandstats(r)
        await asyncio.sleep(5)
        idle = delta(await commandstats(r), before)
        idle_rate = sum(c for c, _ in idle.values()) / 5
        speech = np.asarray(read_audio(str(JFK), SR), np.int16)
        seconds = len(speech) / SR + 8.0
        sessions = Sessions(stack.url, 1, speech, message_s)
        before = await commandstats(r)
        t0 = time.monotonic()
        await sessions.open()
        await asyncio.sleep(seconds)
        window = time.monotonic() - t0
        d = delta(await commandstats(r), before)
        await sessions.close()
    finally:
        await r.aclose()
    total = sum(c for c, _ in d.values())
    usec = sum(u for _, u in d.values())
    beyond = total - idle_rate * window
    res = {"window_s": round(window, 1), "commands": total, "idle_per_s": round(idle_rate, 1),
           "per_session_s": round(beyond / window, 1), "redis_cpu_ms_per_s": round(usec / 1000 / window, 2),
           "replies": sessions.replies, "by_command": sorted(d.items(), key=lambda kv: -kv[1][1])}
    out(f"one session speaking jfk.wav ({message_s * 1000:.0f} ms messages) for {window:.1f} s: {total} commands, "
        f"{res['per_session_s']} per second beyond the idle stack ({idle_rate:.0f}/s), "
        f"Redis CPU {res['redis_cpu_ms_per_s']} ms/s, replies {sessions.replies}")
    for cmd, (calls, us) in res["by_command"][:12]:
        out(f"  {cmd:<22} {calls:>6} calls  {us / 1000:>8.1f} ms")
    return res


def format_row(row: dict) -> str:
    c = row["connections"]
    return (f"{row['sessions']:>5} sessions | conns gateway {c.get('gateway', '?'):>2} vad "
            f"{c.get('vad', '?'):>2} stt {c.get('stt', '?'):>2} llm {c.get('llm', '?'):>2} "
            f"tts {c.get('tts', '?'):>2} | gateway {row['gateway_kib_per_session']:>7} KiB/session"
            f" | {row['commands_per_session_s']:>6} cmds/session-s | Redis CPU "
            f"{row['redis_cpu_ms_per_session_s']} ms/session-s | opened in {row['open_s']} s"
            + (f" ({row['refused']} refused)" if row.get("refused") else ""))


async def run(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.sessions.split(",") if x.strip()]
    logdir = Path(args.logdir or tempfile.mkdtemp(prefix="s2s-control-plane-"))
    logdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(max(counts or [1]), logdir).start()
    print(f"STT, LLM and TTS are TIMING STUBS (s2s.bench.stub_stages); logs in {logdir}")
    try:
        await stack.ready()
        if args.profile:
            await profile(stack, args.message_ms / 1000)
        if counts:
            await measure(stack, counts, args.hold)
    finally:
        stack.stop()
    return 0


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m s2s.bench.control_plane",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="8,100,200",
                   help="session counts to measure, comma-separated (empty: none)")
    p.add_argument("--hold", type=float, default=15.0, help="seconds measured per count")
    p.add_argument("--profile", action="store_true",
                   help="first: one session speaking jfk.wav, commands by kind")
    p.add_argument("--message-ms", type=float, default=MESSAGE_S * 1000,
                   help="the profile's audio message length (the web client sends 20 ms)")
    p.add_argument("--logdir", default="", help="where the processes' logs go")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli())
