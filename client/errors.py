"""What both connection classes (``protocol.Connection``, ``realtime.RealtimeConnection``)
share: the error a refused session raises, and how a credential travels."""

from __future__ import annotations

import os


class ProtocolError(RuntimeError):
    """The gateway refused the session or answered something unexpected."""

    def __init__(self, message: str, error: dict | None = None):
        super().__init__(message)
        self.error = error or {}   # the gateway's error event: code, message, retry_after_s

    @property
    def code(self) -> str | None:
        return self.error.get("code")


def auth_headers(api_key: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer`` for an API key or token (default: env S2S_API_KEY)."""
    key = api_key if api_key is not None else os.environ.get("S2S_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}
