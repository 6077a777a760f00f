"""The gateway's ASGI app: ``/`` (web page), ``/static/*``, ``/healthz`` (readiness, alias
``/readyz``), ``/livez`` (liveness), ``/metrics``, ``POST /auth/ticket`` and the ``/ws``
client sessions (protocol in docs/protocol.md; authentication in docs/security.md), the
OpenAI Realtime API at ``/v1/realtime`` and its WebRTC calls (``POST /v1/realtime/calls``).
With ``admin_port`` set, the probes and ``/metrics`` move to a second app
(``app.state.admin_app``) served on that port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from s2s import metrics
from s2s.bus import REDIS_DOWN
from s2s.cells import Cells
from s2s.config import Settings

from . import g711
from .admission import Admission
from .auth import AuthError, Authenticator, new_ticket, origin_allowed, ticket_key
from .context import GatewayContext
from .dashboard import Dashboard, dashboard_routes
from .discovery import sd_route
from .failover import Failover, new_gateway_id
from .realtime import RealtimeSocket
from .session import ClientSession
from .slots import Slots
from .webrtc import WebRTCCalls
from .telephony.routes import telephony_routes

log = logging.getLogger("s2s.gateway")
STATIC = Path(__file__).resolve().parent / "static"
PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>s2s</title>
<h1>s2s gateway</h1><p>The web page is not installed (gateway/static/index.html).
Talk to the assistant with <code>s2s talk FILE</code>; the WebSocket is at <code>/ws</code>.
See <a href="/healthz">/healthz</a> and <a href="/metrics">/metrics</a>.</p>
"""


def create_app(settings: Settings) -> Starlette:
    state: dict = {"sessions": {}}
    auth = Authenticator(settings)
    cells = Cells(settings)  # one cell (redis_url) unless redis_cells names several
    # WebRTC calls: the same native session behind the Realtime translation, over a peer
    # connection (its typed input charged by the translation, as on /v1/realtime)
    calls = WebRTCCalls(settings, lambda socket: ClientSession(
        socket, state["context"], limit_typed=False).run())
    dashboard = Dashboard(settings, list_workers=lambda: cells.live_workers())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        g711.prepare()
        cells.start()  # buses created on the server's event loop
        state["bus"] = cells.home.bus
        state["admission"] = Admission(settings, cells, state["sessions"])
        state["admission"].start()
        gateway_id = new_gateway_id()
        for cell in cells:  # one failover loop per cell, one gateway id
            cell.failover = Failover(cell.bus, settings, state["sessions"],
                                     owns=lambda sid, c=cell: cells.owns(c, sid),
                                     gateway_id=gateway_id)
            await cell.failover.start()
        state["context"] = GatewayContext(
            settings=settings, bus=cells.home.bus, auth=auth, sessions=state["sessions"],
            slots=Slots(state["admission"], state["sessions"]), admission=state["admission"],
            cells=cells, failover=cells.home.failover)
        try:
            yield
        finally:
            await state["admission"].stop()  # sessions still open end cleanly (SessionEnd) before Redis is let go
            tasks = [s.task for s in state["sessions"].values() if s.task is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            await calls.close_all()
            await state["context"].slots.close()
            await dashboard.close()
            for cell in cells:
                await cell.failover.stop()
            await cells.close()

    async def index(request: Request) -> Response:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(PLACEHOLDER)

    async def healthz(request: Request) -> Response:
        if cells.prefixed:
            return await cells_healthz()
        try:
            workers = await asyncio.wait_for(state["bus"].live_workers(), 2)
        except Exception as e:
            return JSONResponse({"ok": False, "redis": False, "workers": {},
                                 "error": f"{type(e).__name__}: {e}"[:200]}, status_code=503)
        admission = state.get("admission")
        return JSONResponse({"ok": True, "redis": True, "workers": workers,
                             "headroom": admission.headroom() if admission else None,
                             "missing": [s for s in ("vad", "stt", "llm", "tts")
                                         if s not in workers],
                             "sessions": len(state["sessions"])})

    async def livez(request: Request) -> Response:
        """Liveness: this process only, no Redis call.  Answering shows the event loop runs
        (it carries every session's WebSocket too); the app must have started and its
        admission loop (idle sessions, session counts) must still run.  A Redis outage
        fails /healthz, which takes the gateway out of the Service's endpoints; failing
        here would have the kubelet restart every gateway and cut every open session's
        WebSocket, for an outage a restart cannot fix."""
        admission = state.get("admission")
        running = admission is not None and admission.task is not None \
            and not admission.task.done()
        return JSONResponse({"ok": running, "sessions": len(state["sessions"])},
                            status_code=200 if running else 503)

    async def cells_healthz() -> Response:
        """Per cell: its Redis, workers and missing stages. 200 while any cell can take
        sessions (new ones go there), 503 when none can."""
        out, usable, merged = {}, 0, {}
        for cell in cells:
            try:
                workers = await asyncio.wait_for(cell.bus.live_workers(), 2)
            except Exception as e:
                out[cell.name] = {"ok": False, "redis": False,
                                  "error": f"{type(e).__name__}: {e}"[:200]}
                continue
            missing = [s for s in ("vad", "stt", "llm", "tts") if s not in workers]
            usable += not missing
            out[cell.name] = {"ok": not missing, "redis": True, "workers": workers,
                              "missing": missing}
            for stage, ws in workers.items():
                merged.setdefault(stage, []).extend({**w, "cell": cell.name} for w in ws)
        # the single-Redis fields too (every cell's workers; stages no cell has), for tools
        # that read them (s2s bench)
        return JSONResponse({"ok": usable > 0, "redis": any(c["redis"] for c in out.values()),
                             "workers": merged,
                             "missing": [s for s in ("vad", "stt", "llm", "tts")
                                         if s not in merged],
                             "cells": out, "sessions": len(state["sessions"])},
                            status_code=200 if usable else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def ticket(request: Request) -> Response:
        """A one-time ticket for a browser's WebSocket, for the key in Authorization."""
        if not origin_allowed(request.scope, settings):
            return refused("forbidden_origin", "", 403)
        try:
            principal = auth.authenticate(request.scope)
        except AuthError as e:
            return refused("unauthorized", str(e), 401)
        if principal is None:
            return refused("unauthorized", "no credential", 401)
        cell = await state["admission"].place()  # the ticket names its cell
        value = cells.name(cell, new_ticket())
        try:
            await cell.bus.put_ticket(ticket_key(value), principal.to_json(),
                                      settings.ticket_ttl_s)
        except REDIS_DOWN as e:
            log.warning("no ticket: Redis of cell %s unavailable (%s)", cell.name, e)
            return refused("unavailable", "the service is unavailable; try again later", 503)
        return JSONResponse({"ticket": value, "expires_in": settings.ticket_ttl_s},
                            headers={"Cache-Control": "no-store"})

    def refused(code: str, message: str, status: int) -> Response:
        metrics.REJECTED.labels(code).inc()
        log.warning("refused %s: %s %s", "/auth/ticket", code, message)
        return JSONResponse({"error": code, "message": message}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    async def session(ws: WebSocket, socket) -> None:
        if not origin_allowed(ws.scope, settings):  # a foreign web page: HTTP 403, no session
            metrics.REJECTED.labels("forbidden_origin").inc()
            log.warning("refused a WebSocket from origin %r",
                        dict(ws.headers).get("origin", "")[:100])
            await ws.close(code=1008)
            return
        # the Realtime translation charges typed input itself (one turn there is several
        # client events); the native protocol's is charged by the session
        await ClientSession(socket, state["context"],
                            limit_typed=not isinstance(socket, RealtimeSocket)).run()

    async def ws_endpoint(ws: WebSocket) -> None:
        await session(ws, ws)

    async def realtime_endpoint(ws: WebSocket) -> None:
        # the same native session (auth, limits, streams), behind the Realtime translation
        await session(ws, RealtimeSocket(ws, settings))

    # open (no key): probes and Prometheus; they move to admin_port when one is set
    admin_routes = [Route("/healthz", healthz), Route("/readyz", healthz),
                    Route("/livez", livez), Route("/metrics", metrics_endpoint),
                    sd_route(lambda: cells)]  # workers of every cell
    separate = settings.admin_port > 0
    app = Starlette(routes=[
        Route("/", index),
        *([] if separate else admin_routes),
        Route("/auth/ticket", ticket, methods=["POST"]),
        *dashboard_routes(dashboard, auth),  # behind the same credentials as a session
        WebSocketRoute("/ws", ws_endpoint),
        WebSocketRoute("/v1/realtime", realtime_endpoint),
        Route("/v1/realtime/calls", calls.endpoint, methods=["POST"]),
        *telephony_routes(settings, lambda: state["context"]),  # phone calls (docs/telephony.md)
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ], lifespan=lifespan)
    app.state.sessions = state["sessions"]
    app.state.admin_app = Starlette(routes=admin_routes) if separate else None
    return app
