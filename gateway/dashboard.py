"""The live latency page, no Grafana needed: ``GET /dashboard`` (the page, static files) and
``GET /dashboard/data`` (its figures as JSON, behind the same credentials as a session:
``Authorization: Bearer <key or token>``; the page takes the key from the ``#key=`` of the
URL `s2s up` prints, as the voice page does).

Sampling runs only while someone watches: the first data request starts it, and it stops
once no request came for ``IDLE_S``, so an unwatched gateway scrapes nothing.  Each tick
collects every process's series (``dashboard_source``) into a bounded ``History``
(``dashboard_history``).  Documented in docs/dashboard.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

import httpx
from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from s2s import metrics
from s2s.config import Settings

from .auth import AuthError, Authenticator
from .dashboard_history import STAGES, History
from .dashboard_source import Process, PrometheusSource, RegistrySource

log = logging.getLogger("s2s.gateway.dashboard")
PAGE = Path(__file__).resolve().parent / "static" / "dashboard.html"
IDLE_S = 60.0  # no data request for this long: nobody watches, sampling stops


class Dashboard:
    def __init__(self, settings: Settings,
                 list_workers: Callable[[], Awaitable[dict[str, list[dict]]]],
                 clock: Callable[[], float] = time.time):
        self.interval_s = max(0.5, settings.dashboard_interval_s)
        self.window_s = max(self.interval_s * 2, settings.dashboard_window_s)
        keep = int(max(settings.dashboard_history_s, self.window_s) / self.interval_s) + 1
        self.history = History(keep, self.window_s)
        self.max_range_s = keep * self.interval_s
        self.prometheus_url = settings.prometheus_url
        self.list_workers = list_workers
        self.clock = clock
        self.task: asyncio.Task | None = None
        self.last_request = 0.0
        self.last_error = ""

    @property
    def source_name(self) -> str:
        return "prometheus" if self.prometheus_url else "registry"

    def watch(self) -> None:
        """A viewer asked: (re)start sampling if it had stopped."""
        self.last_request = time.monotonic()
        if self.task is None or self.task.done():
            self.history.rebase()
            self.task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        async with httpx.AsyncClient() as client:
            source = (PrometheusSource(self.prometheus_url, client) if self.prometheus_url
                      else RegistrySource(self.list_workers, generate_latest, client))
            while time.monotonic() - self.last_request < IDLE_S:
                started = time.monotonic()
                await self.tick(source)
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def tick(self, source) -> None:
        try:
            procs = await source.collect()
        except Exception as e:  # Prometheus away: say so on the page, keep the history
            self.last_error = f"{source.name}: {type(e).__name__}: {e}"[:300]
            log.warning("dashboard: %s", self.last_error)
            return
        self.last_error = ""
        self.history.add(self.clock(), procs)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def payload(self, range_s: float) -> dict:
        now = self.clock()
        points = self.history.since(now - range_s)
        series: dict = {"t": [round(p.t, 3) for p in points]}
        for key in ("v2v_p50_ms", "v2v_p95_ms", "turns_per_min"):
            series[key] = [p.rolling.get(key) for p in points]
        series["sessions_open"] = [p.sessions_open for p in points]
        window_min = self.window_s / 60
        series["refusals_per_min"] = [round(p.rolling["refusals_total"] / window_min, 2)
                                      for p in points]
        series["errors_per_min"] = [round(p.rolling["errors_total"] / window_min, 2)
                                    for p in points]
        for key in ("queue_wait_p50_ms", "queue_wait_p95_ms", "processing_p50_ms",
                    "processing_p95_ms"):
            series[key] = {s: [p.rolling["stages"].get(s, {}).get(key) for p in points]
                           for s in STAGES}
        series["in_flight"] = {s: [p.in_flight.get(s, 0.0) for p in points] for s in STAGES}
        series["workers"] = {s: [p.workers.get(s, 0) for p in points] for s in STAGES}
        sampling = self.task is not None and not self.task.done()
        # rates over the time sampled, when the page has watched for less than the range
        span_s = min(range_s, now - points[0].t + self.interval_s) if points else range_s
        return {"source": self.source_name, "sampling": sampling, "error": self.last_error,
                "now": now, "interval_s": self.interval_s, "window_s": self.window_s,
                "range_s": range_s, "max_range_s": self.max_range_s, "points": len(points),
                "series": series, "summary": self.history.figures(points, span_s),
                "live": self.live()}

    def live(self) -> dict:
        """The last tick's processes: every worker with its in-flight work, and per stage
        the workers, in-flight items, stream lag and pending entries."""
        stages = {s: {"workers": 0, "in_flight": 0.0, "lag": 0.0, "pending": 0.0}
                  for s in STAGES}
        workers, sessions = [], 0.0
        for proc in self.history.latest:
            sessions += gauge(proc, "s2s_active_sessions", sum)
            in_flight = gauge(proc, "s2s_stage_in_flight", sum)
            workers.append({"role": proc.role, "worker": proc.worker, "up": proc.up,
                            "error": proc.error, "in_flight": in_flight})
            if proc.role in stages and proc.up:
                st = stages[proc.role]
                st["workers"] += 1
                st["in_flight"] += in_flight
                # every worker reports the same group-wide lag and pending: the max, not a sum
                st["lag"] = max(st["lag"], gauge(proc, "s2s_stage_stream_lag", max))
                st["pending"] = max(st["pending"], gauge(proc, "s2s_stage_stream_pending", max))
        return {"sessions_open": sessions, "workers": workers, "stages": stages}


def gauge(proc: Process, name: str, combine: Callable[[list[float]], float]) -> float:
    return combine([v for (sample, _), v in proc.series.items() if sample == name] or [0.0])


def dashboard_routes(dashboard: Dashboard, auth: Authenticator) -> list[Route]:
    async def page(request: Request) -> Response:
        return FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    async def data(request: Request) -> Response:
        try:
            principal = auth.authenticate(request.scope)
            if principal is None:
                raise AuthError("no credential")
        except AuthError as e:
            metrics.REJECTED.labels("unauthorized").inc()
            log.warning("refused /dashboard/data: %s", e)
            return JSONResponse({"error": "unauthorized", "message": str(e)}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        raw = request.query_params.get("range", "300")
        try:
            range_s = float(raw)
            if not range_s > 0:
                raise ValueError
        except ValueError:
            metrics.REJECTED.labels("bad_message").inc()
            return JSONResponse({"error": "bad_message",
                                 "message": f"range must be a positive number of seconds, "
                                            f"not {raw[:40]!r}"}, status_code=400)
        dashboard.watch()
        body = dashboard.payload(min(range_s, dashboard.max_range_s))
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return [Route("/dashboard", page), Route("/dashboard/data", data)]
