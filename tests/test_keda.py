"""deploy/k8s: KEDA scales the right thing, and the manifests are valid.

The scaler test loads a real Redis the way an overload does (real worker runtimes holding
entries in flight, more entries waiting) and reads exactly what KEDA's redis-streams scaler
reads (XLEN for the `streamLength` trigger of each stage: the bus deletes what it
acknowledges, so the stream holds what is worked on plus what waits), takes the
ScaledObject's target, and applies the HPA's rule for an AverageValue target. Under overload every stage asks for
more replicas; busy with nothing waiting it keeps its replicas (but a full VAD, past its
target, asks for more); idle, none asks for any. The VAD test goes through admission instead (real sessions through a real gateway, a real
VAD worker): KEDA's metric passes the VAD's target strictly before admission refuses anyone.
Validation: kubernetes-validate (the Kubernetes JSON schemas, strict) and KEDA's CRD models
(cloudcoil-models-keda), offline."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
import redis
import websockets
import yaml

from s2s import keys
from s2s.bus import FIELD
from s2s.config import Settings
from s2s.frames import ReplyText, SessionOpen, Transcript, Utterance, encode
from s2s.gateway.admission import VAD_SESSIONS_PER_WORKER

from .conftest import ROOT, Workers
from .stages import CrashSessionStage, EchoStage

K8S = ROOT / "deploy" / "k8s"
STAGES = ("vad", "stt", "llm", "tts")
HPA_TOLERANCE = 0.1  # kube-controller-manager's default --horizontal-pod-autoscaler-tolerance


# Worker stages named like the real ones, holding each item S2S_TEST_DELAY_S (in flight,
# pending in Redis) without loading a model: `s2s worker tests.test_keda:SlowStt`.
class SlowStt(EchoStage):
    name = "stt"


class SlowLlm(EchoStage):
    name = "llm"


class SlowTts(EchoStage):
    name = "tts"


SPECS = {"vad": "tests.stages:CrashSessionStage", "stt": "tests.test_keda:SlowStt",
         "llm": "tests.test_keda:SlowLlm", "tts": "tests.test_keda:SlowTts"}
assert CrashSessionStage.name == "vad"


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for resource in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / resource).read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def container_env(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- what KEDA reads and what the HPA does with it -------------------------------------------
def scaler_reading(r: redis.Redis, meta: dict[str, str]) -> int:
    """One redis-streams trigger's metric, as KEDA's scaler reads it: lagCount -> the group's
    lag in XINFO GROUPS; else, with a consumerGroup -> XPENDING's count; else XLEN."""
    if "lagCount" in meta:
        for group in r.xinfo_groups(meta["stream"]):
            if group["name"].decode() == meta["consumerGroup"]:
                return int(group["lag"])
        raise AssertionError(f"no group {meta['consumerGroup']} on {meta['stream']}")
    if "consumerGroup" in meta:
        return int(r.xpending(meta["stream"], meta["consumerGroup"])["pending"])
    return int(r.xlen(meta["stream"]))


def scaling(r: redis.Redis, obj: dict, current: int) -> dict:
    """The metric KEDA hands the HPA for this ScaledObject, whether KEDA calls it active, and
    the replicas the HPA would ask for with ``current`` replicas running (one trigger, no
    scalingModifiers: tests/test_deploy.py checks that shape)."""
    spec = obj["spec"]
    readings = {t["name"]: scaler_reading(r, t["metadata"]) for t in spec["triggers"]}
    (trigger,) = spec["triggers"]
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    value = float(readings[trigger["name"]])
    # KEDA's redis-streams scaler compares every mode's reading with activationLagCount
    activation = float(trigger["metadata"].get("activationLagCount", "0"))
    target = target_of(obj)
    if abs(value / (target * current) - 1) <= HPA_TOLERANCE:
        desired = current
    else:
        desired = math.ceil(value / target)
    desired = max(spec.get("minReplicaCount", 0), min(spec["maxReplicaCount"], desired))
    return {"readings": readings, "value": value, "desired": desired,
            "active": value > activation}


def held(r: redis.Redis, stage: str) -> list[int]:
    """Entries each worker of the stage holds (read, not acknowledged), fewest first."""
    owners = r.xpending(keys.stage_stream(stage), stage)["consumers"]
    return sorted(int(c["pending"]) for c in owners)


# --- the scalers on a loaded Redis ----------------------------------------------------------
def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def target_of(obj: dict) -> float:
    (trigger,) = obj["spec"]["triggers"]
    return float(trigger["metadata"]["streamLength"])


def test_every_stage_asks_for_more_replicas_under_overload_and_none_when_idle(redis_url,
                                                                               tmp_path):
    scaled = by_kind("ScaledObject")
    deployments = by_kind("Deployment")
    assert set(scaled) == {*STAGES, "gateway"}
    # the test workers take what a real one takes at once: for stt, llm and tts KEDA's
    # target (their slots, tests/test_deploy.py checks it against the code), for the VAD the
    # 64 sessions a worker owns (admission's cap; its target is 3/4 of that)
    slots = {stage: int(target_of(scaled[stage])) for stage in STAGES}
    slots["vad"] = VAD_SESSIONS_PER_WORKER
    for stage in STAGES:  # the stages' own concurrency, not an override
        assert "S2S_CONCURRENCY" not in container_env(deployments[stage]), stage
    r = redis.Redis.from_url(redis_url)
    workers = Workers(redis_url, tmp_path)
    env = {"S2S_TEST_DELAY_S": "3600", "S2S_SHUTDOWN_GRACE_S": "0.5", "S2S_BLOCK_MS": "200"}
    try:
        for stage in STAGES:
            workers.start(SPECS[stage], env={**env, "S2S_CONCURRENCY": str(slots[stage])})
        for stage in STAGES:
            workers.wait_ready(stage, timeout=60)
        wait_for(lambda: all(r.exists(keys.stage_stream(s)) for s in STAGES), "groups")

        # idle: nothing pending, nothing waiting -> not active, no stage asks for a replica
        for stage in STAGES:
            idle = scaling(r, scaled[stage], current=1)
            assert idle["readings"] == {"demand": 0}, (stage, idle)
            assert not idle["active"] and idle["desired"] == 1, (stage, idle)

        # overload: every slot of the one worker taken, and one worker's worth more waiting
        # (VAD: 64 sessions owned, 64 more open sessions nobody owns yet)
        for stage in STAGES:
            for i in range(2 * slots[stage]):
                sid = f"{stage}{i:03d}"
                frame = {"vad": SessionOpen(sid=sid),  # each stage's own input kind
                         "stt": Utterance(sid=sid, turn=1, pcm=bytes(3200), sr=16000),
                         "llm": Transcript(sid=sid, turn=1, text="hello"),
                         "tts": ReplyText(sid=sid, turn=1, text="hello")}[stage]
                r.xadd(keys.stage_stream(stage), {FIELD: encode(frame)})
        for stage in STAGES:
            wait_for(lambda: held(r, stage) == [slots[stage]], f"{stage} slots full")
        time.sleep(1)  # a worker with no free slot reads nothing more
        for stage in STAGES:
            loaded = scaling(r, scaled[stage], current=1)
            # what is held plus what waits (XPENDING alone would read slots[stage] and ask
            # for nothing more: the backlog would never show)
            assert held(r, stage) == [slots[stage]], stage
            assert loaded["readings"] == {"demand": 2 * slots[stage]}, stage
            # (the VAD: 128 sessions at 48 a pod ask for 3)
            assert loaded["active"] and loaded["desired"] == \
                math.ceil(2 * slots[stage] / target_of(scaled[stage])) >= 2, (stage, loaded)

        # KEDA starts a second worker: it takes what was waiting (VAD: the sessions beyond the
        # first worker's slots are owned now). All busy, nothing waiting: not idle, every
        # stage keeps its two replicas (lag-only scaling would read 0 and drop back to one).
        for stage in STAGES:
            workers.start(SPECS[stage], env={**env, "S2S_CONCURRENCY": str(slots[stage])})
        for stage in STAGES:
            workers.wait_ready(stage, count=2, timeout=60)
        for stage in STAGES:
            wait_for(lambda: held(r, stage) == [slots[stage]] * 2,
                     f"{stage}: the new worker reads")
        for stage in STAGES:
            busy = scaling(r, scaled[stage], current=2)
            assert busy["readings"] == {"demand": 2 * slots[stage]}, stage
            # a VAD with every slot taken is past its target: admission is about to refuse,
            # so it still asks for a third pod; the others hold their two
            assert busy["active"] and busy["desired"] == (3 if stage == "vad" else 2), \
                (stage, busy)
            # (a lag-only trigger read 0 here and asked for one worker: the flap, and for vad
            # the sessions beyond one worker's slots left unowned)
    finally:
        workers.stop_all()
        r.close()


# --- the VAD scales out before admission refuses --------------------------------------------
async def capacity_seen(gw, capacity: int, timeout: float = 30.0) -> None:
    """Until the gateway's admission counts `capacity` sessions (its picture of the live
    VAD workers is refreshed every second)."""
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            headroom = (await client.get(gw.http + "/healthz")).json()["headroom"]
            if headroom["capacity"] == capacity:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"admission never counted {capacity} sessions: {headroom}")


async def open_session(gw) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(gw.ws, compression=None)
    await ws.send(json.dumps({"type": "hello"}))
    return ws, json.loads(await ws.recv())


async def test_vad_scales_out_before_admission_refuses_anyone(redis_url, tmp_path):
    """With KEDA's VAD target equal to admission's cap (both 64 a worker), load could never
    push the metric past what the running pods hold: admission said "busy" first and the VAD
    never scaled. Real sessions through a real gateway's admission, a real VAD worker owning
    them: KEDA's reading (XLEN of s2s:vad:sessions, the HPA's rule) asks for a
    second pod strictly before admission refuses the first session, with room in between
    for the sessions that arrive while the pod starts; the second pod then lifts
    admission's cap and owns the sessions admitted after it."""
    from tests.test_admission import Gateway

    vad = by_kind("ScaledObject")["vad"]
    cap = VAD_SESSIONS_PER_WORKER
    r = redis.Redis.from_url(redis_url)
    workers = Workers(redis_url, tmp_path)
    sockets = []
    env = {"S2S_SHUTDOWN_GRACE_S": "0.5"}  # and no S2S_CONCURRENCY: the VAD's own slots
    try:
        workers.start("vad", env=env)
        await asyncio.to_thread(workers.wait_ready, "vad", 1, 120)
        async with Gateway(redis_url, principal_max_sessions=0) as gw:
            await capacity_seen(gw, cap)
            asked_at = refused_at = None
            for n in range(1, 2 * cap):
                ws, reply = await open_session(gw)
                if reply["type"] != "ready":
                    assert reply["type"] == "error" and reply["code"] == "busy", reply
                    await ws.close()
                    refused_at = n
                    break
                sockets.append(ws)
                keda = scaling(r, vad, current=1)
                assert keda["value"] == n, (n, keda)  # one entry per open session
                if asked_at is None and keda["desired"] > 1:
                    asked_at = n
            # KEDA asks for a second pod at 53 (48 a pod, past the HPA's 10 % tolerance);
            # admission still admits up to its cap of 64 a live worker and refuses the 65th:
            # 11 sessions arrive while the pod starts, none is refused meanwhile
            assert asked_at == int(target_of(vad) * (1 + HPA_TOLERANCE)) + 1 == 53, asked_at
            assert refused_at == cap + 1, refused_at
            assert refused_at - asked_at >= cap // 8

            # KEDA's answer: a second VAD pod. Admission counts it, the refused session is
            # admitted now, and the new pod owns it (nothing left unowned)
            workers.start("vad", env=env)
            await asyncio.to_thread(workers.wait_ready, "vad", 2, 120)
            await capacity_seen(gw, 2 * cap)
            ws, reply = await open_session(gw)
            assert reply["type"] == "ready", reply
            sockets.append(ws)
            await asyncio.to_thread(wait_for, lambda: held(r, "vad") == [1, cap],
                                    "the second VAD worker owns the new session")
            keda = scaling(r, vad, current=2)
            assert keda["readings"] == {"demand": cap + 1}, keda
            assert keda["desired"] == 2, keda  # 65 sessions on two pods: no third asked for
    finally:
        for ws in sockets:
            await ws.close()
        workers.stop_all()
        r.close()


# --- the manifests --------------------------------------------------------------------------
def test_manifests_validate_against_the_kubernetes_and_keda_schemas():
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    keda = pytest.importorskip("cloudcoil.models.keda.v1alpha1",
                               reason="pip install cloudcoil-models-keda")
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap",
                                         "PodDisruptionBudget", "ScaledObject"}
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            model = getattr(keda, doc["kind"])
            back = model.model_validate(doc).model_dump(by_alias=True, exclude_none=True)
            assert back == doc, f"{doc['kind']} {doc['metadata']['name']}: fields KEDA lacks"
        else:  # strict: unknown fields are errors, as the API server's field validation
            kv.validate(doc, kv.latest_version(), strict=True)
    # the checks can fail: a misspelt field is caught by both
    deployment = by_kind("Deployment")["stt"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(Exception, match="terminationGracePeriod"):
        kv.validate(deployment, kv.latest_version(), strict=True)
    scaled = by_kind("ScaledObject")["stt"]
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfg"] = scaled["spec"]["advanced"].pop(
        "horizontalPodAutoscalerConfig")
    back = keda.ScaledObject.model_validate(scaled).model_dump(by_alias=True, exclude_none=True)
    assert back != scaled


def test_workers_drain_gracefully_and_disruptions_take_one_pod_at_a_time():
    config = by_kind("ConfigMap")["s2s-config"]["data"]
    grace = float(config["S2S_SHUTDOWN_GRACE_S"])
    # in-flight work may finish: at least the longest turn (an utterance cut at its longest)
    assert grace >= Settings().vad_max_utterance_s
    deployments = by_kind("Deployment")
    pdbs = by_kind("PodDisruptionBudget")
    for name in (*STAGES, "gateway"):
        pod = deployments[name]["spec"]["template"]["spec"]
        # the runtime's grace, then deregistering, before the kubelet's SIGKILL
        assert pod["terminationGracePeriodSeconds"] >= grace + 10, name
        pdb = pdbs[name]["spec"]
        assert pdb["selector"]["matchLabels"] == deployments[name]["spec"]["selector"][
            "matchLabels"]
        assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb, name
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    for stage in STAGES:  # workers advertise their pod's address for /sd, /healthz, bench
        env = container_env(deployments[stage])
        assert env["S2S_METRICS_ADVERTISE"] == "$(POD_IP)"


def test_redis_fails_safe_and_claims_no_cluster_support():
    text = (K8S / "redis.yaml").read_text()
    args = by_kind("Deployment")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--appendonly"] == "yes" and pairs["--maxmemory-policy"] == "noeviction"
    assert "Cluster works" not in text and "does\n# NOT work" in text
    volumes = by_kind("Deployment")["redis"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] in by_kind("PersistentVolumeClaim")
