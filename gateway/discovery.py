"""Prometheus HTTP service discovery: ``GET /sd`` lists every live worker's metrics address
from the liveness registry (`s2s:workers`), plus this gateway, in Prometheus's http_sd format
(https://prometheus.io/docs/prometheus/latest/http_sd/). A Prometheus anywhere that reaches
the gateway then scrapes whatever `s2s up`, compose or k8s started, with no per-host config.

Target labels are ``role`` (gateway, vad, stt, llm, tts) and ``worker`` (its consumer name),
not ``stage``: a target label overrides the same-named label of every scraped series (which
then becomes ``exported_stage``), and the stage metrics carry a ``stage`` label already.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from s2s.bus import Bus

log = logging.getLogger("s2s.gateway.sd")


def target_of(url: str) -> str | None:
    """``http://10.0.0.5:9100`` -> ``10.0.0.5:9100`` (Prometheus wants host:port)."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        return parts.netloc or None if parts.port else None
    except ValueError:  # a malformed member must not hide every other worker
        return None


def target_groups(workers: dict[str, list[dict]], gateway: str) -> list[dict]:
    groups = [{"targets": [gateway], "labels": {"role": "gateway", "worker": "gateway"}}]
    for stage in sorted(workers):
        for w in sorted(workers[stage], key=lambda w: w["id"]):
            target = target_of(w.get("metrics") or "")
            if target is None:
                log.warning("worker %s registered no usable metrics address: %r",
                            w["id"], w.get("metrics"))
                continue
            labels = {"role": stage, "worker": w["id"]}
            if w.get("cell"):  # a gateway serving several cells (s2s/cells.py)
                labels["cell"] = w["cell"]
            groups.append({"targets": [target], "labels": labels})
    return groups


def sd_route(get_bus: Callable[[], Bus]) -> Route:
    """The ``/sd`` route. The gateway lists itself as the host:port the request came to:
    that is the address Prometheus reached it at, so it can scrape it there too."""

    async def sd(request: Request) -> Response:
        try:
            workers = await asyncio.wait_for(get_bus().live_workers(), 2)
        except Exception as e:  # Redis down: Prometheus keeps its last good target list
            return JSONResponse({"error": f"{type(e).__name__}: {e}"[:200]}, status_code=503)
        gateway = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
        return JSONResponse(target_groups(workers, gateway))

    return Route("/sd", sd)
