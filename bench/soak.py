"""``python -m s2s.bench.soak``: does anything grow over a long run under load?

Runs ``--sessions`` concurrent client sessions (default 2: the most this 2-core machine
holds at p95 <= 1.5 s, see docs/performance.md) for ``--minutes`` (default 30), each speaking
real speech in real time, turn after turn, over one long-lived WebSocket session.
Every ``--sample-s`` (10 s) it samples the RSS of every process of the stack (psutil,
or /proc without it) and Redis ``used_memory``.  It reports, per process, the slope
after ``--warmup-min`` (least squares, in %/hour of the post-warm-up start) and the
change over the run after warm-up (%), Redis ``used_memory`` against the target
(50 MB + 2 MB per open session), turns completed, and writes JSON and a plot.

Without ``--url`` it starts its own stack (Redis, one worker per stage, the gateway:
``s2s.bench.stack.Stack``).  With ``--url``/``--redis-url`` it samples the workers it
finds heartbeating in Redis (their pid is in the consumer id, so only when they run
on this machine), Redis itself (INFO's process_id) and ``--pid`` processes (e.g. the
gateway).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from s2s import keys

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAVS = [ROOT / "tests" / "data" / "jfk.wav"]
TARGET_BASE_MB, TARGET_PER_SESSION_MB = 50.0, 2.0
FRAME_S = 0.1


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, or None when it is gone."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess, AccessDenied
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def slope(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope dy/dt (0 for fewer than two points)."""
    if len(ts) < 2 or max(ts) == min(ts):
        return 0.0
    return float(np.polyfit(np.asarray(ts), np.asarray(ys, dtype=float), 1)[0])


@dataclass
class Soak:
    minutes: float
    sessions: int
    sample_s: float
    warmup_min: float
    samples: list[dict] = field(default_factory=list)  # {"t": s, "rss": {name: bytes}, "redis": b}
    turns: int = 0
    turns_started: int = 0
    errors: list[str] = field(default_factory=list)

    def report(self) -> dict:
        warm = [s for s in self.samples if s["t"] >= self.warmup_min * 60] or self.samples
        names = sorted({n for s in self.samples for n in s["rss"]})
        procs = {}
        for name in names:
            pts = [(s["t"], s["rss"][name]) for s in warm if s["rss"].get(name)]
            if not pts:
                continue
            ts, ys = zip(*pts)
            first, last = ys[0], ys[-1]
            procs[name] = {
                "rss_mb_first": round(first / 2**20, 1), "rss_mb_last": round(last / 2**20, 1),
                "rss_mb_max": round(max(ys) / 2**20, 1),
                "slope_pct_per_hour": round(slope(list(ts), list(ys)) * 3600 / first * 100, 2),
                "change_pct": round((last - first) / first * 100, 2), "samples": len(pts)}
        redis_mb = [s["redis"] / 2**20 for s in self.samples if s.get("redis")]
        target = TARGET_BASE_MB + TARGET_PER_SESSION_MB * self.sessions
        return {"minutes": self.minutes, "sessions": self.sessions, "sample_s": self.sample_s,
                "warmup_min": self.warmup_min, "samples": len(self.samples),
                "turns_completed": self.turns, "turns_started": self.turns_started,
                "errors": self.errors[:20], "processes": procs,
                "redis_used_memory_mb": {"first": round(redis_mb[0], 2) if redis_mb else None,
                                         "max": round(max(redis_mb), 2) if redis_mb else None,
                                         "last": round(redis_mb[-1], 2) if redis_mb else None,
                                         "target": target,
                                         "within": bool(redis_mb) and max(redis_mb) <= target}}


async def speaker(url: str, speech: list[np.ndarray], soak: Soak, stop: asyncio.Event,
                  reply_timeout_s: float = 60.0) -> None:
    """One long-lived session: speak, wait for the answer (reply_done), again."""
    from s2s.client import Connection

    step = int(16000 * FRAME_S)
    silence = np.zeros(step, np.int16).tobytes()
    i = 0
    while not stop.is_set():
        try:
            conn = await Connection.open(url, 16000)
        except Exception as e:
            soak.errors.append(f"open: {e}")
            await asyncio.sleep(2)
            continue
        done = asyncio.Event()

        async def receive() -> None:
            while (msg := await conn.recv()) is not None:
                if isinstance(msg, dict) and msg.get("type") == "reply_done":
                    done.set()
                elif isinstance(msg, dict) and msg.get("type") == "error":
                    soak.errors.append(f"{msg.get('code')}: {msg.get('message', '')[:80]}")
            done.set()

        receiver = asyncio.create_task(receive())
        try:
            while not stop.is_set() and not receiver.done():
                pcm = speech[i % len(speech)]
                i += 1
                done.clear()
                soak.turns_started += 1
                t0 = time.monotonic()
                for k in range(0, len(pcm), step):  # real time, as a microphone
                    await conn.send_audio(pcm[k:k + step].tobytes())
                    await asyncio.sleep(max(0.0, t0 + (k + step) / 16000 - time.monotonic()))
                deadline = time.monotonic() + reply_timeout_s
                while not done.is_set() and time.monotonic() < deadline and not stop.is_set():
                    await conn.send_audio(silence)  # the pause after speech, then listening
                    await asyncio.sleep(FRAME_S)
                if done.is_set() and not receiver.done():
                    soak.turns += 1
                for _ in range(10):  # a second of silence between turns
                    await conn.send_audio(silence)
                    await asyncio.sleep(FRAME_S)
        except Exception as e:
            soak.errors.append(f"session: {type(e).__name__}: {e}")
        finally:
            await conn.close()
            receiver.cancel()


async def processes(redis: aioredis.Redis, fixed: dict[str, int]) -> dict[str, int]:
    """name -> pid of every process to sample: ``fixed`` ones, Redis, and the workers
    heartbeating (their consumer id is host-pid-suffix)."""
    import socket

    procs = dict(fixed)
    info = await redis.info("server")
    procs.setdefault("redis", int(info["process_id"]))
    host = socket.gethostname()
    for member in await redis.zrangebyscore(keys.WORKERS, time.time() - 5, "+inf"):
        stage, worker, _ = member.decode().split("|", 2)
        parts = worker.rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            pid = int(parts[1])
            if pid not in procs.values():
                procs[f"{stage}-{pid}"] = pid
    return procs


async def run(url: str, redis_url: str, soak: Soak, fixed: dict[str, int],
              wavs: list[Path], log=print) -> Soak:
    from s2s.audio import read_audio

    speech = [np.concatenate([read_audio(w, 16000), np.zeros(8000, np.int16)]) for w in wavs]
    redis = aioredis.from_url(redis_url)
    stop = asyncio.Event()
    speakers = [asyncio.create_task(speaker(url, speech, soak, stop))
                for _ in range(soak.sessions)]
    t0 = time.monotonic()
    end = t0 + soak.minutes * 60
    try:
        while True:
            procs = await processes(redis, fixed)
            mem = await redis.info("memory")
            sample = {"t": round(time.monotonic() - t0, 2),
                      "rss": {n: rss_bytes(p) for n, p in procs.items()},
                      "redis": int(mem["used_memory"]), "turns": soak.turns}
            soak.samples.append(sample)
            log(f"t={sample['t']:7.1f}s turns={soak.turns:4d} redis="
                f"{sample['redis'] / 2**20:6.1f} MB " + " ".join(
                    f"{n}={(v or 0) / 2**20:.0f}MB" for n, v in sorted(sample["rss"].items())))
            if time.monotonic() + soak.sample_s > end + 0.01:
                break
            await asyncio.sleep(max(0.0, t0 + len(soak.samples) * soak.sample_s
                                    - time.monotonic()))
    finally:
        stop.set()
        await asyncio.gather(*speakers, return_exceptions=True)
        await redis.aclose()
    return soak


def plot(soak: Soak, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ts = [s["t"] / 60 for s in soak.samples]
    for name in sorted({n for s in soak.samples for n in s["rss"]}):
        a.plot(ts, [(s["rss"].get(name) or np.nan) / 2**20 for s in soak.samples], label=name)
    a.axvline(soak.warmup_min, color="grey", ls=":", label="end of warm-up")
    a.set_ylabel("RSS (MB)")
    a.legend(fontsize=7, ncol=3)
    a.set_title(f"soak: {soak.sessions} session(s), {soak.minutes:g} min")
    b.plot(ts, [s["redis"] / 2**20 for s in soak.samples], label="Redis used_memory")
    b.axhline(TARGET_BASE_MB + TARGET_PER_SESSION_MB * soak.sessions, color="red", ls="--",
              label="target")
    b.set_ylabel("MB")
    b.set_xlabel("minutes")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(report: dict) -> str:
    lines = [f"soak: {report['sessions']} session(s), {report['minutes']:g} min, "
             f"{report['samples']} samples, warm-up {report['warmup_min']:g} min, "
             f"turns {report['turns_completed']}/{report['turns_started']}",
             f"{'process':18} {'RSS first':>10} {'last':>8} {'max':>8} {'%/hour':>8} "
             f"{'% run':>7}"]
    for name, p in sorted(report["processes"].items()):
        lines.append(f"{name:18} {p['rss_mb_first']:>8.1f}MB {p['rss_mb_last']:>6.1f}MB "
                     f"{p['rss_mb_max']:>6.1f}MB {p['slope_pct_per_hour']:>8.2f} "
                     f"{p['change_pct']:>7.2f}")
    r = report["redis_used_memory_mb"]
    lines.append(f"Redis used_memory: first {r['first']} MB, max {r['max']} MB, last {r['last']}"
                 f" MB; target <= {r['target']:g} MB: {'ok' if r['within'] else 'OVER'}")
    if report["errors"]:
        lines.append(f"errors ({len(report['errors'])} shown): {report['errors'][:3]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m s2s.bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-min", type=float, default=None,
                    help="minutes left out of the slopes (default: a sixth of the run, "
                         "at most 5)")
    ap.add_argument("--url", default="", help="gateway WebSocket of a running stack")
    ap.add_argument("--redis-url", default="", help="its Redis (with --url)")
    ap.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                    help="another process of a running stack to sample (e.g. gateway=1234)")
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=MODULE:CLASS",
                    help="a custom stage in the stack this starts")
    ap.add_argument("--wav", action="append", default=[], help="speech to say (default jfk)")
    ap.add_argument("--json", default="soak.json")
    ap.add_argument("--plot", default="soak.png")
    args = ap.parse_args(argv)
    warmup = args.warmup_min if args.warmup_min is not None else min(5.0, args.minutes / 6)
    soak = Soak(args.minutes, args.sessions, args.sample_s, warmup)
    wavs = [Path(w) for w in args.wav] or DEFAULT_WAVS
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.url:
        if not args.redis_url:
            ap.error("--url needs --redis-url (to sample Redis and find the workers)")
        fixed = {n: int(p) for n, _, p in (x.partition("=") for x in args.pid)}
        asyncio.run(run(args.url, args.redis_url, soak, fixed, wavs, log))
    else:
        from s2s.bench.stack import Stack, parse_stages

        with Stack(parse_stages(args.stage)) as stack:
            log(f"stack up (logs in {stack.logdir})")
            fixed = {n: p.pid for n, p in stack.procs.items()}
            asyncio.run(run(stack.ws_url, stack.redis.url, soak, fixed, wavs, log))
            dead = stack.dead()
            soak.errors += [f"died: {d}" for d in dead]
    report = soak.report()
    report["series"] = soak.samples
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(soak, args.plot)
    print(table(report))
    print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
