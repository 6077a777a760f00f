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

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed: scripts/install.sh --vllm")]


def vllm_env(tmp: Path) -> dict:
    # vLLM leaves sockets and caches in $TMPDIR and ~/.cache: keep them private
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmp"), "VLLM_CACHE_ROOT": str(tmp / "cache"),
            "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# --- vllm: the scenarios run in `python tests/test_llm_vllm.py REDIS_URL OUT.json` ---------
@pytest.fixture(scope="module")
def vllm_results(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, __file__, redis_server.url, str(out)],
                          env=vllm_env(tmp), capture_output=True, text=True, timeout=280)
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
    r = vllm_results["batching"]
    print(f"\nvllm tokens/s: 1 session {r['single']:.1f}, 4 sessions {r['four']:.1f}")
    assert r["four"] >= 2 * r["single"], r


async def _vllm_main(redis_url: str, out: str) -> None:
    from s2s.worker import Runtime
    from s2s.services.llm.worker import LlmStage
    from test_llm import (llm_settings, scenario_barge_in, scenario_context, scenario_paris)

    import redis
    redis.Redis.from_url(redis_url).flushall()
    stage = LlmStage(llm_settings(redis_url, "vllm"))
    stage.setup()
    rt = Runtime(stage, stage.settings)
    try:
        results = {"paris": await scenario_paris(rt), "context": await scenario_context(rt),
                   "barge": await scenario_barge_in(rt),
                   "batching": {"single": await tokens_per_s(stage.backend, 1),
                                "four": await tokens_per_s(stage.backend, 4)}}
    finally:
        await rt.bus.close()
        stage.backend.close()
    Path(out).write_text(json.dumps(results, default=str))


async def tokens_per_s(backend, sessions: int, max_tokens: int = 64) -> float:
    """Aggregate generated tokens per second with `sessions` replies at once."""
    async def one(i: int) -> int:
        msgs = [{"role": "user", "content": f"Tell me a long story about dragon number {i}."}]
        text = "".join([p async for p in backend.stream(msgs, max_tokens, 0.0)])
        return len(backend.tokenizer(text, add_special_tokens=False).input_ids)
    t0 = time.monotonic()
    counts = await asyncio.gather(*(one(i) for i in range(sessions)))
    return sum(counts) / (time.monotonic() - t0)


# --- openai: the backend in this process, against `vllm serve` ---------------------------
@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    import httpx

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
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("vllm serve did not start:\n" +
                            (tmp / "server.log").read_text(errors="replace")[-4000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def test_openai_backend_against_vllm_serve(vllm_server, redis_url):
    from s2s.worker import Runtime
    from s2s.services.llm.worker import LlmStage
    from test_llm import assert_scenarios, llm_settings, scenario_barge_in, scenario_context, \
        scenario_paris

    stage = LlmStage(llm_settings(redis_url, "openai", llm_openai_base_url=vllm_server))
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
    asyncio.run(_vllm_main(sys.argv[1], sys.argv[2]))
