"""The autoscaling simulation (bench/autoscale.py, bench/autoscale_model.py,
bench/stub_stages.py).

The model tests check KEDA's and the HPA's arithmetic as read from deploy/k8s (targets,
tolerance, stabilisation windows, rate policies, min/max, activation) without a process.
The stub tests check that the STUB stages' times grow with their batches as the real ones
do.  The slow test runs ``python -m s2s.bench.autoscale --quick``: a real Redis, a real
gateway and real VAD workers, STUB STT/LLM/TTS workers, 16 sessions of real speech ramped
up and down, the HPA's rule applied every 3 s, processes started and SIGTERMed; it asserts
that each stage scaled out under the ramp and back in when idle, that nobody was refused
while the Deployments were below their max, and that every turn was answered.  The
stages' triggers read XLEN, not the group's lag: KEDA's reading of a lag (XINFO GROUPS) is
NULL, hence 0, whenever the bus has deleted the newest entry it delivered (the test of that)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import pytest
import yaml

from s2s.bench import autoscale, autoscale_model as model
from s2s.bench import stub_stages

from .conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


def keda_docs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "keda.yaml").read_text())
            if d and d["kind"] == "ScaledObject"}


# --- the manifests, as parsed ------------------------------------------------------------
def test_scalers_follow_the_manifests_with_kubernetes_defaults():
    docs = keda_docs()
    scalers = model.scalers(K8S)
    assert set(scalers) == set(docs) == {"gateway", "vad", "stt", "llm", "tts"}
    for name, s in scalers.items():
        spec = docs[name]["spec"]
        assert (s.min_replicas, s.max_replicas) == (spec["minReplicaCount"],
                                                    spec["maxReplicaCount"])
        assert s.polling_s == spec["pollingInterval"]
        meta = spec["triggers"][0]["metadata"]
        assert s.formula is None and len(s.triggers) == 1
        if name == "gateway":  # Prometheus' sum of the open sessions
            assert s.target == float(meta["threshold"])
        else:                  # the stages: XLEN, what is held plus what waits
            assert s.target == float(meta["streamLength"]) and "consumerGroup" not in meta
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert s.down.window_s == down["stabilizationWindowSeconds"]
        # what the manifests leave out is Kubernetes' default
        assert s.up.window_s == 0 and s.up.select == "Max"
        assert s.up.policies == [("Pods", 4, 15.0), ("Percent", 100, 15.0)]
    assert scalers["stt"].down.policies == [("Percent", 100, 15.0)]
    assert scalers["gateway"].down.policies == [("Pods", 1, 600.0)]
    # the bench's compression divides every window and period, nothing else
    fast = model.scalers(K8S, compress=10)
    assert fast["vad"].down.window_s == 30 and fast["gateway"].down.policies == [("Pods", 1, 60)]
    assert fast["vad"].target == 48 and fast["vad"].max_replicas == 8
    # ... but a window stays several HPA syncs long (here 60 s), or its own length if shorter
    floor = model.scalers(K8S, compress=10, min_window=60)
    assert [floor[d].down.window_s for d in ("stt", "vad", "gateway")] == [60, 60, 90]
    assert floor["stt"].up.window_s == 0 and floor["stt"].up.policies[0][2] == 1.5
    # the session scale divides the VAD's and gateway's targets
    assert scalers["vad"].scaled(8).target == 6 and scalers["gateway"].scaled(8).target == 18.75


def test_readings_are_what_kedas_redis_streams_scaler_reads():
    groups = [{"name": b"vad", "lag": 3}, {"name": b"tap", "lag": 9}]
    assert model.redis_streams_reading(groups, 7, 20, {"consumerGroup": "vad", "lagCount": "48"}) == 3
    assert model.redis_streams_reading(groups, 7, 20,
                                       {"consumerGroup": "vad", "pendingEntriesCount": "48"}) == 7
    assert model.redis_streams_reading([], None, 20, {"streamLength": "5"}) == 20
    assert model.redis_streams_reading([], None, 0, {"consumerGroup": "x", "lagCount": "1"}) == 0
    assert model.formula_value("pending + lag", {"pending": 4, "lag": 3}) == 7
    with pytest.raises(ValueError):
        model.formula_value("__import__('os')", {})


async def test_a_lag_redis_cannot_count_reads_as_zero_as_keda_reads_it(settings):
    """The bus deletes what it acknowledges (Bus.ack: XACK + XDEL).  Once the entry a group
    delivered last is deleted, XINFO GROUPS cannot count the group's lag and answers NULL,
    which KEDA's client (go-redis) reads as 0: the `lag` trigger then says nothing waits
    while entries do.  XLEN - pending still counts them (docs/scaling.md, the simulation)."""
    from s2s.bus import Bus

    bus = Bus(settings)
    stream, group = "s2s:stt", "stt"
    meta = {"stream": stream, "consumerGroup": group, "lagCount": "4"}
    try:
        await bus.ensure_group(stream, group)
        for i in range(10):
            await bus.redis.xadd(stream, {"f": b"%d" % i})
        got = await bus.read_group(stream, group, "worker", 4, 0)
        groups = await bus.groups(stream)
        assert groups[0]["lag"] == 6  # countable: nothing deleted yet
        await bus.ack(stream, group, got[-1][0])  # the newest delivered one: done first
        groups = await bus.groups(stream)
        pending = (await bus.redis.xpending(stream, group))["pending"]
        assert groups[0]["lag"] is None and pending == 3
        assert model.redis_streams_reading(groups, pending, 0, meta) == 0  # KEDA's reading
        assert await bus.redis.xlen(stream) - pending == 6                # what waits
        # and it stays so while older entries are still pending before the deleted one
        # (the group's read counter cannot be re-estimated over the hole)
        await bus.read_group(stream, group, "worker", 1, 0)
        groups = await bus.groups(stream)
        assert groups[0]["lag"] is None and groups[0]["entries-read"] is None
    finally:
        await bus.close()


# --- the HPA's arithmetic ----------------------------------------------------------------
def test_average_value_with_the_tolerance_as_tests_test_keda():
    hpa = model.Hpa(model.scalers(K8S)["vad"])
    # 48 a pod: the HPA ignores up to 10 % over the target, asks for a pod at 53
    assert [hpa.raw_desired(m, 1) for m in (0, 48, 52, 53, 97)] == [0, 1, 1, 2, 3]
    assert hpa.raw_desired(107, 2) == 3 and hpa.raw_desired(105, 2) == 2  # 96 held by two


def test_scale_up_is_immediate_and_rate_limited_by_the_default_policies():
    s = model.scalers(K8S)["llm"]
    hpa = model.Hpa(s)
    # 200 waiting at 1 pod wants 25: the max (8) caps it, but first +100 % / +4 a period
    assert hpa.sync(0, 200, 1) == 5        # max(1 + 4, 1 * 2)
    assert hpa.sync(5, 200, 5) == 5        # the same 15 s period: no more
    assert hpa.sync(16, 200, 5) == 8       # next period: +4 (or x2), capped at max 8
    assert hpa.last["why"] == "max"


def test_scale_down_waits_for_the_stabilisation_window():
    s = model.scalers(K8S, compress=10)["vad"]   # 300 s -> 30 s
    hpa = model.Hpa(s.scaled(8))                 # 6 sessions a pod
    t, replicas = 0.0, 1
    replicas = hpa.sync(t, 20, replicas)         # 20 sessions: 4 pods
    assert replicas == 4
    for t in range(15, 30, 3):                   # load gone, but within the window
        replicas = hpa.sync(t, 0, replicas)
        assert replicas == 4, t
    replicas = hpa.sync(31, 0, replicas)         # the window has passed the last high one
    assert replicas == 1 and hpa.last["why"] == "metric"


def test_the_gateway_goes_one_pod_per_policy_period():
    s = model.scalers(K8S, compress=10)["gateway"]  # window 90 s, 1 pod / 60 s
    hpa = model.Hpa(s)
    assert hpa.sync(0, 1000, 1) == 5            # +4 a period: 1 -> 5 (1000/150 -> 7)
    assert hpa.sync(2, 1000, 5) == 7
    replicas = 7
    for t in range(3, 92, 3):                    # idle: nothing moves inside the window
        replicas = hpa.sync(t, 0, replicas)      # (90 s after the last 7, at t=2)
    assert replicas == 7
    replicas = hpa.sync(93, 0, replicas)
    assert replicas == 6 and hpa.last["why"] == "scale-down policy"
    assert hpa.sync(120, 0, replicas) == 6       # one pod per 60 s
    assert hpa.sync(154, 0, 6) == 5


def test_keda_activation_only_moves_between_zero_and_one():
    obj = keda_docs()["stt"]
    obj["spec"]["minReplicaCount"] = 0
    s = model.Scaler.parse(obj)
    s.cooldown_s = 10
    hpa = model.Hpa(s)
    assert hpa.sync(0, 0, 0) == 0                # inactive at zero: stays
    assert hpa.sync(1, 40, 0) == 1               # active: KEDA makes it 1, not 10
    assert hpa.sync(2, 40, 1) == 5               # then the HPA: +4 a period (KEDA's 0 -> 1
    assert hpa.sync(18, 40, 5) == 8              # is not one of its events), capped at 8
    assert hpa.sync(20, 0, 1) == 1               # inactive, within the cooldown (10 s)
    assert hpa.sync(30, 0, 1) == 0               # past it: KEDA scales to zero


# --- the STUB stages ---------------------------------------------------------------------
def test_stub_times_grow_with_batches_as_the_measured_ones():
    one = stub_stages.stt_cost([3.0])
    assert 0.12 < one < 0.14                       # whisper tiny.en, a 3 s utterance
    assert stub_stages.stt_cost([3.0] * 2) == pytest.approx(1.33 * one)
    assert stub_stages.stt_cost([3.0] * 4) == pytest.approx(2.8 * one)
    assert stub_stages.stt_cost([3.0], 20) == pytest.approx(20 * one)
    assert stub_stages.llm_step(1) == pytest.approx(0.027)
    assert stub_stages.llm_step(8) == pytest.approx(0.068, abs=0.002)
    assert stub_stages.tts_cost(20) == pytest.approx(0.15) and 0.39 < stub_stages.tts_cost(65) < 0.41
    assert "STUB" in stub_stages.StubWhisper.name


def test_the_stub_llm_batches_replies_in_one_loop():
    from s2s.config import Settings

    os.environ["S2S_STUB_SLOWDOWN"] = "0.2"
    try:
        stage = stub_stages.StubLlm(Settings())
    finally:
        del os.environ["S2S_STUB_SLOWDOWN"]
    assert stage.slots == 8 and stage.concurrency == 8 + 32  # LlmStage's own rule
    assert "STUB" in stage.describe()
    backend = stage.backend

    async def reply() -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        async for _ in backend.stream([], 60, 0.0):
            n += 1
        return n, time.perf_counter() - t0

    async def run(k: int) -> list[tuple[int, float]]:
        return await asyncio.gather(*(reply() for _ in range(k)))

    (n1, alone), = asyncio.run(run(1))
    together = asyncio.run(run(8))
    assert n1 == len(backend.tokens) > 20 and all(n == n1 for n, _ in together)
    slowest = max(t for _, t in together)
    # eight replies batched take ~2.5x one (a step of 8 rows costs 68 ms against 27),
    # far less than eight one after the other
    assert 1.5 * alone < slowest < 5 * alone
    assert backend.running == 0 and all(r.closed for r in backend._active)


# --- the simulation ----------------------------------------------------------------------
def test_help_explains_and_the_profiles_resolve():
    out = subprocess.run([sys.executable, "-m", "s2s.bench.autoscale", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for words in ("STUB", "--quick", "--compress", "--session-scale", "--slowdown", "KEDA"):
        assert words in out.stdout, words
    import argparse

    p = argparse.ArgumentParser()
    autoscale.add_arguments(p)
    quick = autoscale.resolve(p.parse_args(["--quick", "--peak", "3"]))
    assert quick.profile == "quick" and quick.peak == 3 and quick.sync == 3
    full = autoscale.resolve(p.parse_args([]))
    assert full.profile == "full" and full.sync == model.SYNC_PERIOD_S and full.compress == 10


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_ramp_scales_every_stage_out_and_in_without_refusing_or_dropping(tmp_path):
    out, png = tmp_path / "autoscale.json", tmp_path / "autoscale.png"
    # the manifests' stage triggers read XLEN (what is held plus what waits), not the
    # group's lag, which a NULL (the test above) can blind: docs/scaling.md
    proc = subprocess.run(
        [sys.executable, "-m", "s2s.bench.autoscale", "--quick",
         "--json", str(out), "--plot", str(png), "--logdir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=560,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    report = json.loads(out.read_text())
    res = report["summary"]
    checks = res["checks"]
    for stage in autoscale.STAGES:
        assert checks["scaled_out"][stage], (stage, res["peak_replicas"])
    for name in autoscale.DEPLOYMENTS:
        assert checks["scaled_in_when_idle"][name], (name, res["final_replicas"])
    assert checks["no_refusal_below_max"], res["refusals"]
    assert checks["every_turn_answered"], res["turns"]
    assert res["turns"]["spoken"] >= 16 and res["peak_users"] >= 12
    # scale-in went through SIGTERM and a drain, never a kill
    assert res["pods"]["terminated"] >= 4 and res["pods"]["killed_after_grace"] == 0
    assert not res["pods"]["exited_unexpectedly"]
    # the samples carry what each scaler read
    sample = max(report["samples"], key=lambda s: s["deployments"]["vad"]["metric"])
    assert set(sample["deployments"]["stt"]["readings"]) == {"demand"}
    assert sample["deployments"]["vad"]["metric"] >= 7   # 6 a pod: asked for a second
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "TIMING STUBS" in proc.stdout
    assert png.stat().st_size > 20_000
    assert math.isfinite(res["voice_to_voice_ms"]["p95"])
