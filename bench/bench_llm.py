"""LLM backends: time to first token, time to first speakable chunk (p50, p95),
tokens/s, at 1, 2, 4 and 8 concurrent sessions; --soak: the worker's memory over
many multi-turn conversations.

    python -m s2s.bench.bench_llm --backend transformers,vllm,openai [--rounds 3]
    python -m s2s.bench.bench_llm --soak 300 --sessions 16    # RSS every 10 s

``openai`` starts its own `vllm serve` on the bundled model unless --openai-url
is given.  Targets on a 2-core CPU: first speakable chunk <= 300 ms with the
default backend; vllm >= 80 tokens/s aggregate at 4 sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

from s2s import config
from s2s.services.llm import history
from s2s.services.llm.backends import create
from s2s.services.llm.backends.model_files import resolve
from s2s.services.llm.chunker import Chunker
from s2s.services.llm.speakable import speakable

QUESTIONS = ["What is the capital of France?", "Tell me about the history of Rome.",
             "How do plants make food from sunlight?", "Why is the sky blue?"]


async def one_reply(backend, tokenizer, settings, question: str) -> dict:
    t0 = time.perf_counter()
    ctx = history.start_turn(None, 0, question, settings.llm_history_turns)
    msgs = history.messages(ctx, settings.llm_system_prompt)
    chunker, ttft, first_chunk, text = Chunker(), None, None, []
    async for piece in backend.stream(msgs, settings.llm_max_tokens, 0.0):
        ttft = ttft or time.perf_counter() - t0
        text.append(piece)
        if first_chunk is None and any(speakable(c) for c in chunker.feed(piece)):
            first_chunk = time.perf_counter() - t0
    if first_chunk is None and speakable(chunker.flush()):
        first_chunk = time.perf_counter() - t0
    tokens = len(tokenizer("".join(text), add_special_tokens=False).input_ids)
    return {"ttft": ttft or float("nan"), "chunk": first_chunk or float("nan"),
            "tokens": tokens, "wall": time.perf_counter() - t0}


async def measure(backend, tokenizer, settings, sessions: int, rounds: int) -> dict:
    runs, rates, combined = [], [], []
    for r in range(rounds):
        t0 = time.perf_counter()
        got = await asyncio.gather(*(one_reply(backend, tokenizer, settings,
                                               QUESTIONS[(r + i) % len(QUESTIONS)])
                                     for i in range(sessions)))
        # all tokens / time until the LAST reply ends (a long reply dominates) ...
        rates.append(sum(g["tokens"] for g in got) / (time.perf_counter() - t0))
        # ... and the sum of the sessions' own rates: the throughput while all generate
        combined.append(sum(g["tokens"] / g["wall"] for g in got))
        runs += got
    med = lambda k: statistics.median(g[k] for g in runs) * 1000  # noqa: E731
    chunks = sorted(g["chunk"] for g in runs)
    p95 = chunks[min(len(chunks) - 1, round(0.95 * (len(chunks) - 1)))] * 1000
    return {"ttft_ms": med("ttft"), "chunk_ms": med("chunk"), "chunk_p95_ms": p95,
            "tok_s": statistics.median(rates),
            "tok_s_concurrent": statistics.median(combined),
            "tok_s_session": statistics.median(g["tokens"] / g["wall"] for g in runs)}


SOAK_TURNS = ["Hi, my name is Sam and I like sailing.", "What is the capital of France?",
              "Tell me a fun fact about the ocean.", "Why do leaves change color?",
              "What did I say my name was?", "Can you recommend a book?",
              "How far away is the moon?", "What should I cook for dinner tonight?"]


def rss_mb() -> float:
    """This process's resident set size (MB)."""
    from .soak import rss_bytes

    return rss_bytes(os.getpid()) / 2**20


async def soak(backend, settings, sessions: int, seconds: float, every: float,
               warmup: float = 0.3) -> None:
    """Many sessions talk turn after turn (contexts grow to llm_history_turns, then
    slide): prints the process RSS over time, then the growth after warm-up (the
    first sample past ``warmup`` of the run: kernels, buffers and the prefix cache
    fill up first)."""
    t0, turns, samples = time.perf_counter(), 0, []

    async def talk(i: int) -> None:
        nonlocal turns
        ctx, turn = None, 0
        while time.perf_counter() - t0 < seconds:
            ctx = history.start_turn(ctx, turn, SOAK_TURNS[(i + turn) % len(SOAK_TURNS)],
                                     settings.llm_history_turns)
            reply = []
            async for piece in backend.stream(history.messages(ctx, settings.llm_system_prompt),
                                              settings.llm_max_tokens, 0.0):
                reply.append(piece)
            ctx = history.set_reply(ctx, turn, "".join(reply).strip())
            turn, turns = turn + 1, turns + 1

    async def sample() -> None:
        while True:
            prefix = getattr(backend, "prefix", None)
            prefix = prefix if hasattr(prefix, "bytes") else None
            samples.append((time.perf_counter() - t0, rss_mb()))
            print(f"{samples[-1][0]:7.0f} s  rss {samples[-1][1]:7.1f} MB  turns {turns:5d}"
                  + (f"  prefix cache {prefix.bytes / 2**20:5.1f} MB in {len(prefix.entries)}"
                     if prefix else ""), flush=True)
            await asyncio.sleep(every)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(talk(i) for i in range(sessions)))
    sampler.cancel()
    samples.append((time.perf_counter() - t0, rss_mb()))
    warm = next(s for s in samples if s[0] >= seconds * warmup)
    peak = max(r for t, r in samples if t >= warm[0])
    print(f"\n{sessions} sessions, {turns} turns in {samples[-1][0]:.0f} s; rss after warm-up "
          f"{warm[1]:.1f} MB, end {samples[-1][1]:.1f} MB ({(samples[-1][1] / warm[1] - 1) * 100:+.1f}%),"
          f" peak {peak:.1f} MB ({(peak / warm[1] - 1) * 100:+.1f}%)")


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    import httpx

    from s2s.launcher.redis_server import free_port

    port, tmp = free_port(), tempfile.mkdtemp(prefix="s2s-bench-vllm-")
    env = {**os.environ, "TMPDIR": tmp, "VLLM_CACHE_ROOT": tmp, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", model, "--enforce-eager", "--max-model-len", "2048",
                             "--port", str(port), "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("vllm serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="transformers", help="comma-separated backends")
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                    help="instead: run multi-turn conversations this long, print the RSS")
    ap.add_argument("--every", type=float, default=10, help="--soak: seconds between samples")
    ap.add_argument("--openai-url", default="", help="use this server instead of starting one")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    rows = []
    for name in args.backend.split(","):
        settings = config.load({"llm_backend": name, "llm_max_tokens": args.max_tokens})
        tokenizer = AutoTokenizer.from_pretrained(resolve(config.load({}, environ={})))
        server = None
        if name == "openai" and not args.openai_url:
            server, settings.llm_openai_base_url = start_server(resolve(settings))
        elif name == "openai":
            settings.llm_openai_base_url = args.openai_url
        backend = create(settings)
        t0 = time.perf_counter()
        backend.setup()
        load_s = time.perf_counter() - t0

        async def all_sizes() -> None:  # one event loop: vLLM's engine is bound to it
            if args.soak:
                return await soak(backend, settings, int(args.sessions.split(",")[-1]),
                                  args.soak, args.every)
            for n in map(int, args.sessions.split(",")):
                m = await measure(backend, tokenizer, settings, n, args.rounds)
                rows.append((name, n, load_s, m))
                print(f"{name} x{n}: {m}", file=sys.stderr, flush=True)
        try:
            asyncio.run(all_sizes())
        finally:
            backend.close()
            if server:
                server.terminate()
                server.wait(20)
    if args.soak:
        return
    print(f"\n{'backend':<13}{'sessions':>9}{'load s':>8}{'TTFT ms':>9}{'chunk p50':>11}"
          f"{'chunk p95':>11}{'tok/s total':>13}{'tok/s concurrent':>18}{'tok/s/session':>15}")
    for name, n, load_s, m in rows:
        print(f"{name:<13}{n:>9}{load_s:>8.1f}{m['ttft_ms']:>9.0f}{m['chunk_ms']:>11.0f}"
              f"{m['chunk_p95_ms']:>11.0f}{m['tok_s']:>13.1f}{m['tok_s_concurrent']:>18.1f}"
              f"{m['tok_s_session']:>15.1f}")
    print("chunk: time to the first speakable chunk (ms); tok/s total: all tokens / time "
          "until the last reply ended; tok/s concurrent: the sum of each session's own rate "
          "(throughput while all generate)")


if __name__ == "__main__":
    main()
