"""Structured logs: ``key=value`` lines for people, JSON lines with S2S_LOG_JSON=1.

Every line goes through :func:`s2s.config.redacted_url`: a Redis URL with a password or a
gateway URL with ``#key=…`` in a message (an error naming where it could not connect)
reaches no terminal or log collector in clear."""

from __future__ import annotations

import json
import logging
import sys
import time

from .config import redacted_url

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RESERVED)
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts}.{int(record.msecs):03d} {record.levelname:<5} {record.name}: " \
               f"{record.getMessage()}" + (f"  {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redacted_url(line)


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {"ts": round(record.created, 3), "level": record.levelname,
                   "logger": record.name, "msg": record.getMessage()}
        payload.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: redacted_url(v) if isinstance(v, str) else v
                           for k, v in payload.items()}, default=str)


def setup(level: str = "INFO", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if as_json else _Plain())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "asyncio", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
