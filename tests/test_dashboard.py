"""The live latency page, ``/dashboard`` (gateway/dashboard*.py, gateway/static/dashboard*).

- test_windowed_quantiles_are_the_bench_s: the history's per-tick deltas and quantiles,
  fed real Prometheus text from prometheus_client, give what the bench's own helpers give
  for the same observations; a process first seen only sets its baseline, a restarted one
  (counters gone down) counts from zero, and memory stays bounded.
- test_data_needs_the_voice_page_s_credentials: a real gateway and a real worker: the page
  and uPlot are served, the data refuses no key and a wrong key (counted), and with the key
  it lists the registry's worker, up, and a registry member nobody can scrape, down.
- test_page_agrees_with_the_bench: the whole stack, the page open in Chromium while
  `s2s bench` runs; the turns, sessions and voice-to-voice p50/p95 the page shows agree
  with the bench's; a second gateway reading a real Prometheus (S2S_PROMETHEUS_URL) shows
  the same figures.  S2S_UPDATE_DOCS=1 refreshes docs/dashboard-live.png.
"""

from __future__ import annotations

import json
import os
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
    assert History.figures(history.since(-1), 20)["turns"] == 0

    # a paused sampler starts again from new baselines, not one huge tick
    a2.v2v.observe(0.3)
    history.rebase()
    assert history.add(30, [a2.process("a")]).rolling["turns"] == 0


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
