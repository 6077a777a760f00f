"""What a Redis failure means for the caller of the bus: retry with backoff, create the
consumer group again, or log it and go on."""

from __future__ import annotations

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: what "Redis is unreachable" looks like: callers retry with backoff
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)

#: kinds of Redis trouble that pass: wait (with backoff) and do the same again
RETRYABLE = frozenset({"down", "loading", "oom", "readonly", "busy"})


def redis_error_kind(exc: BaseException) -> str:
    """What a Redis failure means for the caller, in one word:

    - ``down``: unreachable (connection refused/reset, timeout): retry with backoff;
    - ``loading``: restarted, still loading its AOF/RDB (``LOADING``): retry;
    - ``oom``: ``maxmemory`` reached with ``noeviction`` ("OOM command not allowed"):
      writes fail, reads, acks and deletes still work: retry the write later;
    - ``readonly``: talking to a replica (``READONLY``, e.g. during a failover): retry;
    - ``busy``: a script runs too long (``BUSY``): retry;
    - ``nogroup``: the stream or its consumer group is gone (``NOGROUP``: Redis
      restarted empty): create the group again;
    - ``other``: anything else (a bug, a wrong type): log it, do not retry in a loop;
    - ``none``: not a Redis error at all.

    One place for this, used by the worker runtime and the gateway alike."""
    if isinstance(exc, BusyLoadingError):  # a ConnectionError subclass: test it first
        return "loading"
    if isinstance(exc, REDIS_DOWN):
        return "down"
    if not isinstance(exc, RedisError):
        return "none"
    # redis-py maps OOM and READONLY to classes and strips their prefix from the text
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    text = str(exc)
    # an error inside a pipeline reads "Command # 1 (XADD …) of pipeline caused error: …"
    # (the command's arguments may hold any text: look only at the error's own words)
    text = text.rsplit("caused error: ", 1)[-1].lstrip("('\"")
    head = text.split(" ", 1)[0].upper()
    if head == "OOM" or text.startswith("command not allowed when used memory"):
        return "oom"
    for prefix, kind in (("READONLY", "readonly"), ("LOADING", "loading"), ("BUSY", "busy"),
                         ("NOGROUP", "nogroup"), ("MASTERDOWN", "readonly"),
                         # a blocked read cut off as the server became a replica
                         ("UNBLOCKED", "readonly")):
        if head == prefix:
            return kind
    return "other"
