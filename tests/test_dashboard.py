"""The live latency page, ``/dashboard`` (gateway/dashboard*.py, gateway/static/dashboard*).

- test_windowed_quantiles_are_the_bench_s: the history's per-tick deltas and quantiles,
  fed real Prometheus text from prometheus_client, give what the bench's own helpers give
  for the same observations; a process first seen only sets its baseline, a restarted one
  (counters gone down) counts from zero, and memory stays bounded.
- test_data_needs_the_voice_page_s_credentials: a real gateway and a real worker: the page
  and uPlot are served, the data refuses no key and a wrong key (counted), and with the key
  it lists the registry's worker, up, and a registry member nobody can scrape, down.
- test_up_prints_a_dashboard_url_that_logs_in: `s2s up` prints ``dashboard: …#key=…``
  next to its ready line; that key opens the data, nothing else does.
- test_page_agrees_with_the_bench: the whole stack, the page open in Chromium while
  `s2s bench` runs; the turns, sessions and voice-to-voice p50/p95 the page shows agree
  with the bench's; a second gateway reading a real Prometheus (S2S_PROMETHEUS_URL) shows
  the same figures.  S2S_UPDATE_DOCS=1 refreshes docs/dashboard-live.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from s2s.bench.loadgen import hist_delta, hist_quantile, parse_histograms
from s2s.gateway.dashboard_history import V2V, History, buckets, quantile
from s2s.gateway.dashboard_source import Process, parse_text
from s2s.metrics import LATENCY_BUCKETS

from .conftest import DATA, ROOT, TEST_API_KEY, Workers, gateway_process

SCREENSHOT = ROOT / "docs" / "dashboard-live.png"
STAGES = ("vad", "stt", "llm", "tts")
CHROMIUM = os.environ.get("S2S_CHROMIUM", "/usr/bin/chromium")


# --- the arithmetic, on real exposition text -------------------------------------------
class FakeProcess:
    """A real prometheus_client registry with the gateway's voice-to-voice histogram and
    session counter: what one process's /metrics shows."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.v2v = Histogram(V2V, "v2v", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sessions = Counter("s2s_sessions", "sessions", registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def process(self, key: str) -> Process:
        return Process(key, "gateway", key, series=parse_text(self.text()))


def test_windowed_quantiles_are_the_bench_s():
    history = History(keep=5, window_s=100)
    a = FakeProcess()
    a.v2v.observe(9.0)  # before the first tick: a baseline, never counted
    history.add(0, [a.process("a")])
    before = a.text()
    for v in (0.31, 0.52, 0.74, 0.88, 1.3, 2.2):
        a.v2v.observe(v)
    a.sessions.inc(2)
    b = FakeProcess()
    b.v2v.observe(5.0)  # a process that appears later: its past is not this window's
    point = history.add(1, [a.process("a"), b.process("b")])
    after = a.text()
    assert point.rolling["turns"] == 6 and point.rolling["sessions_opened"] == 2
    delta = hist_delta(parse_histograms(after, V2V), parse_histograms(before, V2V))
    for q, key in ((0.5, "v2v_p50_ms"), (0.95, "v2v_p95_ms")):
        assert point.rolling[key] == round(hist_quantile(q, delta) * 1000, 1)
    # within the bucket that holds the rank (the 3rd of 6, 0.74 s: 0.6-0.75), like
    # histogram_quantile
    assert 600 < point.rolling["v2v_p50_ms"] <= 750

    # process a restarts (fresh registry, same address): its new counts are the increase
    a2 = FakeProcess()
    a2.v2v.observe(0.2)
    b.v2v.observe(0.4)
    point = history.add(2, [a2.process("a"), b.process("b")])
    assert point.rolling["turns"] == 8  # window holds ticks 1 and 2: 6 + 1 + 1
    tick = buckets(point.counts, V2V)[""]
    assert quantile(1.0, tick) <= 0.5 and tick[-1][1] == 2

    # bounded: old points leave the deque, the range summary covers what is kept
    for t in range(3, 20):
        history.add(t, [a2.process("a"), b.process("b")])
    assert len(history.points) == 5
    assert history.figures(history.since(-1), 20)["turns"] == 0

    # a turn slower than every finite bucket: the highest bound, as histogram_quantile
    # (the buckets that did not grow still count, though only increments are kept)
    a2.v2v.observe(12.0)
    assert history.add(21, [a2.process("a"), b.process("b")]).rolling["v2v_p50_ms"] == 10000

    # a paused sampler starts again from new baselines, not one huge tick
    a2.v2v.observe(0.3)
    history.rebase()
    assert history.add(30, [a2.process("a")]).counts == {}


# --- credentials and the registry, on a light stack ----------------------------------------
def test_data_needs_the_voice_page_s_credentials(redis_url, tmp_path):
    workers = Workers(redis_url, tmp_path)
    r = redis.Redis.from_url(redis_url)
    try:
        workers.start("tests.stages:EchoStage")
        workers.wait_ready("echo")
        with gateway_process(redis_url, tmp_path) as (http, _):
            page = httpx.get(f"{http}/dashboard", timeout=5)
            assert page.status_code == 200 and "uPlot.iife.min.js" in page.text
            lib = httpx.get(f"{http}/static/vendor/uPlot.iife.min.js", timeout=5)
            assert lib.status_code == 200 and "leeoniya/uPlot (v1.6.32)" in lib.text[:200]

            data = f"{http}/dashboard/data"
            none = httpx.get(data, timeout=5)
            assert none.status_code == 401 and none.json()["message"] == "no credential"
            wrong = httpx.get(data, headers={"Authorization": "Bearer nope"}, timeout=5)
            assert wrong.status_code == 401 and wrong.json()["message"] == "unknown API key"
            key = {"Authorization": f"Bearer {TEST_API_KEY}"}
            bad = httpx.get(data, params={"range": "soon"}, headers=key, timeout=5)
            assert bad.status_code == 400 and "range" in bad.json()["message"]
            # a registry member nobody can scrape: listed, down, the rest unharmed
            r.zadd("s2s:workers", {"stt|ghost-1|http://127.0.0.1:9": time.time() + 30})
            deadline = time.monotonic() + 20
            while True:
                body = httpx.get(data, headers=key, timeout=5).json()
                rows = {w["worker"]: w for w in body["live"]["workers"]}
                if len(rows) >= 3 and body["points"] >= 2:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.5)
            assert body["source"] == "registry" and body["sampling"]
            assert rows["gateway"]["up"] and rows["ghost-1"]["up"] is False
            assert "ConnectError" in rows["ghost-1"]["error"]
            (echo,) = [w for w in rows.values() if w["role"] == "echo"]
            assert echo["up"] and echo["in_flight"] == 0
            # the refusals above, counted like any other refused input
            metrics = httpx.get(f"{http}/metrics", timeout=5).text
            assert 's2s_rejected_inputs_total{reason="unauthorized"} 2.0' in metrics
            assert 's2s_rejected_inputs_total{reason="bad_message"} 1.0' in metrics
            assert TEST_API_KEY not in (tmp_path / "gateway.log").read_text(errors="replace")
    finally:
        workers.stop_all()
        r.close()


# --- `s2s up` prints the page's URL, and that URL logs in -------------------------------------
def test_up_prints_a_dashboard_url_that_logs_in(tmp_path):
    import re
    import signal

    from s2s.launcher.redis_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2S_")}  # its own key
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "s2s", "up", "--port", str(port),
                                 "--stages", "tests.stages:EchoStage"], cwd=ROOT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"^dashboard: (\S+)$", log.read_text(), re.M)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        url, _, fragment = m[1].partition("#key=")
        assert url == f"http://127.0.0.1:{port}/dashboard" and fragment
        assert f"ready: http://127.0.0.1:{port}/#key={fragment}" in log.read_text()
        assert "uPlot" in httpx.get(url, timeout=5).text
        data = url + "/data"
        assert httpx.get(data, timeout=5).status_code == 401
        body = httpx.get(data, headers={"Authorization": f"Bearer {fragment}"}, timeout=5)
        assert body.status_code == 200 and body.json()["source"] == "registry"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the whole stack, the page in Chromium, s2s bench, and a Prometheus ---------------------
try:
    from playwright.sync_api import sync_playwright  # noqa: F401 (test_web's browser uses it)
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None


@contextlib.contextmanager
def prometheus(sd_url: str, tmp: Path):
    """A real Prometheus on the shipped deploy/prometheus/prometheus.yml, its /sd pointed at
    ``sd_url``, scraping every second; yields its URL once every stage is scraped."""
    from s2s.launcher.redis_server import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (scripts/install.sh --test)")
    port = free_port()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files", None)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["s2s"]["http_sd_configs"][0].update(url=sd_url, refresh_interval="1s")
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                active = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]
                if {t["labels"]["job"] for t in active["activeTargets"]
                        if t["health"] == "up"} >= {"gateway", *STAGES}:
                    break
            assert time.monotonic() < deadline, "Prometheus did not scrape every stage"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def page_state(page) -> dict:
    return page.evaluate("() => ({updates: window.s2sDashboard.updates, "
                         "error: window.s2sDashboard.error, last: window.s2sDashboard.last})")


def shown(page, element_id: str) -> float | None:
    """A figure as the page shows it (its data-value), None when it shows none."""
    raw = page.get_attribute(f"#{element_id}", "data-value")
    return float(raw) if raw else None


def bucket_width(seconds: float) -> float:
    bounds = (0.0, *LATENCY_BUCKETS)
    for lo, hi in zip(bounds, bounds[1:]):
        if seconds <= hi:
            return hi - lo
    return float("inf")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or sync_playwright is None,
                    reason=f"needs Chromium at {CHROMIUM} and the playwright package "
                           "(scripts/install.sh --browser)")
def test_page_agrees_with_the_bench(redis_url, workers, tmp_path):
    from .test_web import browser

    for stage in STAGES:
        workers.start(stage)
    key = {"Authorization": f"Bearer {TEST_API_KEY}"}
    (tmp_path / "prom-gateway").mkdir()
    with gateway_process(redis_url, tmp_path) as (http, _):
        for stage in STAGES:
            workers.wait_ready(stage, timeout=300)
        with prometheus(f"{http}/sd", tmp_path) as prom, \
                gateway_process(redis_url, tmp_path / "prom-gateway",
                                env={"S2S_PROMETHEUS_URL": prom}) as (http_prom, _), \
                browser(tmp_path) as page:
            page.set_viewport_size({"width": 1280, "height": 1000})
            page.goto(f"{http}/dashboard#key={TEST_API_KEY}")  # what `s2s up` prints
            assert page.evaluate("() => location.hash") == ""  # the key left the address bar
            from_prom = f"{http_prom}/dashboard/data"

            def ready(body: dict) -> bool:
                return body["points"] >= 2 and all(
                    body["live"]["stages"][s]["workers"] == 1 for s in STAGES)

            deadline = time.monotonic() + 60  # both samplers have their baselines
            while not (page_state(page)["last"] and ready(page_state(page)["last"])
                       and ready(httpx.get(from_prom, headers=key, timeout=5).json())):
                assert time.monotonic() < deadline, (page_state(page), page.console[-10:])
                page.wait_for_timeout(500)

            # one turn: the page's figures are checked against the bench's over the same
            # turns, however many (a second jfk.wav took 16 s more)
            bench = subprocess.Popen(
                [sys.executable, "-m", "s2s", "bench", "--url", http.replace("http", "ws", 1)
                 + "/ws", "--sessions", "1", "--turns", "1", "--gap", "5", "--no-warmup",
                 "--turn-timeout", "180",  # a CI machine shared with other jobs is slow
                 "--json", "--wav", str(DATA / "jfk.wav"), "--redis-url", redis_url],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            seen_open, seen_in_flight, polls = 0.0, 0.0, 0
            while bench.poll() is None:  # the page, live, while the bench talks
                last = page_state(page)["last"] or {}
                if last:
                    seen_open = max(seen_open, last["live"]["sessions_open"])
                    seen_in_flight = max(seen_in_flight, sum(
                        st["in_flight"] for st in last["live"]["stages"].values()))
                if polls % 10 == 0:  # keeps the Prometheus-fed sampler watched too
                    httpx.get(from_prom, headers=key, timeout=5)
                polls += 1
                page.wait_for_timeout(500)
            out, err = bench.communicate(timeout=30)
            assert bench.returncode == 0, err[-3000:]
            level = json.loads(out)["levels"][0]
            server = level["server"]["voice_to_voice_ms"]
            assert level["turns_answered"] >= 1 and server["count"] >= level["turns_answered"]
            # >= 1: a client that reconnects (a loaded machine misses heartbeats) resumes
            # on a second connection while the first is still being closed
            assert seen_open >= 1, "the open session never showed"
            assert seen_in_flight >= 1, "no in-flight work showed while the bench ran"

            # the next samples hold every turn: the page's figures are the bench's
            deadline = time.monotonic() + 30
            while shown(page, "turns") != server["count"]:
                assert time.monotonic() < deadline, (shown(page, "turns"), server)
                page.wait_for_timeout(500)
            page.wait_for_timeout(2500)  # one more poll: p50/p95 of the same turns
            # sessions opened: the gateway's own counter (resumed connections included)
            opened = parse_text(httpx.get(f"{http}/metrics", timeout=5).text)[
                ("s2s_sessions_total", ())]
            assert shown(page, "sessions-opened") == opened >= level["sessions"] == 1
            client = level["voice_to_voice_ms"]
            for q in ("p50", "p95"):
                ours = shown(page, f"v2v-{q}")
                # the same histogram over the same turns as the bench's own quantile
                assert ours == pytest.approx(server[q], abs=0.11), (q, ours, server)
                # and the client's measure, within its spread and the bucket's resolution
                spread = client["max"] - client["p50"] + bucket_width(client[q] / 1000) * 1000
                assert abs(ours - client[q]) <= spread, (q, ours, client)
            for stage in STAGES:  # each stage's queue wait and processing time is shown
                cells = page.inner_text(f"#stages tr[data-stage={stage}]").split("\t")
                assert cells[1] == "1" and "–" not in cells[5:9], (stage, cells)
                assert level["server"]["stages"][stage]["processing_ms"]["count"] >= 1
            assert page.inner_text("#conn") == "Live"
            print(f"page: turns {shown(page, 'turns'):.0f}, sessions opened {opened:.0f}, "
                  f"v2v p50 {shown(page, 'v2v-p50')} p95 {shown(page, 'v2v-p95')} ms; bench: "
                  f"gateway histogram {server}, client {client}, "
                  f"answered {level['turns_answered']}/{level['turns_expected']}")

            # a gateway reading Prometheus instead shows the same figures
            deadline = time.monotonic() + 30
            while True:
                body = httpx.get(from_prom, headers=key, timeout=5).json()
                if body["summary"]["turns"] == server["count"]:
                    break
                assert time.monotonic() < deadline, body["summary"]
                time.sleep(1)
            assert body["source"] == "prometheus" and not body["error"]
            summary = body["summary"]
            assert summary["sessions_opened"] == opened
            assert summary["v2v_p50_ms"] == pytest.approx(server["p50"], abs=0.11)
            assert summary["v2v_p95_ms"] == pytest.approx(server["p95"], abs=0.11)
            assert {w["role"] for w in body["live"]["workers"] if w["up"]} >= {"gateway",
                                                                                *STAGES}

            save = [tmp_path / "dashboard-live.png"]
            if os.environ.get("S2S_UPDATE_DOCS") == "1":
                save.append(SCREENSHOT)
            for path in save:
                page.screenshot(path=str(path), full_page=True)
            errors = [m for m in page.console if m.startswith(("pageerror", "error"))]
            assert not errors, errors
