"""Prometheus for real: workers advertise a metrics address other hosts can reach, the
gateway's /sd lists them (Prometheus HTTP service discovery), and a real Prometheus (Debian's
`prometheus` package) started on the shipped deploy/prometheus/prometheus.yml finds and scrapes
a running stack. After a short `s2s bench`, every PromQL expression of the Grafana dashboard
returns data through Prometheus's HTTP API, and each panel's unit fits what it plots."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from s2s.netaddr import advertise_url, own_address, route_source

from .conftest import DATA, ROOT, Workers, gateway_process

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "s2s.json"
STAGES = ("vad", "stt", "llm", "tts")
PROMETHEUS = shutil.which("prometheus")


# --- the advertised address --------------------------------------------------------------
def test_advertise_setting_wins_in_every_form():
    assert advertise_url("10.1.2.3", "0.0.0.0", 9100) == "http://10.1.2.3:9100"
    assert advertise_url("w1.example:9200", "0.0.0.0", 9100) == "http://w1.example:9200"
    assert advertise_url("http://w1.example:9200/", "127.0.0.1", 9100) == "http://w1.example:9200"
    assert advertise_url("https://[2001:db8::1]", "::", 9100) == "https://[2001:db8::1]:9100"
    for bad in ("http://", "host:notaport"):
        with pytest.raises(SystemExit, match="invalid S2S_METRICS_ADVERTISE"):
            advertise_url(bad, "0.0.0.0", 9100)


def test_default_is_the_bound_address_or_the_route_to_redis():
    assert advertise_url("", "127.0.0.2", 9100) == "http://127.0.0.2:9100"
    assert advertise_url("", "::1", 9101) == "http://[::1]:9101"
    # bound to every address: the source address of this host's route to Redis
    assert advertise_url("", "0.0.0.0", 9100, "redis://127.0.0.1:6379/0") == "http://127.0.0.1:9100"
    assert own_address("redis://127.0.0.3:7000").startswith("127.")  # Redis here: so are we
    # a Redis on another network: the address of the interface that routes there, never loopback
    other = route_source("198.18.0.1")
    if other is None:
        pytest.skip("no route to 198.18.0.1 on this host (no default route)")
    assert own_address("redis://198.18.0.1:6379") == other and not other.startswith("127.")


# --- /sd on a light stack (runs before the module's model stack starts) ---------------------
def test_sd_skips_bad_members_and_drops_dead_workers(redis_url, tmp_path):
    import redis

    workers = Workers(redis_url, tmp_path)
    r = redis.Redis.from_url(redis_url)
    try:
        echo = workers.start("tests.stages:EchoStage")
        workers.wait_ready("echo")
        # registry members no Prometheus could scrape: logged and left out, the rest listed
        r.zadd("s2s:workers", {"stt|bad-1|not a url": time.time(),
                               "tts|bad-2|http://host:notaport": time.time()})
        with gateway_process(redis_url, tmp_path) as (http, _):
            groups = httpx.get(f"{http}/sd", timeout=5).json()
            assert sorted(g["labels"]["role"] for g in groups) == ["echo", "gateway"], groups
            (worker,) = [g for g in groups if g["labels"]["role"] == "echo"]
            assert httpx.get(f"http://{worker['targets'][0]}/healthz", timeout=5).json()[
                "stage"] == "echo"
            # killed outright (no goodbye): gone from /sd once its heartbeat is 5 s old
            echo.kill()
            echo.wait()
            deadline = time.monotonic() + 15
            while len(httpx.get(f"{http}/sd", timeout=5).json()) > 1:
                assert time.monotonic() < deadline, "a dead worker stayed in /sd"
                time.sleep(0.5)
    finally:
        workers.stop_all()
        r.close()


# --- a real stack, a real Prometheus -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("prom")
    workers = Workers(redis_server.url, tmp)
    try:
        for stage in STAGES:  # bound to 0.0.0.0 (the default): they advertise the route to Redis
            workers.start(stage)
        with gateway_process(redis_server.url, tmp) as (http, gateway):
            for stage in STAGES:
                workers.wait_ready(stage, timeout=300)
            yield type("Stack", (), {"http": http, "ws": http.replace("http", "ws", 1) + "/ws",
                                     "redis_url": redis_server.url, "tmp": tmp,
                                     "workers": workers})
    finally:
        workers.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sd_lists_the_gateway_and_every_live_worker(stack):
    groups = httpx.get(f"{stack.http}/sd", timeout=5).json()
    roles = sorted(g["labels"]["role"] for g in groups)
    assert roles == sorted(["gateway", *STAGES])
    for group in groups:
        (target,) = group["targets"]
        assert re.fullmatch(r"[^/:]+:\d+", target), target
        body = httpx.get(f"http://{target}/metrics", timeout=5).text
        assert "s2s_" in body, target
        if group["labels"]["role"] != "gateway":
            assert f's2s_model_load_seconds{{stage="{group["labels"]["role"]}"}}' in body
    assert [g["targets"][0] for g in groups if g["labels"]["role"] == "gateway"] == \
        [stack.http.removeprefix("http://")]


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    if not PROMETHEUS:
        pytest.skip("prometheus not installed (apt-get install prometheus; "
                    "scripts/install.sh --test)")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    # the shipped config, pointed at this stack's gateway, scraping every second
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["s2s"]["http_sd_configs"][0].update(url=f"{stack.http}/sd", refresh_interval="1s")
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        active = None
        while True:  # until every target is found through /sd and scraped
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                active = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
                up = {t["labels"]["job"] for t in active if t["health"] == "up"}
                if up >= {"gateway", *STAGES, "prometheus"}:
                    break
            except (httpx.HTTPError, ValueError):  # not listening yet, or 503 while its TSDB starts
                pass
            assert time.monotonic() < deadline, f"targets not all up: {active}"
            time.sleep(0.5)
        yield type("Prom", (), {"api": api, "log": tmp / "prometheus.log"})
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def query(api: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")]


# What each kind of expression plots, hence the unit its panel must have: latency quantiles
# and the model load time in seconds (Grafana "s", not ms), per-second rates "ops", rates
# times 60 per minute "opm", counts of things (sessions, entries, workers) "short".
def expected_unit(expr: str) -> str:
    if re.match(r"\s*count\b", expr):  # how many series: workers, targets
        return "short"
    if "histogram_quantile(" in expr or "s2s_model_load_seconds" in expr:
        return "s"
    if re.search(r"\brate\(", expr):
        return "opm" if re.search(r"\)\s*\*\s*60\b", expr) else "ops"
    return "short"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_dashboard_query_returns_data_after_a_bench(stack, prometheus):
    bench = subprocess.run(
        [sys.executable, "-m", "s2s", "bench", "--url", stack.ws, "--sessions", "1",
         "--turns", "2", "--gap", "5", "--no-warmup", "--json", "--wav", str(DATA / "jfk.wav"),
         "--redis-url", stack.redis_url], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bench.returncode == 0, bench.stderr[-3000:]
    level = json.loads(bench.stdout)["levels"][0]
    assert level["turns_answered"] >= 1, bench.stderr[-3000:]
    # per-stage breakdown: the bench found every worker through its advertised address
    assert set(level["server"]["stages"]) == set(STAGES), level["server"]
    time.sleep(3)  # a few more scrapes, so the last observations are in

    checked = 0
    for panel in dashboard_panels():
        unit = panel["fieldConfig"]["defaults"]["unit"]
        for target in panel["targets"]:
            expr = target["expr"]
            for var in ("$__rate_interval", "$__interval", "$__range"):
                expr = expr.replace(var, "2m")  # covers the whole bench
            assert "$" not in expr, f"unknown Grafana variable in {expr}"
            result = query(prometheus.api, expr)
            assert result, f"panel {panel['title']!r}: no data for {expr}"
            assert unit == expected_unit(expr), (panel["title"], unit, expr)
            values = [float(r["value"][1]) for r in result]
            if unit == "s":  # seconds, not ms: a turn or a model load takes well under a minute
                finite = [v for v in values if v == v]
                assert finite and all(0 <= v < 60 for v in finite), (panel["title"], values)
            checked += 1
    assert checked >= 25

    # the shipped alerting rules load and evaluate against the real series; with every stage
    # up none of the "stage down" alerts is pending or firing (a misspelt metric would fire)
    groups = httpx.get(f"{prometheus.api}/rules", timeout=5).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
    assert all(r["state"] == "inactive" for r in rules if r["name"] == "S2SStageDown"), rules
