"""Kubernetes probes through a Redis outage, against real processes.

The manifests once pointed liveness at /healthz, which answers 503 while Redis is away: with
failureThreshold 6 every 10 s, a Redis outage of a minute restarted every pod of the stack
(each worker reloading its model into the same outage, each gateway cutting its WebSockets).
Liveness is /livez now (the process: its event loop answers, its model is loaded) and
readiness stays /healthz (Redis). Here a real VAD worker and a real gateway run on a Redis
of their own; the Redis is killed for S2S_PROBE_OUTAGE_S seconds (15 by default, to keep CI
short) while a simulated kubelet runs the manifests' own probes (period, timeout and
failureThreshold read from deploy/k8s), then started again on the same port. No container
may be restarted, readiness must have said 503, and afterwards both are ready again and a
session opens and is owned by the VAD.

The full run, past the old liveness's 60 s (prints what each probe saw):

    S2S_PROBE_OUTAGE_S=90 python -m pytest tests/test_probes.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import httpx
import redis
import websockets
import yaml

from s2s import keys
from s2s.launcher.redis_server import RedisServer, free_port

from .conftest import ROOT, Workers, gateway_process

OUTAGE_S = float(os.environ.get("S2S_PROBE_OUTAGE_S", "15"))
K8S = ROOT / "deploy" / "k8s"
RECOVERY_S = 30.0  # after Redis is back: readiness must return within this


def container(name: str) -> dict:
    """The container of Deployment `name` in deploy/k8s/NAME.yaml (beside its Service)."""
    [deployment] = [d for d in yaml.safe_load_all((K8S / f"{name}.yaml").read_text())
                    if d and d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


@dataclass
class Probe:
    """One probe as the kubelet runs it: an HTTP GET every periodSeconds, failed when it is
    not 200-399 within timeoutSeconds; failureThreshold failures in a row act (liveness:
    the container is restarted; readiness: the pod leaves the Service's endpoints)."""
    what: str
    url: str
    period_s: float
    timeout_s: float
    failure_threshold: int
    restarts: bool  # liveness: acting restarts the container, which counts afresh
    next_at: float = 0.0
    results: list = field(default_factory=list)  # (seconds since the outage began, status)
    in_a_row: int = 0
    most_in_a_row: int = 0
    acted: int = 0  # restarts (liveness) or removals from the endpoints (readiness)

    @classmethod
    def of(cls, what: str, base: str, spec: dict, liveness: bool) -> "Probe":
        return cls(what, base + spec["httpGet"]["path"], float(spec.get("periodSeconds", 10)),
                   float(spec.get("timeoutSeconds", 1)), int(spec.get("failureThreshold", 3)),
                   liveness)

    def tick(self, client: httpx.Client, start: float) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = max(self.next_at + self.period_s, now)
        try:
            status = client.get(self.url, timeout=self.timeout_s).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        self.results.append((round(now - start, 1), status))
        if isinstance(status, int) and 200 <= status < 400:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.most_in_a_row = max(self.most_in_a_row, self.in_a_row)
        if self.in_a_row == self.failure_threshold:
            self.acted += 1
        if self.restarts and self.in_a_row >= self.failure_threshold:
            self.in_a_row = 0

    def failures(self) -> int:
        return sum(not (isinstance(s, int) and 200 <= s < 400) for _, s in self.results)

    def last_ok(self) -> bool:
        return bool(self.results) and self.results[-1][1] == 200

    def summary(self) -> str:
        return (f"{self.what:<34} {len(self.results):>3} probes  {self.failures():>3} failed  "
                f"{self.most_in_a_row:>2} in a row (threshold {self.failure_threshold})  "
                f"acted {self.acted}")


async def hello_and_owned(gateway_http: str, r: redis.Redis) -> str:
    """A session through the gateway (hello -> ready) that the VAD worker takes: its open
    entry is pending on a consumer of group vad."""
    async with websockets.connect(gateway_http.replace("http", "ws") + "/ws",
                                  compression=None) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ready["type"] == "ready", ready
        deadline = time.monotonic() + 10
        while r.xpending(keys.stage_stream("vad"), "vad")["pending"] < 1:
            assert time.monotonic() < deadline, "the VAD worker did not take the session"
            await asyncio.sleep(0.1)
        return ready["session_id"]


def test_a_redis_outage_restarts_nothing_and_readiness_recovers(tmp_path):
    vad_spec, gw_spec = container("vad"), container("gateway")
    server = RedisServer(appendonly=True).start()  # as deploy/k8s/redis.yaml: AOF on
    r = redis.Redis.from_url(server.url, socket_timeout=2)
    workers = Workers(server.url, tmp_path)
    metrics_port = free_port()
    try:
        vad = workers.start("vad", env={"S2S_METRICS_PORT": str(metrics_port),
                                        "S2S_METRICS_HOST": "127.0.0.1"})
        workers.wait_ready("vad", timeout=120)
        with gateway_process(server.url, tmp_path) as (gateway_http, gateway):
            worker_http = f"http://127.0.0.1:{metrics_port}"
            live = [Probe.of("vad liveness (/livez)", worker_http, vad_spec["livenessProbe"],
                             True),
                    Probe.of("gateway liveness (/livez)", gateway_http,
                             gw_spec["livenessProbe"], True)]
            ready = [Probe.of("vad readiness (/healthz)", worker_http,
                              vad_spec["readinessProbe"], False),
                     Probe.of("gateway readiness (/healthz)", gateway_http,
                              gw_spec["readinessProbe"], False)]
            # what the old manifests did: liveness numbers on /healthz
            old = [Probe.of("vad old liveness (/healthz)", worker_http,
                            {**vad_spec["livenessProbe"], "httpGet": {"path": "/healthz"}}, True),
                   Probe.of("gateway old liveness (/healthz)", gateway_http,
                            {**gw_spec["livenessProbe"], "httpGet": {"path": "/healthz"}},
                            True)]
            probes = live + ready + old
            assert {p.url.rsplit("/", 1)[1] for p in live} == {"livez"}
            with httpx.Client() as client:
                for p in probes:  # all well before the outage (/readyz: the same check)
                    assert client.get(p.url).status_code == 200, p.url
                    assert client.get(p.url.replace("/healthz", "/readyz")).status_code == 200

                server.kill()
                start = time.monotonic()
                while time.monotonic() - start < OUTAGE_S:
                    for p in probes:
                        p.tick(client, start)
                    time.sleep(0.05)
                during = {p.what: p.failures() for p in ready}
                server.start()  # the same port, the AOF's data
                back = time.monotonic()
                healthy: dict[str, float] = {}  # /healthz 200 again, seconds after Redis
                while not all(p.last_ok() for p in ready):
                    assert time.monotonic() - back < RECOVERY_S, [p.results[-3:] for p in ready]
                    for p in probes:
                        p.tick(client, start)
                    for p in ready:  # between the probes' periods: when it really recovers
                        if p.what not in healthy and client.get(p.url, timeout=1).status_code \
                                == 200:
                            healthy[p.what] = round(time.monotonic() - back, 1)
                    time.sleep(0.1)
                recovered_s = time.monotonic() - back

            print(f"\nRedis down {OUTAGE_S:g} s; /healthz 200 again {healthy} s after it "
                  f"returned, at the readiness probes {recovered_s:.1f} s after")
            for p in probes:
                print(p.summary())
            # no container would have been restarted: liveness never failed at all
            for p in live:
                assert p.acted == 0 and p.failures() == 0, (p.what, p.results)
            assert vad.poll() is None and gateway.poll() is None
            # readiness saw the outage (the pods leave the endpoints), and came back
            for p in ready:
                assert during[p.what] >= 1, (p.what, p.results)
            # the old liveness failed all along; past its threshold it restarted the pods
            for p in old:
                assert p.failures() >= 1, (p.what, p.results)
                if OUTAGE_S >= p.period_s * p.failure_threshold:
                    assert p.acted >= 1, (p.what, p.results)
            session = asyncio.run(hello_and_owned(gateway_http, r))
            assert session
    finally:
        workers.stop_all()
        r.close()
        server.stop()
