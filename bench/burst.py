"""``s2s bench --burst N``: admission control under a burst of new sessions.

First one session alone (the unloaded voice-to-voice latency), then N new sessions
arriving at random times within ``--burst-window`` seconds.  The gateway admits what
fits (``session_capacity``, stage queue wait) and answers the rest ``busy``.  Reported:
admitted sessions' p50/p95 voice-to-voice against the unloaded p95 (target: within
1.5x), how many were refused and with which code (target: all ``busy``), and the
stack's health afterwards (every stage still has a live worker, the gateway answers).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from typing import Any

import httpx

from .loadgen import (SessionSample, _fmt, _utterances, run_session, session_audio,
                      summarize)


async def _sessions(args: argparse.Namespace, count: int, window_s: float, utterances,
                    rng: random.Random, offset: int = 0) -> tuple[list[SessionSample], float]:
    t0 = time.monotonic()
    tasks = [run_session(args.url, session_audio(utterances, args.turns, offset=offset + i,
                                                 lead_s=args.lead, gap_s=args.gap),
                         args.turns, delay_s=rng.uniform(0, window_s) if count > 1 else 0.0,
                         realtime=args.realtime, out_rate=args.out_rate,
                         reply_timeout_s=args.turn_timeout, api_key=args.api_key,
                         protocol=args.protocol)
             for i in range(count)]
    samples = await asyncio.wait_for(asyncio.gather(*tasks), args.level_timeout)
    return list(samples), time.monotonic() - t0


async def _health(ws_url: str) -> dict[str, Any]:
    base = ws_url.replace("ws", "http", 1).rsplit("/ws", 1)[0]
    try:
        async with httpx.AsyncClient(timeout=3, verify=False) as client:
            r = await client.get(base + "/healthz")
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") \
            else {}
        return {"status": r.status_code, "ok": body.get("ok"), "missing": body.get("missing"),
                "workers": {k: len(v) for k, v in (body.get("workers") or {}).items()}}
    except Exception as e:  # the gateway itself is gone: that is the finding
        return {"status": None, "ok": False, "error": f"{type(e).__name__}: {e}"}


async def run_burst(args: argparse.Namespace) -> dict[str, Any]:
    utterances = _utterances(args)
    rng = random.Random(args.seed)
    log = sys.stderr if args.json else sys.stdout
    if args.warmup:
        print("bench: warm-up session…", file=log, flush=True)
        await _sessions(args, 1, 0, utterances, rng)
    print(f"bench: one session alone × {args.turns} turn(s)…", file=log, flush=True)
    alone, alone_wall = await _sessions(args, 1, 0, utterances, rng)
    print(f"bench: burst of {args.burst} new sessions within {args.burst_window:g} s…",
          file=log, flush=True)
    samples, wall = await _sessions(args, args.burst, args.burst_window, utterances, rng, 1)
    await asyncio.sleep(1.0)
    health = await _health(args.url)
    admitted = [s for s in samples if s.refused is None]
    refused = collections.Counter(s.refused for s in samples if s.refused is not None)
    unloaded = summarize(1, alone, alone_wall)
    loaded = summarize(len(admitted), admitted, wall)
    base, p95 = unloaded["voice_to_voice_ms"]["p95"], loaded["voice_to_voice_ms"]["p95"]
    return {
        "url": args.url, "burst": args.burst, "window_s": args.burst_window,
        "turns_per_session": args.turns, "unloaded": unloaded, "admitted": loaded,
        "admitted_sessions": len(admitted), "refused": dict(refused),
        "refused_not_busy": sum(n for code, n in refused.items() if code != "busy"),
        "p95_ratio": round(p95 / base, 2) if base and p95 else None,
        "health_after": health,
    }


def format_burst(r: dict[str, Any]) -> str:
    u, a = r["unloaded"], r["admitted"]
    uv, av = u["voice_to_voice_ms"], a["voice_to_voice_ms"]
    lines = [f"burst: {r['burst']} new sessions within {r['window_s']:g} s, "
             f"{r['turns_per_session']} turn(s) each",
             f"{'':>18} {'sessions':>8} {'turns':>7} {'v2v p50':>8} {'p95':>6} {'max':>6} "
             f"{'errors':>6}",
             f"{'unloaded':>18} {1:>8} {u['turns_answered']:>3}/{u['turns_expected']:<3} "
             f"{_fmt(uv['p50']):>8} {_fmt(uv['p95']):>6} {_fmt(uv['max']):>6} {u['errors']:>6}",
             f"{'admitted (burst)':>18} {r['admitted_sessions']:>8} "
             f"{a['turns_answered']:>3}/{a['turns_expected']:<3} {_fmt(av['p50']):>8} "
             f"{_fmt(av['p95']):>6} {_fmt(av['max']):>6} {a['errors']:>6}",
             "",
             f"admitted p95 / unloaded p95: {r['p95_ratio'] if r['p95_ratio'] else '-'} "
             f"(target <= 1.5)",
             "refused: " + (", ".join(f"{n} {code}" for code, n in sorted(r["refused"].items()))
                            or "none") +
             ("" if not r["refused_not_busy"] else
              f"  ({r['refused_not_busy']} not busy!)"),
             f"after the burst: gateway {'up' if r['health_after'].get('status') else 'DOWN'}, "
             f"workers {r['health_after'].get('workers')}, missing "
             f"{r['health_after'].get('missing')}"]
    errs = a.get("error_messages") or []
    if errs:
        lines += ["errors of admitted sessions:"] + [f"  {m}" for m in errs]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(run_burst(args))
    table = format_burst(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report))
    else:
        print(table)
    health = report["health_after"]
    ok = (report["refused_not_busy"] == 0 and health.get("status") == 200
          and not health.get("missing") and report["admitted"]["turns_answered"] > 0)
    return 0 if ok else 1
