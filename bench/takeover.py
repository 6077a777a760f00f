"""``python -m s2s.bench.takeover [--kills N]`` (from a checkout: it runs the tests'
echo stage): how long after a worker is SIGKILLed mid-item another worker owns its
entry, by the liveness lease (heartbeat ``S2S_HEARTBEAT_S``, lease ``S2S_LEASE_S``)
against the idle-time claim alone (the fallback, ``S2S_CLAIM_IDLE_S``); and how much
Redis memory 300 acknowledged 96 KB utterances keep, acknowledged only (as before) or
acknowledged and deleted (``Bus.ack``).  Prints two tables."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STREAM, GROUP = "s2s:echo", "echo"


def takeover_times(env_extra: dict[str, str], kills: int) -> list[float]:
    import redis

    from s2s.bus import FIELD
    from s2s.frames import Transcript, encode
    from s2s.launcher.redis_server import RedisServer

    out: list[float] = []
    with RedisServer() as srv:
        r = redis.Redis.from_url(srv.url)
        env = {**os.environ, "S2S_REDIS_URL": srv.url, "S2S_METRICS_PORT": "0",
               "S2S_TEST_DELAY_S": "30", "S2S_MAX_DELIVERIES": "0", **env_extra}
        cmd = [sys.executable, "-m", "s2s", "worker", "tests.stages:EchoStage"]

        def spawn() -> subprocess.Popen:
            return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)

        procs = [spawn(), spawn()]
        try:
            deadline = time.monotonic() + 120
            while len(r.zrangebyscore("s2s:workers", time.time() - 2, "+inf")) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("takeover: the echo workers did not start (run from a checkout)")
                time.sleep(0.1)
            r.xadd(STREAM, {FIELD: encode(Transcript(sid="t", turn=0, text="x"))})
            for i in range(kills):
                while not (rows := r.xpending_range(STREAM, GROUP, "-", "+", 1)):
                    time.sleep(0.005)
                owner = rows[0]["consumer"]
                pid = int(owner.decode().split("-")[-2])
                time.sleep(0.5)
                victim = next(p for p in procs if p.pid == pid)
                t0 = time.monotonic()
                victim.kill()
                victim.wait()
                while r.xpending_range(STREAM, GROUP, "-", "+", 1)[0]["consumer"] == owner:
                    time.sleep(0.005)
                out.append(time.monotonic() - t0)
                print(f"  kill {i + 1}/{kills}: taken over in {out[-1]:.2f} s", file=sys.stderr)
                procs.remove(victim)
                procs.append(spawn())
                while len(r.zrangebyscore("s2s:workers", time.time() - 0.5, "+inf")) < 2:
                    time.sleep(0.05)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return out


async def acked_memory(url: str, delete: bool, count: int = 300) -> int:
    from s2s import config
    from s2s.bus import FIELD, Bus

    bus = Bus(config.load({"redis_url": url}, environ={}))
    # SYNC: Valkey 8 frees a FLUSHALL lazily by default, which would land in the measurement
    await bus.redis.execute_command("FLUSHALL", "SYNC")
    base = (await bus.redis.info("memory"))["used_memory"]
    await bus.ensure_group("s2s:stt", "stt")
    for _ in range(count):
        await bus.redis.xadd("s2s:stt", {FIELD: b"\1" * 96000}, maxlen=10000, approximate=True)
        (eid, _), = await bus.read_group("s2s:stt", "stt", "w", 1, 0)
        await bus.ack("s2s:stt", "stt", eid, delete=delete)
    used = (await bus.redis.info("memory"))["used_memory"] - base
    await bus.close()
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s2s.bench.takeover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per path")
    args = parser.parse_args(argv)
    print("| takeover path | kills | p50 s | p95 s | max s |\n|---|---|---|---|---|")
    for name, env in (("lease (heartbeat 0.25 s, lease 1 s)", {}),
                      ("idle-time claim only (claim_idle 3 s)", {"S2S_LEASE_S": "3600"})):
        t = sorted(takeover_times(env, args.kills))
        print(f"| {name} | {len(t)} | {statistics.median(t):.2f} | "
              f"{t[int(0.95 * (len(t) - 1))]:.2f} | {t[-1]:.2f} |", flush=True)
    from s2s.launcher.redis_server import RedisServer

    print("\n| 300 acknowledged 96 KB utterances | Redis used_memory |\n|---|---|")
    with RedisServer() as srv:
        for delete in (False, True):
            used = asyncio.run(acked_memory(srv.url, delete))
            print(f"| {'XACK + XDEL (Bus.ack)' if delete else 'XACK only (before)'} | "
                  f"{used / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
