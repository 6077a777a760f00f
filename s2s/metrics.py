"""Prometheus metrics shared by every process (prefix ``s2s_``), and the small
HTTP server that exposes ``/metrics``, ``/healthz`` (``/readyz``) and ``/livez`` from a
worker."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

# 10 ms .. 10 s, dense where voice latency lives (100 ms .. 2 s).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0,
                   1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 7.5, 10.0)

# --- per stage (label ``stage``: vad, stt, llm, tts) ---------------------------------------
PROCESSING = Histogram("s2s_stage_processing_seconds", "Time to process one item, by stage.",
                       ["stage"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("s2s_stage_queue_wait_seconds",
                       "Entry written to its stream -> picked up by a worker.", ["stage"],
                       buckets=LATENCY_BUCKETS)
ITEMS = Counter("s2s_stage_items", "Items handled, by outcome (ok, error, stale, dropped).",
                ["stage", "outcome"])
STREAM_LAG = Gauge("s2s_stage_stream_lag", "Entries in the stage stream not yet read by its group.",
                   ["stage"])
STREAM_PENDING = Gauge("s2s_stage_stream_pending", "Entries read but not yet acknowledged.",
                       ["stage"])
CLAIMED = Counter("s2s_stage_claimed", "Entries taken over from a dead or stuck worker.", ["stage"])
DEAD_LETTERED = Counter("s2s_stage_dead_lettered", "Entries moved to the dead-letter stream "
                        "s2s:dead after too many deliveries (poison: they kill their workers).",
                        ["stage"])
IN_FLIGHT = Gauge("s2s_stage_in_flight", "Items this worker is processing now.", ["stage"])
BAD_FRAMES = Counter("s2s_bad_frames", "Frames rejected as malformed, by component and reason.",
                     ["component", "reason"])
REDIS_ERRORS = Counter("s2s_redis_errors", "Redis connection errors seen (then retried).",
                       ["component"])
REDIS_FAULTS = Counter("s2s_redis_faults", "Redis command failures by component and kind "
                       "(s2s.bus.redis_error_kind: down, loading, oom, readonly, busy, nogroup, "
                       "other); retried with backoff.", ["component", "reason"])
LEASES_EXPIRED = Counter("s2s_stage_leases_expired", "Workers of this stage found dead by a "
                         "missed heartbeat lease (their pending work then claimed at once).",
                         ["stage"])
MODEL_LOAD = Gauge("s2s_model_load_seconds", "Seconds the stage took to load its model.", ["stage"])
STAGE_LATENCY = Histogram("s2s_stage_first_output_seconds",
                          "Item picked up -> first output frame written, by stage.", ["stage"],
                          buckets=LATENCY_BUCKETS)

# --- gateway -------------------------------------------------------------------------
VOICE_TO_VOICE = Histogram("s2s_voice_to_voice_seconds",
                           "User's end of speech -> first reply audio sent to the client.",
                           buckets=LATENCY_BUCKETS)
FIRST_TRANSCRIPT = Histogram("s2s_time_to_first_transcript_seconds",
                             "End of speech -> transcript sent to the client.",
                             buckets=LATENCY_BUCKETS)
FIRST_REPLY_TEXT = Histogram("s2s_time_to_first_reply_text_seconds",
                             "End of speech -> first reply text sent to the client.",
                             buckets=LATENCY_BUCKETS)
FIRST_AUDIO = Histogram("s2s_time_to_first_audio_seconds",
                        "End of speech -> first reply audio sent to the client (same as "
                        "voice-to-voice, kept for the per-step dashboard row).",
                        buckets=LATENCY_BUCKETS)
ACTIVE_SESSIONS = Gauge("s2s_active_sessions", "Client sessions open on this gateway.")
SESSIONS_TOTAL = Counter("s2s_sessions", "Client sessions opened on this gateway.")
REJECTED = Counter("s2s_rejected_inputs", "Client inputs rejected by the gateway, by reason.",
                   ["reason"])
INTERRUPTS = Counter("s2s_interrupts", "Barge-ins: the user spoke over a reply.")


Handler = Callable[[], Awaitable[tuple[int, dict]]]


async def serve_http(host: str, port: int, health: Handler,
                     live: Handler | None = None) -> asyncio.AbstractServer:
    """Serve GET /metrics (Prometheus text), GET /healthz and its alias /readyz (readiness:
    ``health``) and GET /livez (liveness: ``live``) on host:port.

    Two probes, because they answer different questions: readiness may depend on Redis,
    liveness must not.  A liveness probe that fails while Redis is away would have the
    kubelet restart every worker of the stack during a Redis outage: each reloads its
    model and comes back to the same outage, and the restarts outlast it.  Without
    ``live``, /livez is 200 whenever this server answers (the event loop runs)."""

    async def always_live() -> tuple[int, dict]:
        return 200, {"ok": True}

    live = live or always_live

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/metrics"):
                status, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif path.startswith(("/healthz", "/readyz", "/livez")):
                status, payload = await (live if path.startswith("/livez") else health)()
                body, ctype = json.dumps(payload).encode(), "application/json"
            else:
                status, ctype = 404, "text/plain"
                body = b"not found: try /metrics, /healthz or /livez\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "OK")
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except Exception as e:  # a bad HTTP client must never hurt the worker
            logging.getLogger("s2s.http").debug("bad http request: %s", e)
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
