"""The gateway's ASGI app: ``/`` (web page), ``/static/*``, ``/healthz``, ``/metrics``
and the ``/ws`` client sessions (protocol in docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from s2s.bus import Bus
from s2s.config import Settings

from .failover import Failover
from .session import ClientSession

STATIC = Path(__file__).resolve().parent / "static"
PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>s2s</title>
<h1>s2s gateway</h1><p>The web page is not installed (gateway/static/index.html).
Talk to the assistant with <code>s2s talk FILE</code>; the WebSocket is at <code>/ws</code>.
See <a href="/healthz">/healthz</a> and <a href="/metrics">/metrics</a>.</p>
"""


def create_app(settings: Settings) -> Starlette:
    state: dict = {"sessions": {}}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state["bus"] = Bus(settings)  # created on the server's event loop
        app.state.failover = Failover(state["bus"], settings, state["sessions"])
        await app.state.failover.start()
        try:
            yield
        finally:  # sessions still open end cleanly (SessionEnd) before Redis is let go
            tasks = [s.task for s in state["sessions"].values() if s.task is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            await app.state.failover.stop()
            await state["bus"].close()

    async def index(request: Request) -> Response:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(PLACEHOLDER)

    async def healthz(request: Request) -> Response:
        try:
            workers = await asyncio.wait_for(state["bus"].live_workers(), 2)
        except Exception as e:
            return JSONResponse({"ok": False, "redis": False, "workers": {},
                                 "error": f"{type(e).__name__}: {e}"[:200]}, status_code=503)
        return JSONResponse({"ok": True, "redis": True, "workers": workers,
                             "missing": [s for s in ("vad", "stt", "llm", "tts")
                                         if s not in workers],
                             "sessions": len(state["sessions"])})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def ws_endpoint(ws: WebSocket) -> None:
        await ClientSession(ws, state["bus"], settings, state["sessions"]).run()

    app = Starlette(routes=[
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        WebSocketRoute("/ws", ws_endpoint),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ], lifespan=lifespan)
    app.state.sessions = state["sessions"]
    return app
