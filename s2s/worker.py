"""The worker runtime, written once for every stage.

It loads the stage's model, then reads its stream through the stage's consumer
group, runs ``process`` with a concurrency limit, writes the outputs and only
then acknowledges the input (at-least-once).  Entries that a dead worker left
pending are claimed after ``claim_idle_s``; entries still being worked on are
kept fresh so nobody steals them.  When a session's turn advances, work of the
old turn is cancelled and acknowledged as stale.  SIGTERM/SIGINT stop reading,
let in-flight work finish for ``shutdown_grace_s`` and leave the rest pending
for another worker.  Redis going away is retried with backoff, and so is
every other passing Redis trouble (out of memory, read-only replica, loading,
busy script: see ``s2s.bus.redis_error_kind``): counted by kind, logged once per
burst; an output that cannot be written (OOM) is retried in place and its input is
not acknowledged before it is written.

Liveness: each worker renews a lease in ``s2s:workers`` every ``heartbeat_s``; a
worker that misses its lease (``lease_s``) is dead, and a live worker of the same
stage claims its pending entries at once (only those idle for the lease, so a
stalled-but-alive worker is not robbed), then deletes the dead consumer.  The
idle-time XAUTOCLAIM after ``claim_idle_s`` stays as the fallback.

Priority (a stage with ``lookahead`` > 0, e.g. TTS): a worker with a free slot reads up
to ``lookahead`` entries more than it can start, and starts the waiting ones by the
stage's ``priority(frame)`` (lower first, ties in stream order), so the first piece of
a new turn goes ahead of continuing pieces of older replies.  An entry that has waited
``max_priority_wait_s`` since it entered the stream goes first whatever its priority
(no starvation).  Entries read ahead are this consumer's exactly like in-flight ones:
pending on it, kept fresh by the keep-alive, dropped if another worker took them over,
acknowledged only once processed, left pending at shutdown.  Only a worker with a free
slot reads (never one that is busy), so a single new entry still goes to an idle
worker; read-ahead happens only when a backlog is already there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

from redis.exceptions import NoPermissionError, RedisError

from . import keys, metrics
from .bus import RETRYABLE, Bus, entry_ms, entry_order, redis_error_kind
from .config import Settings
from .frames import STAGE_INPUTS, Frame, FrameError, Notice, decode
from .redis_version import server_problem
from .stage import SessionState, Stage
from .turn_watch import TurnWatch

log = logging.getLogger("s2s.worker")
T = TypeVar("T")
BURST_LOG_S = 30.0  # a Redis trouble that goes on is logged again after this long


class Runtime:
    def __init__(self, stage: Stage, settings: Settings):
        self.stage = stage
        self.settings = settings
        self.name = stage.name
        self.group = stage.name
        self.stream = keys.stage_stream(stage.name)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.concurrency = settings.concurrency or stage.concurrency
        self.bus = Bus(settings)
        stage.state = SessionState(self.bus, self.retrying)
        # one subscription to turn changes for all the work in flight (s2s.turn_watch)
        self.turns = TurnWatch(self.bus, self._count_redis_error)
        self.inflight: dict[bytes, asyncio.Task] = {}
        # entries read ahead, not started yet (stage.lookahead > 0): id -> (priority, data)
        self.waiting: dict[bytes, tuple[float, bytes]] = {}
        self.lookahead = max(int(getattr(stage, "lookahead", 0) or 0), 0)
        self.stopping = asyncio.Event()
        self.loaded = False
        self.redis_ok = False
        self.metrics_url = ""
        self.claim_cursor: bytes = b"0-0"
        self.bursts: dict[str, list] = {}  # Redis error kind -> [first seen, count, last log]
        # ack deletes the entry (its payload frees Redis memory) while this stage's group
        # is the stream's only one; another group (added by an operator to tap the
        # stream) still needs the entries, so then ack only (see _watch_stream)
        self.delete_acked = True

    # --- life cycle ----------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        server = await metrics.serve_http(self.settings.metrics_host, self.settings.metrics_port,
                                          self._health, self._live)
        port = server.sockets[0].getsockname()[1]
        from .netaddr import advertise_url  # reachable from other hosts, not 127.0.0.1
        self.metrics_url = advertise_url(self.settings.metrics_advertise,
                                         self.settings.metrics_host, port, self.settings.redis_url)
        log.info("%s worker starting", self.name,
                 extra={"consumer": self.consumer, "metrics": self.metrics_url})
        t0 = time.perf_counter()
        log.info("loading %s model…", self.name)
        await asyncio.to_thread(self.stage.setup)
        load_s = time.perf_counter() - t0
        metrics.MODEL_LOAD.labels(self.name).set(load_s)
        self.loaded = True
        log.info("%s model ready in %.1fs: %s", self.name, load_s, self.stage.describe())
        background = [asyncio.create_task(self._heartbeat()),
                      asyncio.create_task(self._keep_alive()),
                      asyncio.create_task(self._watch_leases()),
                      asyncio.create_task(self._watch_stream())]
        try:
            await self._read_loop()
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            try:
                await asyncio.wait_for(self.bus.forget_worker(self.name, self.consumer,
                                                              self.metrics_url), 1)
            except Exception:
                pass
            server.close()
            await self.turns.close()
            await self.bus.close()
            log.info("%s worker stopped", self.name)

    def _on_signal(self, sig: int) -> None:
        if self.stopping.is_set():
            log.warning("second signal: cancelling in-flight work (it stays claimable)")
            for task in self.inflight.values():
                task.cancel()
        log.info("received %s: finishing in-flight work, then exiting", signal.Signals(sig).name)
        self.stopping.set()

    async def _drain(self) -> None:
        if self.waiting:  # never started: another worker claims them (claim_idle_s)
            log.info("leaving %d entr%s read ahead pending", len(self.waiting),
                     "y" if len(self.waiting) == 1 else "ies")
            self.waiting.clear()
        if self.inflight:
            log.info("waiting for %d in-flight item(s)", len(self.inflight))
            done, pending = await asyncio.wait(list(self.inflight.values()),
                                               timeout=self.settings.shutdown_grace_s)
            for task in pending:  # left pending in Redis: another worker claims them
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _live(self) -> tuple[int, dict[str, Any]]:
        """Liveness (/livez): this process only, never Redis.  Answering at all shows the
        event loop runs; the model must be loaded (a startup probe covers the load).  A
        Redis outage is readiness's business (/healthz): restarting workers for it would
        reload every model and fix nothing.  A draining worker stays live: it is finishing
        its in-flight work."""
        return (200 if self.loaded else 503), {
            "stage": self.name, "consumer": self.consumer, "model_loaded": self.loaded,
            "stopping": self.stopping.is_set()}

    async def _health(self) -> tuple[int, dict[str, Any]]:
        ok = self.loaded and self.redis_ok and not self.stopping.is_set()
        return (200 if ok else 503), {
            "stage": self.name, "consumer": self.consumer, "model_loaded": self.loaded,
            "redis": self.redis_ok, "stopping": self.stopping.is_set(),
            "in_flight": len(self.inflight), "model": self.stage.describe() if self.loaded else None}

    # --- reading ---------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        backoff = 0.1
        last_claim = 0.0
        await self._ensure_groups()
        while not self.stopping.is_set():
            try:
                free = self.concurrency - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(list(self.inflight.values()), timeout=0.5,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                entries = []
                if time.monotonic() - last_claim > self.settings.claim_idle_s / 2:
                    last_claim = time.monotonic()
                    # resume the scan where the last one stopped (see Bus.claim_idle)
                    self.claim_cursor, entries = await self.bus.claim_idle(
                        self.stream, self.group, self.consumer,
                        int(self.settings.claim_idle_s * 1000), count=free,
                        start_id=self.claim_cursor)
                    entries = [e for e in entries if e[0] not in self.inflight]
                    if entries:
                        metrics.CLAIMED.labels(self.name).inc(len(entries))
                        log.warning("claimed %d entr%s left by a dead worker", len(entries),
                                    "y" if len(entries) == 1 else "ies")
                        entries = await self._drop_poison(entries)
                if not entries:
                    # with read-ahead: up to `lookahead` more than the free slots; and not
                    # blocking while some already wait (they start now, newcomers included)
                    room = free + self.lookahead - len(self.waiting)
                    if room > 0:
                        entries = await self.bus.read_group(
                            self.stream, self.group, self.consumer, room,
                            None if self.waiting else self.settings.block_ms)
                self._redis_up()
                backoff = 0.1
                self._start(entries)
            except RedisError as e:
                if redis_error_kind(e) == "nogroup":  # Redis restarted empty: recreate, go on
                    self._count_redis_error(e)
                    log.warning("consumer group missing (Redis restarted?): recreating")
                    await self._ensure_groups()
                else:
                    backoff = await self._redis_down(e, backoff)

    def _start(self, entries: list[tuple[bytes, bytes]]) -> None:
        if self.lookahead:
            for entry_id, data in entries:
                if entry_id not in self.inflight and entry_id not in self.waiting:
                    self.waiting[entry_id] = (self._priority(data), data)
            self._dispatch()
            return
        for entry_id, data in entries:
            self._launch(entry_id, data)

    def _launch(self, entry_id: bytes, data: bytes) -> None:
        if entry_id in self.inflight:
            return
        self.inflight[entry_id] = asyncio.create_task(self._handle(entry_id, data))
        self.inflight[entry_id].add_done_callback(lambda _t, eid=entry_id: self._done(eid))
        metrics.IN_FLIGHT.labels(self.name).set(len(self.inflight))

    def _done(self, entry_id: bytes) -> None:
        self.inflight.pop(entry_id, None)
        metrics.IN_FLIGHT.labels(self.name).set(len(self.inflight))  # an idle worker reads 0

    def _priority(self, data: bytes) -> float:
        """The stage's order key for an entry read ahead; an undecodable entry gets 0
        (it is rejected, counted and acked as soon as it starts, see _handle)."""
        try:
            return float(self.stage.priority(decode(data, self.settings.max_frame_bytes,
                                                    STAGE_INPUTS.get(self.name))))
        except FrameError:
            return 0.0
        except Exception:
            log.exception("%s.priority failed: the entry keeps stream order", self.name)
            return 0.0

    def _dispatch(self) -> None:
        """Start waiting entries in free slots: entries waiting max_priority_wait_s
        first (stream order), then by priority, ties in stream order."""
        free = self.concurrency - len(self.inflight)
        if free <= 0 or not self.waiting:
            return
        aged_ms = time.time() * 1000 - self.stage.max_priority_wait_s * 1000

        def key(entry_id: bytes) -> tuple:
            at = entry_order(entry_id)
            if at[0] <= aged_ms:
                return (0, 0.0, at)
            return (1, self.waiting[entry_id][0], at)

        for entry_id in sorted(self.waiting, key=key)[:free]:
            _, data = self.waiting.pop(entry_id)
            self._launch(entry_id, data)

    async def _drop_poison(self, entries: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Dead-letter claimed entries delivered more than ``max_deliveries`` times.

        An entry whose processing kills the process (segfault, OOM kill, os._exit in a
        native library) is never acked and raises no exception we could count: it stays
        pending, the next worker claims it and dies too, forever, taking the stage down
        with it.  Redis counts the deliveries of each pending entry (XAUTOCLAIM adds one;
        the keep-alive's XCLAIM JUSTID does not), so a high count means every worker that
        took it died.  Checked here, on the claim path only: a first delivery
        (XREADGROUP) cannot be over the limit, and stages never see any of this."""
        limit = self.settings.max_deliveries
        if limit <= 0:
            return entries
        counts = await self.bus.deliveries(self.stream, self.group, [eid for eid, _ in entries])
        keep = []
        for entry_id, data in entries:
            n = counts.get(entry_id, 0)
            if n <= limit:
                keep.append((entry_id, data))
                continue
            reason = (f"delivered {n} times (max_deliveries {limit}); "
                      "every worker that took it died before acknowledging it")
            await self.bus.dead_letter(self.stream, self.group, entry_id, data, n, reason,
                                       delete=self.delete_acked)
            metrics.DEAD_LETTERED.labels(self.name).inc()
            try:
                frame = decode(data, self.settings.max_frame_bytes)
            except FrameError:
                frame = None
            extra = {"sid": frame.sid, "turn": frame.turn} if frame is not None else {}
            log.error("poison entry %s of %s moved to %s: %s", entry_id.decode(), self.stream,
                      keys.DEAD, reason, extra=extra)
            if frame is not None:
                await self._notify_error(frame, f"{self.name}: this input could not be "
                                                f"processed; dropped after {n - 1} attempts")
        return keep

    async def _ensure_groups(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                if not self.redis_ok:
                    await self._refuse_old_redis()
                await self.bus.ensure_group(self.stream, self.group)
                self._note_groups(len(await self.bus.groups(self.stream)))
                self._redis_up()
                return
            except RedisError as e:
                backoff = await self._redis_down(e, backoff)

    async def _refuse_old_redis(self) -> None:
        """Exit with the reason on a server too old for the bus's scripts: retrying would
        only log script errors forever.  A user without INFO rights (ACL) is not checked."""
        try:
            problem = server_problem(await self.bus.server_info())
        except NoPermissionError:
            return
        if problem:
            log.error("%s worker cannot run: %s", self.name, problem)
            raise SystemExit(2)

    def _redis_up(self) -> None:
        if not self.redis_ok:
            log.info("connected to Redis")
        self.redis_ok = True
        if self.bursts:
            for kind, (first, count, _) in self.bursts.items():
                log.info("Redis %s trouble over after %.1fs (%d failed command(s))", kind,
                         time.monotonic() - first, count)
            self.bursts.clear()

    def _count_redis_error(self, error: BaseException) -> str:
        """Count a Redis failure by kind; log it once per burst (again every
        BURST_LOG_S while it goes on), not once per retry."""
        kind = redis_error_kind(error)
        metrics.REDIS_FAULTS.labels(self.name, kind).inc()
        if kind == "down":
            metrics.REDIS_ERRORS.labels(self.name).inc()
        now = time.monotonic()
        burst = self.bursts.setdefault(kind, [now, 0, 0.0])
        burst[1] += 1
        if burst[1] == 1 or now - burst[2] >= BURST_LOG_S:
            burst[2] = now
            log.warning("Redis %s (%.200s): retrying with backoff%s", kind, error,
                        f" ({burst[1]} failures so far)" if burst[1] > 1 else "")
        return kind

    async def _redis_down(self, error: Exception, backoff: float) -> float:
        """Count and log a Redis failure, wait ``backoff`` (or until stopping); the next
        backoff.  ``redis_ok`` (health) goes false only when Redis is unreachable."""
        if self._count_redis_error(error) in ("down", "loading"):
            self.redis_ok = False
        try:
            await asyncio.wait_for(self.stopping.wait(), backoff)
        except asyncio.TimeoutError:
            pass
        return min(backoff * 2, 2.0)

    # --- one item --------------------------------------------------------------------------
    async def _handle(self, entry_id: bytes, data: bytes) -> None:
        picked = time.time()
        try:
            frame = decode(data, self.settings.max_frame_bytes, STAGE_INPUTS.get(self.name))
        except FrameError as e:
            metrics.BAD_FRAMES.labels(self.name, e.reason).inc()
            metrics.ITEMS.labels(self.name, "error").inc()
            log.warning("rejected malformed frame %s: %s", entry_id.decode(), e)
            await self._ack(entry_id)
            return
        metrics.QUEUE_WAIT.labels(self.name).observe(max(0.0, picked - entry_ms(entry_id) / 1000))
        backoff = 0.1
        while True:
            try:
                outcome = await self.run_item(frame, picked)
                break
            except RedisError as e:
                # Not acked: re-run here while this worker lives (the entry stays in flight,
                # so kept fresh and not claimed; a re-run's duplicate outputs carry the same
                # (turn, seq, chunk) keys), else left pending for another worker.
                if self.stopping.is_set():
                    log.warning("Redis failed mid-item (%s); the entry stays pending", e)
                    return
                backoff = await self._redis_down(e, backoff)
        metrics.ITEMS.labels(self.name, outcome).inc()
        metrics.PROCESSING.labels(self.name).observe(time.time() - picked)
        await self._ack(entry_id)

    async def run_item(self, frame: Frame, picked: float, *extra: Any) -> str:
        """Process one frame, emit its outputs, cancel it if its turn goes stale."""
        # watched before the turn is read: a change published in between is not missed
        watch = self.turns.watch(frame.sid, frame.turn)
        try:
            if frame.turn < await self.bus.current_turn(frame.sid):
                return "stale"
            work = asyncio.create_task(self._produce(frame, picked, *extra))
            try:
                done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # This item itself is cancelled (shutdown grace over, second signal, entry
                # lost to another worker): cancel the stage's work too.  Before, `work` kept
                # running on its own and could emit outputs after the entry was left pending
                # for another worker, or after the bus was closed.
                work.cancel()
                raise
            finally:
                if not work.done() and watch.done():
                    work.cancel()
            if work in done:
                work.result()
                return "ok"
            await asyncio.gather(work, return_exceptions=True)
            log.info("turn superseded: dropped work", extra={"sid": frame.sid, "turn": frame.turn})
            return "stale"
        except asyncio.CancelledError:
            raise
        except RedisError as e:
            if redis_error_kind(e) in RETRYABLE or redis_error_kind(e) == "nogroup":
                raise  # passing trouble: the caller retries the item, unacknowledged
            log.exception("processing failed", extra={"sid": frame.sid, "turn": frame.turn})
            await self._notify_error(frame, f"{self.name} failed: {e}")
            return "error"
        except Exception as e:
            log.exception("processing failed", extra={"sid": frame.sid, "turn": frame.turn})
            await self._notify_error(frame, f"{self.name} failed: {e}")
            return "error"
        finally:
            self.turns.unwatch(frame.sid, watch)

    async def _notify_error(self, frame: Frame, message: str) -> None:
        """Tell the session (best effort): else its turn just never gets an answer."""
        try:
            await self.bus.emit(Notice(sid=frame.sid, turn=frame.turn, event="error",
                                       message=message))
        except Exception:
            pass

    async def _produce(self, frame: Frame, picked: float, *extra: Any) -> None:
        first = True
        async for out in self.stage.process(frame, *extra):
            await self.emit(out)
            if first:
                metrics.STAGE_LATENCY.labels(self.name).observe(time.time() - picked)
                first = False

    async def emit(self, *frames: Frame) -> None:
        """Write outputs; a passing Redis trouble (out of memory above all: XADD is
        refused, reads and acks still work) is waited out here, in place, so the
        outputs go out once and in order and the input is acknowledged only after.
        Stale work is still cancelled meanwhile (the turn watch only reads)."""
        await self.retrying(self.bus.emit, *frames)

    async def retrying(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)``, waiting out passing Redis trouble (RETRYABLE kinds) with
        backoff.  While stopping the error is raised: the input then stays pending for
        another worker."""
        backoff = 0.1
        failed = False
        while True:
            try:
                result = await fn(*args)
            except RedisError as e:
                if redis_error_kind(e) not in RETRYABLE or self.stopping.is_set():
                    raise
                failed = True
                backoff = await self._redis_down(e, backoff)
                continue
            if failed:  # said here, when it went through, not at the next read
                self._redis_up()
            return result

    async def _ack(self, entry_id: bytes) -> None:
        """Acknowledge and delete the entry (Bus.ack).  Errors never end the task with an
        unretrieved exception."""
        backoff = 0.1
        while True:  # an ack lost to a Redis blip would re-run the item: retry a while
            try:
                await self.bus.ack(self.stream, self.group, entry_id, delete=self.delete_acked)
                return
            except RedisError as e:
                kind = self._count_redis_error(e)
                if kind not in RETRYABLE or backoff > 2:
                    # NOGROUP: Redis restarted empty, nothing left to ack; else re-run later
                    log.warning("could not ack %s (%s): it may be re-run", entry_id.decode(), e)
                    return
                await asyncio.sleep(backoff)
                backoff *= 2

    # --- background ------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Renew the liveness lease every heartbeat_s (sub-second: a dead worker is
        found from its missed lease within about lease_s)."""
        while True:
            try:
                if not self.stopping.is_set():
                    await self.bus.heartbeat(self.name, self.consumer, self.metrics_url)
            except RedisError as e:  # counted; must not end the loop (the worker would look
                self._count_redis_error(e)  # dead for good)
            except Exception as e:
                log.debug("heartbeat: %s", e)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _watch_leases(self) -> None:
        """Take over the pending work of workers of this stage whose lease ran out."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            if self.stopping.is_set():
                continue
            try:
                await self.take_over_expired()
            except RedisError as e:  # counted; must not end the loop
                self._count_redis_error(e)
            except Exception:
                log.exception("lease watch failed")

    async def take_over_expired(self) -> int:
        """Claim the entries (or sessions) of dead workers of this stage: XPENDING by
        consumer + XCLAIM with a min-idle of the lease (a live worker's keep-alive keeps
        its own entries fresher than that, so it is never robbed), as many as this worker
        has free slots; then delete the dead consumer and its registry member once
        nothing is left pending on it.  Returns how many entries were claimed."""
        lease_ms = int(self.settings.lease_s * 1000)
        claimed = 0
        for member, worker_id, beat in await self.bus.expired_workers(self.name,
                                                                      self.settings.lease_s):
            if worker_id == self.consumer:
                continue
            free = max(self.concurrency - len(self.inflight), 0)
            ids, total = await self.bus.pending_of(self.stream, self.group, worker_id, lease_ms,
                                                   free)
            entries = []
            if ids and free:
                entries = await self.bus.claim(self.stream, self.group, self.consumer, ids,
                                               lease_ms)
            if entries:
                claimed += len(entries)
                metrics.CLAIMED.labels(self.name).inc(len(entries))
                log.warning("worker %s missed its lease (last beat %.1fs ago): claimed %d "
                            "entr%s", worker_id, time.time() - beat, len(entries),
                            "y" if len(entries) == 1 else "ies")
                self._start(await self._drop_poison(entries))
            if total <= len(entries) and await self.bus.drop_consumer(
                    self.stream, self.group, worker_id, member, beat + 1e-3):
                metrics.LEASES_EXPIRED.labels(self.name).inc()
                log.info("dead worker %s removed from the group and the registry", worker_id)
        return claimed

    async def _keep_alive(self) -> None:
        """Reset the idle time of in-flight entries so live work is never claimed (more
        often than the lease: a lease takeover claims only entries idle that long)."""
        while True:
            await asyncio.sleep(min(self.settings.claim_idle_s / 3, self.settings.lease_s / 2))
            try:
                lost = await self.bus.keep_alive(self.stream, self.group, self.consumer,
                                                 self.owned_ids())
            except RedisError as e:  # NOGROUP etc.: an unexpected error must not end the loop,
                self._count_redis_error(e)  # or every in-flight entry gets stolen
                continue
            except Exception as e:
                log.debug("keep-alive: %s", e)
                continue
            for entry_id in lost:
                if self.waiting.pop(entry_id, None) is not None:
                    log.warning("entry %s (read ahead) was taken over by another worker: "
                                "dropping ours", entry_id.decode())
                    continue
                # Another worker claimed it while this one looked dead (event loop stalled
                # past claim_idle_s).  It now does the work (or owns the session): stop ours
                # instead of stealing it back, so no entry has two owners.
                task = self.inflight.get(entry_id)
                if task and not task.done():
                    log.warning("entry %s was taken over by another worker: dropping ours",
                                entry_id.decode())
                    task.cancel()

    def owned_ids(self) -> list[bytes]:
        return list(self.inflight) + list(self.waiting)

    def _note_groups(self, count: int) -> None:
        alone = count <= 1
        if alone != self.delete_acked:
            log.warning("%s has %d consumer groups: acknowledged entries are %s", self.stream,
                        count, "deleted" if alone else "kept (the other groups read them)")
            self.delete_acked = alone

    async def _watch_stream(self) -> None:
        """Export the stage stream's lag and pending count; notice other groups."""
        while True:
            try:
                groups = await self.bus.groups(self.stream)
                self._note_groups(len(groups))
                for group in groups:
                    if group["name"].decode() == self.group:
                        metrics.STREAM_PENDING.labels(self.name).set(group.get("pending") or 0)
                        metrics.STREAM_LAG.labels(self.name).set(group.get("lag") or 0)
            except Exception:
                pass
            await asyncio.sleep(2)
