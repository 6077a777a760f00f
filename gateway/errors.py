"""What the gateway tells a client when it refuses something: a ``Reject`` (error code,
message, and the close code when it ends the connection), and the close codes used."""

from __future__ import annotations

# WebSocket close codes (RFC 6455): normal, unsupported data, policy violation, internal
# error, try again later
NORMAL, UNSUPPORTED, POLICY, INTERNAL, TRY_LATER = 1000, 1003, 1008, 1011, 1013
# set in the last message a transport hands its session when the client stopped reading
# (a key of the ASGI message, which no client can send: uvicorn's carry code and reason)
NOT_READING = "s2s.not_reading"


class Reject(Exception):
    """A client message refused; ``close`` is the close code when it ends the session."""

    def __init__(self, code: str, message: str, close: int | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.close = code, message, close
        self.extra = extra or {}  # more fields of the error event (retry_after_s)

    def event(self) -> dict:
        return {"type": "error", "code": self.code, "message": self.message, **self.extra}
