"""Where the live dashboard's numbers come from: the raw ``s2s_*`` series of every process,
as cumulative values, one collection per sampling tick.

Two sources give the same shape (a list of ``Process``):

- ``RegistrySource`` (the default): the workers the gateway already knows, the liveness
  registry behind ``/sd``; each one's ``/metrics`` is scraped over HTTP and parsed with
  prometheus_client's parser, and this gateway's own registry is read in-process.
- ``PrometheusSource`` (``S2S_PROMETHEUS_URL``): the same series from one instant query to
  Prometheus's HTTP API, for a gateway that cannot reach the workers' metrics ports, or to
  see every gateway's sessions at once (Prometheus scrapes them all).

Windows and quantiles are worked out from these values by ``dashboard_history``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("s2s.gateway.dashboard")

PREFIX = "s2s_"
Labels = tuple[tuple[str, str], ...]   # sorted (name, value) pairs
Series = dict[tuple[str, Labels], float]  # (sample name, labels) -> value


@dataclass
class Process:
    """One scraped process: ``key`` tells its counters apart from another's (its metrics
    address); ``role`` is gateway, vad, stt, llm or tts."""
    key: str
    role: str
    worker: str
    up: bool = True
    series: Series = field(default_factory=dict)
    error: str = ""


def labels_of(pairs: dict[str, str], drop: tuple[str, ...] = ()) -> Labels:
    return tuple(sorted((k, v) for k, v in pairs.items() if k not in drop))


def parse_text(text: str) -> Series:
    """The ``s2s_*`` samples of a Prometheus text exposition (``_created`` ones left out:
    they are timestamps, not counts)."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[(sample.name, labels_of(sample.labels))] = float(sample.value)
    return out


class RegistrySource:
    """Scrapes every live worker of the registry (``list_workers``: the same call ``/sd``
    makes) and reads this gateway's metrics with ``own_metrics``."""

    name = "registry"

    def __init__(self, list_workers: Callable[[], Awaitable[dict[str, list[dict]]]],
                 own_metrics: Callable[[], bytes], client: httpx.AsyncClient,
                 timeout_s: float = 1.5):
        self.list_workers = list_workers
        self.own_metrics = own_metrics
        self.client = client
        self.timeout_s = timeout_s

    async def collect(self) -> list[Process]:
        gateway = Process("gateway", "gateway", "gateway",
                          series=parse_text(self.own_metrics().decode("utf-8", "replace")))
        try:
            workers = await asyncio.wait_for(self.list_workers(), 2)
        except Exception as e:  # Redis away: this gateway's own numbers still show
            log.warning("dashboard: cannot list workers: %s", f"{type(e).__name__}: {e}"[:200])
            return [gateway]
        procs = [Process(w.get("metrics") or f"{stage}/{w['id']}", stage, w["id"])
                 for stage in sorted(workers) for w in workers[stage]]
        await asyncio.gather(*(self._scrape(p) for p in procs))
        return [gateway, *procs]

    async def _scrape(self, proc: Process) -> None:
        url = proc.key.rstrip("/") + "/metrics"
        if not url.startswith(("http://", "https://")):
            proc.up, proc.error = False, "no metrics address"
            return
        try:
            reply = await self.client.get(url, timeout=self.timeout_s)
            reply.raise_for_status()
            proc.series = parse_text(reply.text)
        except Exception as e:  # one unreachable worker must not blank the others
            proc.up, proc.error = False, f"{type(e).__name__}: {e}"[:200]


class PrometheusSource:
    """The same series from Prometheus (scraping through ``/sd`` with the shipped
    deploy/prometheus/prometheus.yml: the role is the ``job`` label, the worker id the
    ``worker`` label).  ``up`` gives the processes Prometheus scrapes, reachable or not."""

    name = "prometheus"
    ROLES = ("gateway", "vad", "stt", "llm", "tts")

    def __init__(self, url: str, client: httpx.AsyncClient, timeout_s: float = 2.0):
        self.api = url.rstrip("/") + "/api/v1/query"
        self.client = client
        self.timeout_s = timeout_s

    async def _query(self, expr: str) -> list[dict]:
        reply = await self.client.get(self.api, params={"query": expr}, timeout=self.timeout_s)
        reply.raise_for_status()
        body = reply.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus: {body.get('error', body)}"[:200])
        return body["data"]["result"]

    async def collect(self) -> list[Process]:
        rows, ups = await asyncio.gather(self._query(f'{{__name__=~"{PREFIX}.+"}}'),
                                         self._query("up"))
        procs: dict[str, Process] = {}

        def proc_of(metric: dict) -> Process | None:
            role = metric.get("job") or metric.get("role") or ""
            if role not in self.ROLES:
                return None
            key = metric.get("instance", "")
            return procs.setdefault(key, Process(key, role, metric.get("worker") or key))

        for row in ups:
            proc = proc_of(row["metric"])
            if proc is not None:
                proc.up = float(row["value"][1]) == 1.0
        for row in rows:
            metric = dict(row["metric"])
            proc = proc_of(metric)
            if proc is None:
                continue
            name = metric.pop("__name__")
            # target labels Prometheus adds are not the process's own: drop them, so a
            # series is keyed like a scraped one
            key = (name, labels_of(metric, drop=("instance", "job", "worker", "role", "cell")))
            proc.series[key] = float(row["value"][1])
        return sorted(procs.values(), key=lambda p: (self.ROLES.index(p.role), p.worker))
