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
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from s2s import log

    settings = config.from_args(args)
    log.setup(settings.log_level, settings.log_json)
    settings.redis()  # exits with a clear message when no Redis is configured
    uvicorn.Server(uvicorn_config(settings)).run()
    return 0
