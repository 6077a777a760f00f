"""How the gateway names and counts Redis trouble, for the session code and the failover
loop alike (one place, so neither imports the other)."""

from __future__ import annotations

from prometheus_client import Counter

from s2s.bus import redis_error_kind as bus_error_kind

RESTORED = Counter("s2s_gateway_sessions_restored", "Session state restored after Redis lost it, "
                   "by what (owner, turn, vad).", ["what"])
REDIS_REFUSED = Counter("s2s_gateway_redis_refused", "Redis errors other than 'unreachable' seen "
                        "by the gateway, by kind (oom, readonly, loading, busy, other).", ["kind"])


def redis_error_kind(exc: BaseException) -> str | None:
    """The kind of a Redis *refusal* ("oom", "readonly", "loading", "busy", "nogroup",
    "other": up, but not doing this now), from the bus's one classification; None for an
    unreachable Redis or anything that is not a Redis error."""
    kind = bus_error_kind(exc)
    return None if kind in ("down", "none") else kind
HELD_AUDIO = Counter("s2s_gateway_outage_audio_seconds", "Microphone audio that arrived while "
                     "Redis was unreachable, in seconds, by outcome (held: kept at the gateway, "
                     "delivered: written in order once Redis was back, dropped: past the "
                     "bound in bytes or time).", ["outcome"])
