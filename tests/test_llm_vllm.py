"""The vllm backend (in-process engine, in a subprocess of its own because vLLM
spawns processes) and the openai backend against a real `vllm serve`.  Skipped
when vLLM is not installed (scripts/install.sh --vllm)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# the scenario helpers live in tests/test_llm.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the first test's setup starts both vLLMs (minutes on a loaded 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed: scripts/install.sh --vllm")]


def vllm_env(tmp: Path) -> dict:
    # vLLM leaves sockets and caches in $TMPDIR and ~/.cache: keep them private
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmp"), "VLLM_CACHE_ROOT": str(tmp / "cache"),
            "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# --- vllm: the scenarios run in `python tests/test_llm_vllm.py REDIS_URL OUT.json SERVE_URL` ---
@pytest.fixture(scope="module")
def vllm_results(redis_server, vllm_server, tmp_path_factory):
    # `vllm serve` (for the openai backend below) boots while this engine does: their
    # starts overlap, and the scenarios here run once it is up, on an otherwise idle machine
    tmp = tmp_path_factory.mktemp("vllm")
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, __file__, redis_server.url, str(out),
                           vllm_server.url], env=vllm_env(tmp), capture_output=True, text=True,
                          timeout=460)
    if proc.returncode:
        pytest.fail(f"vllm scenarios failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_vllm_answers_remembers_and_stops_on_barge_in(vllm_results):
    from test_llm import assert_scenarios

    r = vllm_results
    print(f"\nvllm first chunk {r['paris']['first_chunk_s'] * 1000:.0f} ms, barge-in stop "
          f"{r['barge']['stop_s'] * 1000:.0f} ms")
    assert_scenarios(r["paris"], r["context"], r["barge"])


def test_vllm_batches_concurrent_sessions(vllm_results):
    """Four replies at once are decoded together: each has its first piece before any of
    them is finished (one after another, the fourth would start after the first ended).
    Their speed is the benchmark's business (bench/bench_llm.py), not a timed assertion."""
    r = vllm_results["batching"]
    print(f"\nvllm tokens/s: 4 sessions {r['four']:.1f}")
    windows = r["four_windows"]
    assert len(windows) == 4 and all(n > 8 for _, _, n in windows), windows
    assert max(first for first, _, _ in windows) < min(last for _, last, _ in windows), windows


async def _vllm_main(redis_url: str, out: str, serve_url: str) -> None:
    from s2s.worker import Runtime
    from s2s.services.llm.worker import LlmStage
    from test_llm import (llm_settings, scenario_barge_in, scenario_context, scenario_paris)

    import redis
    redis.Redis.from_url(redis_url).flushall()
    stage = LlmStage(llm_settings(redis_url, "vllm"))
    stage.setup()
    await asyncio.to_thread(serving, serve_url, 240)  # its start would slow these scenarios
    rt = Runtime(stage, stage.settings)
    try:
        results = {"paris": await scenario_paris(rt), "context": await scenario_context(rt),
                   "barge": await scenario_barge_in(rt)}
        # 32 tokens a reply: each is well past its first piece (> 8) while the others run
        four, windows = await tokens_per_s(stage.backend, 4, max_tokens=32)
        results["batching"] = {"four": four, "four_windows": windows}
    finally:
        await rt.bus.close()
        stage.backend.close()
    Path(out).write_text(json.dumps(results, default=str))


async def tokens_per_s(backend, sessions: int, max_tokens: int = 64
                       ) -> tuple[float, list[tuple[float, float, int]]]:
    """Aggregate generated tokens per second with `sessions` replies at once, and each
    reply's (first piece, last piece, tokens), in seconds from the start."""
    t0 = time.monotonic()

    async def one(i: int) -> tuple[float, float, int]:
        msgs = [{"role": "user", "content": f"Tell me a long story about dragon number {i}."}]
        pieces, first = [], None
        async for piece in backend.stream(msgs, max_tokens, 0.0):
            first = first if first is not None else time.monotonic() - t0
            pieces.append(piece)
        tokens = len(backend.tokenizer("".join(pieces), add_special_tokens=False).input_ids)
        return first or 0.0, time.monotonic() - t0, tokens

    windows = await asyncio.gather(*(one(i) for i in range(sessions)))
    return sum(n for _, _, n in windows) / (time.monotonic() - t0), list(windows)


# --- openai: the backend in this process, against `vllm serve` ---------------------------
def serving(url: str, timeout: float) -> bool:
    """Until `vllm serve` at ``url`` lists its model (False: not in ``timeout`` s)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`vllm serve` started (not yet ready: vllm_serve_url waits for it)."""
    from s2s.launcher.redis_server import free_port
    from s2s.services.llm.backends.model_files import resolve
    from test_llm import llm_settings

    model = resolve(llm_settings("redis://unused", "vllm"))
    tmp, port = tmp_path_factory.mktemp("vllm-serve"), free_port()
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", model, "--enforce-eager", "--max-model-len", "2048",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=vllm_env(tmp), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield type("Serve", (), {"url": f"http://127.0.0.1:{port}/v1", "proc": proc,
                                 "log": tmp / "server.log"})
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def vllm_serve_url(vllm_server):
    deadline = time.monotonic() + 240
    while not serving(vllm_server.url, 1):
        if vllm_server.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("vllm serve did not start:\n" +
                        vllm_server.log.read_text(errors="replace")[-4000:])
    return vllm_server.url


async def test_openai_backend_against_vllm_serve(vllm_serve_url, redis_url):
    from s2s.worker import Runtime
    from s2s.services.llm.worker import LlmStage
    from test_llm import assert_scenarios, llm_settings, scenario_barge_in, scenario_context, \
        scenario_paris

    stage = LlmStage(llm_settings(redis_url, "openai", llm_openai_base_url=vllm_serve_url))
    stage.setup()  # model name: the first the server lists
    rt = Runtime(stage, stage.settings)
    try:
        paris, context = await scenario_paris(rt), await scenario_context(rt)
        barge = await scenario_barge_in(rt)
    finally:
        await rt.bus.close()
    print(f"\nopenai first chunk {paris['first_chunk_s'] * 1000:.0f} ms, barge-in stop "
          f"{barge['stop_s'] * 1000:.0f} ms")
    assert_scenarios(paris, context, barge)


if __name__ == "__main__":  # the vllm scenarios, run by the vllm_results fixture
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
    asyncio.run(_vllm_main(sys.argv[1], sys.argv[2], sys.argv[3]))
