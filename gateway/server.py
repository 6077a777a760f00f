"""``s2s gateway``: run the gateway app on uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

from s2s import config
from s2s.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_flags(parser, ["core", "gateway"])


def uvicorn_config(settings: Settings, **overrides: Any):
    import uvicorn

    from .app import create_app

    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, log_config=None,
        log_level=settings.log_level.lower(), access_log=False, lifespan="on",
        # messages over max_message_bytes get a polite error event; far bigger ones are
        # refused by the WebSocket layer itself (close 1009)
        ws_max_size=max(4 * settings.max_message_bytes, 1 << 20),
        ws_per_message_deflate=False,  # PCM does not compress: save the CPU
        ws_ping_interval=20, ws_ping_timeout=20, timeout_graceful_shutdown=5)
    if settings.ssl_certfile:  # https and wss straight from uvicorn (or use a proxy)
        options.update(ssl_certfile=settings.ssl_certfile,
                       ssl_keyfile=settings.ssl_keyfile or None)
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)


def admin_config(settings: Settings, admin_app: Any):
    """The /metrics and /healthz server on admin_host:admin_port (no TLS: keep it private)."""
    import uvicorn

    return uvicorn.Config(admin_app, host=settings.admin_host,
                          port=settings.admin_port, log_config=None, access_log=False,
                          lifespan="off", log_level=settings.log_level.lower())


def check_auth(settings: Settings) -> None:
    from .auth import load_keys

    if settings.auth and not (load_keys(settings) or settings.token_secret):
        raise SystemExit("s2s gateway: authentication is on but no credential is configured: "
                         "set S2S_API_KEYS (or S2S_API_KEYS_FILE, S2S_TOKEN_SECRET), or "
                         "S2S_AUTH=off for local development")


def main(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from s2s import log

    settings = config.from_args(args)
    log.setup(settings.log_level, settings.log_json)
    if settings.redis_cells:
        from s2s.cells import parse

        parse(settings.redis_cells)  # exits with the reason when malformed
    else:
        settings.redis()  # exits with a clear message when no Redis is configured
    check_auth(settings)
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        raise SystemExit("s2s gateway: set both S2S_SSL_CERTFILE and S2S_SSL_KEYFILE")
    main_cfg = uvicorn_config(settings)
    if not settings.admin_port:
        uvicorn.Server(main_cfg).run()
        return 0
    main_server = uvicorn.Server(main_cfg)
    admin = uvicorn.Server(admin_config(settings, main_cfg.app.state.admin_app))
    admin.install_signal_handlers = lambda: None  # type: ignore[method-assign]

    async def both() -> None:
        task = asyncio.create_task(admin.serve())
        try:
            await main_server.serve()
        finally:
            admin.should_exit = True
            await task

    asyncio.run(both())
    return 0
