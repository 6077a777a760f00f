"""TTS benchmark: time to first audio and real-time factor of the TTS stage.

    python -m s2s.bench.bench_tts [--repeat 5] [--out-rate 16000] [--voice PATH]

Runs the real stage (``TtsStage.process``, one onnxruntime thread) on short, medium
and long reply chunks, as the first chunk of a reply (seq 0: a long first sentence
is cut so its head renders sooner) and as a later one (seq 1), and prints medians:
first audio (text in -> first ReplyAudio out), total synthesis time, seconds of
audio, and the real-time factor (synthesis time / audio duration; < 1 is faster
than real time).

    python -m s2s.bench.bench_tts --sessions 1,2,4 [--turns 4] [--compare]

Several sessions through the real worker runtime and a real redis-server (started
here): each session asks, gets a reply of three chunks (seq 0 short, then two
sentences, one every ``--llm-gap`` s as an LLM would send them), "plays" it, pauses
and asks again; sessions start staggered so new first pieces meet later pieces of
replies already playing.  Prints per sessions count: first-piece latency (seq 0 text
in -> its first audio out), later-piece latency (by design higher with priority: a
later piece waits while its reply still has audio playing) and the gaps a client would
hear inside a reply (a piece arriving after the audio before it finished playing).
``--compare`` also runs the plain order of before (one reply at a time per worker,
stream order).

    python -m s2s.bench.bench_tts --rss 600

Memory: renders that many texts of random length (2-60 words) and prints the
process's RSS every tenth of the way (flat after setup = bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import time

SENTENCES = {
    "short": "Sure, I can help.",
    "medium": "The capital of France is Paris, a city famous for its museums and cafes.",
    "long": "I'm sorry for any misunderstanding but as a voice assistant I can only talk "
            "about what I know, so let me tell you a little about the history of the moon "
            "landing in nineteen sixty nine. Three astronauts flew to the moon that summer.",
}


async def measure(stage, text: str, seq: int, out_rate: int) -> tuple[float, float, float]:
    from s2s.frames import ReplyText

    frame = ReplyText(sid="bench", seq=seq, text=text, final=True, out_sr=out_rate)
    t0 = time.perf_counter()
    first = None
    samples, sr = 0, 0
    async for out in stage.process(frame):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(out.pcm) // 2
        sr = out.sr
    return first or 0.0, time.perf_counter() - t0, samples / sr if sr else 0.0


REPLY = ["Sure, I can help with that.",
         "The capital of France is Paris, a city famous for its museums and its cafes.",
         "It has been the seat of the French government for most of its long history."]
WORDS = ("the quick brown fox jumps over a lazy dog while seven people talk about paris "
         "and the moon landing history in nineteen sixty nine").split()


def rss_mb() -> float:
    """This process's resident set size (MB)."""
    from .soak import rss_bytes

    return rss_bytes(os.getpid()) / 2**20


def bench_rss(stage, renders: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    print(f"RSS after setup {rss_mb():.0f} MB; rendering {renders} texts of 2-60 words\n")
    print(f"{'renders':>8}{'RSS MB':>8}{'elapsed s':>11}")
    t0 = time.perf_counter()
    step = max(renders // 10, 1)
    for i in range(1, renders + 1):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) + "."
        stage.synthesize(text, first=rng.random() < 0.3)
        if i % step == 0 or i == renders:
            print(f"{i:>8}{rss_mb():>8.0f}{time.perf_counter() - t0:>11.0f}", flush=True)


async def sessions_run(stage, settings, n: int, turns: int, llm_gap: float,
                       stagger: float) -> dict[str, list[float]]:
    """n sessions, each `turns` replies, through a Runtime of `stage` on real Redis."""
    import redis.asyncio as aioredis

    from s2s import keys
    from s2s.bus import FIELD
    from s2s.frames import ReplyAudio, ReplyText, decode, encode
    from s2s.worker import Runtime

    runtime = Runtime(stage, settings)
    stage.setup = lambda: None  # already loaded
    worker = asyncio.create_task(runtime.run())
    client = aioredis.Redis.from_url(settings.redis_url)
    stream = keys.stage_stream("tts")
    run_id = os.urandom(3).hex()
    first_lat: list[float] = []
    later_lat: list[float] = []
    gaps: list[float] = []

    async def session(k: int) -> None:
        sid = f"b{n}-{k}-{run_id}"  # fresh per run: no audio of an earlier run is read
        await asyncio.sleep(k * stagger)
        cursor = b"0-0"
        for turn in range(1, turns + 1):
            await client.set(keys.turn(sid), turn)
            sent: dict[int, float] = {}
            got: dict[int, float] = {}
            play_end = None  # when the audio received so far finishes playing
            gap = 0.0

            async def feed() -> None:
                for seq, text in enumerate(REPLY):
                    frame = ReplyText(sid=sid, turn=turn, seq=seq, text=text,
                                      final=seq == len(REPLY) - 1)
                    sent[seq] = time.time()
                    await client.xadd(stream, {FIELD: encode(frame)})
                    await asyncio.sleep(llm_gap)

            feeder = asyncio.create_task(feed())
            done = False
            quiet_since = time.monotonic()
            while not done:
                res = await client.xread({keys.out(sid): cursor}, count=50, block=1000)
                if not res:
                    if time.monotonic() - quiet_since > 30:
                        raise TimeoutError(f"{sid}: no audio for 30 s")
                    continue
                quiet_since = time.monotonic()
                for _, entries in res:
                    for eid, fields in entries:
                        cursor = eid
                        out = decode(fields[FIELD])
                        if not isinstance(out, ReplyAudio) or out.turn != turn:
                            continue
                        now = time.time()
                        got.setdefault(out.seq, now)
                        if play_end is not None and now > play_end:
                            gap += now - play_end
                        play_end = max(play_end or now, now) + len(out.pcm) / 2 / out.sr
                        done = done or out.final
            await feeder
            if turn > 1:  # each session's first turn warms up (threads, caches): not counted
                first_lat.append(got[0] - sent[0])
                later_lat.extend(got[q] - sent[q] for q in got if q > 0)
                gaps.append(gap)
            await asyncio.sleep(max(play_end - time.time(), 0) + 0.3)  # listen, then ask

    try:
        await asyncio.wait_for(asyncio.gather(*(session(k) for k in range(n))), 600)
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(worker, 30)
        await client.aclose()
    return {"first": first_lat, "later": later_lat, "gaps": gaps}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else 0.0


def bench_sessions(stage, counts: list[int], turns: int, llm_gap: float, stagger: float,
                   compare: bool) -> None:
    from s2s import config
    from s2s.launcher.redis_server import RedisServer

    modes = ["priority", "plain"] if compare else ["priority"]
    print(f"reply of {len(REPLY)} chunks, one every {llm_gap}s; {turns} turns per session "
          f"(the first one a warm-up, not counted); "
          f"sessions start {stagger}s apart; concurrency {stage.concurrency}\n")
    head = (f"{'order':<10}{'sessions':>9}{'first p50 ms':>14}{'first p95 ms':>14}"
            f"{'later p50 ms':>14}{'later p95 ms':>14}{'gaps s':>8}{'replies w/ gap':>16}")
    print(head)
    print("-" * len(head))
    with RedisServer() as server:
        settings = config.load({"redis_url": server.url, "metrics_port": 0, "block_ms": 200},
                               environ={})
        ours = stage.replies.deadline, stage.lookahead, stage.concurrency
        for n in counts:
            for mode in modes:
                if mode == "plain":  # as before: one reply at a time, stream order
                    stage.replies.deadline = lambda *a, **k: time.time()
                    stage.lookahead, stage.concurrency = 0, 1
                else:
                    stage.replies.deadline, stage.lookahead, stage.concurrency = ours
                r = asyncio.run(sessions_run(stage, settings, n, turns, llm_gap, stagger))
                print(f"{mode:<10}{n:>9}{pct(r['first'], .5) * 1000:>14.0f}"
                      f"{pct(r['first'], .95) * 1000:>14.0f}{pct(r['later'], .5) * 1000:>14.0f}"
                      f"{pct(r['later'], .95) * 1000:>14.0f}{sum(r['gaps']):>8.2f}"
                      f"{sum(g > 0.05 for g in r['gaps']):>9}/{len(r['gaps'])}", flush=True)
        stage.replies.deadline, stage.lookahead, stage.concurrency = ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median reported)")
    parser.add_argument("--out-rate", type=int, default=0,
                        help="resample to this rate as a client asks (0: the voice's own)")
    parser.add_argument("--voice", default="", help="Piper .onnx voice (default: the bundled one)")
    parser.add_argument("--sessions", default="",
                        help="concurrent sessions through the runtime, e.g. 1,2,4")
    parser.add_argument("--turns", type=int, default=5,
                        help="replies per session, the first a warm-up (--sessions)")
    parser.add_argument("--llm-gap", type=float, default=0.3,
                        help="seconds between a reply's text chunks (--sessions)")
    parser.add_argument("--stagger", type=float, default=0.7,
                        help="seconds between session starts (--sessions)")
    parser.add_argument("--compare", action="store_true",
                        help="also run first-come-first-rendered order (--sessions)")
    parser.add_argument("--rss", type=int, default=0,
                        help="render this many varied texts and print RSS over time")
    args = parser.parse_args(argv)

    from s2s import config
    from s2s.services.tts.worker import TtsStage

    stage = TtsStage(config.load({"tts_voice": args.voice}))
    t0 = time.perf_counter()
    stage.setup()
    load_s = time.perf_counter() - t0
    if args.rss:
        bench_rss(stage, args.rss)
        return 0
    if args.sessions:
        logging.basicConfig(format="%(relativeCreated)7.0f %(name)s %(message)s")
        logging.getLogger("s2s").setLevel(logging.WARNING)
        if os.environ.get("S2S_BENCH_DEBUG"):  # per piece: queued, rendered, due
            logging.getLogger("s2s.tts").setLevel(logging.DEBUG)
        print(f"{stage.describe()}; loaded in {load_s:.2f}s")
        bench_sessions(stage, [int(x) for x in args.sessions.split(",")], args.turns,
                       args.llm_gap, args.stagger, args.compare)
        return 0
    print(f"{stage.describe()}; loaded in {load_s:.2f}s; "
          f"output {args.out_rate or stage.rate} Hz; median of {args.repeat}\n")
    head = f"{'text':<8}{'seq':>4}{'chars':>7}{'first audio ms':>16}{'total ms':>10}" \
           f"{'audio s':>9}{'RTF':>7}"
    print(head)
    print("-" * len(head))
    for name, text in SENTENCES.items():
        for seq in (0, 1):
            runs = [asyncio.run(measure(stage, text, seq, args.out_rate))
                    for _ in range(args.repeat)]
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            audio = statistics.median(r[2] for r in runs)
            print(f"{name:<8}{seq:>4}{len(text):>7}{first * 1000:>16.0f}{total * 1000:>10.0f}"
                  f"{audio:>9.2f}{total / audio if audio else 0:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
