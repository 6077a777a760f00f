"""The runtime of a session-owning stage (VAD), on top of ``s2s.worker.Runtime``:
whole sessions, not single entries, are owned, kept fresh, claimed and resumed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from . import metrics
from .bus import (RETRYABLE, SESSION_OWNER, Owner, OwnershipLost, entry_ms, entry_order,
                  redis_error_kind)
from .frames import Audio, FrameError, SessionConfig, SessionEnd, SessionOpen, decode
from .config import Settings
from .stage import SessionStage, Stage
from .worker import Runtime

log = logging.getLogger("s2s.worker")
BATCH = 50          # audio entries read (and processed) per round trip
SAVE_EVERY_S = 0.2  # the resume point of audio that said nothing is written this often
MAX_MARKS = 8192    # resume points kept (a stage that never lets go must not grow forever)


class SessionRuntime(Runtime):
    """Runtime of a session-owning stage (VAD).  The entry of a session in
    ``s2s:vad:sessions`` stays pending while its owner lives (kept fresh); if the
    owner dies another worker claims it (within about ``lease_s``: see
    ``Runtime.take_over_expired``) and resumes at ``s2s:vadpos:{sid}`` with the
    stage's snapshot of the session there (``s2s:vadstate:{sid}``).

    That point is not always the last audio entry processed: a stage whose snapshot
    says ``replay_from`` (a position in its own units, with ``at``, the position of
    the snapshot) is resumed from the latest point at or before it, so the new owner
    re-reads the audio of an utterance in progress from its start and the utterance
    comes out whole.  The snapshot written is that point's, with the latest one under
    ``latest`` (so the stage knows what the dead owner already emitted and does not
    emit it twice) and the last audio entry id processed under ``_seen_id``."""

    stage: SessionStage

    def __init__(self, stage: SessionStage, settings: Settings):
        super().__init__(stage, settings)
        self._emitted: dict[bytes, int] = {}  # session entry -> outputs written by its owner

    async def _handle(self, entry_id: bytes, data: bytes) -> None:
        try:
            await self._own_session(entry_id, data)
        except OwnershipLost:
            # Its writes were refused (fenced), so nothing of ours reached the stream the
            # new owner works on.  Not acknowledged: the entry is the new owner's.
            log.warning("entry %s was taken over by another worker: dropping ours",
                        entry_id.decode())

    async def _own_session(self, entry_id: bytes, data: bytes) -> None:
        try:
            opened = decode(data, self.settings.max_frame_bytes, SessionOpen)
        except FrameError as e:
            metrics.BAD_FRAMES.labels(self.name, e.reason).inc()
            log.warning("rejected malformed session entry %s: %s", entry_id.decode(), e)
            await self._ack(entry_id)
            return
        sid = opened.sid
        owner = Owner(self.stream, self.group, self.consumer, entry_id)
        SESSION_OWNER.set(owner)  # this task's: the stage's turn changes are fenced by it
        backoff = 0.1
        while True:
            try:
                position, state = await self.bus.session_resume(sid)
                break
            except RedisError as e:  # still in flight (kept fresh): retry here
                if self.stopping.is_set():
                    return
                backoff = await self._redis_down(e, backoff)
        position = position or b"0-0"
        snapshot = self._read_snapshot(sid, state)
        seen_id = str(snapshot.pop("_seen_id", "0-0")) if snapshot else "0-0"
        seen_at_open = seen_id  # where the last owner got to
        session = self._open_session(opened, snapshot)
        log.info("owning session", extra={"sid": sid, "resume_from": position.decode(),
                                          "restored": bool(snapshot)})
        # (audio id processed through, the stage's snapshot just after it): the points a
        # new owner could resume from, back to the one the written state points at
        marks: deque = deque([(position, self._snapshot_dict(sid, session))])
        # read with the audio of every other session this worker owns, on one connection
        # (s2s.bus_reader); Redis trouble is retried there, counted through _reader_down
        audio = self.bus.follow_audio(sid, position, BATCH, self.settings.block_ms,
                                      self._reader_down, self._redis_up)
        try:
            await self._follow_session(owner, entry_id, sid, session, audio, position,
                                       seen_id, seen_at_open, marks)
        finally:
            audio.close()
            self._emitted.pop(entry_id, None)

    async def _follow_session(self, owner: Owner, entry_id: bytes, sid: str, session: Any,
                              audio: Any, position: bytes, seen_id: str, seen_at_open: str,
                              marks: deque) -> None:
        idle_since = time.monotonic()
        progressed = False
        beyond = 0  # audio entries processed past where the last owner got to
        retry: list = []  # entries of a batch that Redis trouble interrupted: again first
        unsaved_since: float | None = None  # processed audio whose resume point waits
        emitted = self._emitted.setdefault(entry_id, 0)
        while not self.stopping.is_set():
            wait = self.settings.block_ms / 1000
            if unsaved_since is not None:
                wait = max(0.0, unsaved_since + SAVE_EVERY_S - time.monotonic())
            batch, retry = retry or await audio.get(wait), []
            ended = False
            try:
                if not batch:
                    if unsaved_since is not None:  # quiet now: write the point it got to
                        await self._save(owner, sid, *self._resume_point(marks, seen_id))
                        unsaved_since = None
                    elif time.monotonic() - idle_since > self.settings.session_ttl_s:
                        log.info("session idle too long: releasing", extra={"sid": sid})
                        break
                    continue
                idle_since = time.monotonic()
                for n, (audio_id, data) in enumerate(batch):
                    try:
                        ended = await self._handle_audio(owner, sid, session, audio_id, data)
                    except RedisError:
                        retry = batch[n:]
                        raise
                    position = audio_id
                    if ended:
                        break
                    marks.append((audio_id, self._snapshot_dict(sid, session)))
                    if len(marks) > MAX_MARKS:
                        marks.popleft()
                    if _id(audio_id) > _id(seen_at_open):
                        beyond += 1
                if _id(position) > _id(seen_id):
                    seen_id = position.decode()
                # The resume point and the stage's state there, in one script: a new owner
                # resumes from both or from neither.  An ended session drops its state: a
                # reopened session starts anew (its client counts audio positions from its
                # new connection).  Written at once when the session ended or said
                # something (a new owner must not say it again), else at most every
                # SAVE_EVERY_S (a new owner re-reads that much more audio, which said
                # nothing): one script per audio message was most of Redis's work.
                if ended:
                    await self._save(owner, sid, position, None)
                elif self._emitted[entry_id] != emitted or unsaved_since is not None and \
                        time.monotonic() - unsaved_since >= SAVE_EVERY_S:
                    await self._save(owner, sid, *self._resume_point(marks, seen_id))
                    emitted, unsaved_since = self._emitted[entry_id], None
                elif unsaved_since is None:
                    unsaved_since = time.monotonic()
                if not progressed and beyond >= BATCH:
                    # A session lives long and changes owners on every worker restart
                    # (each takeover counts as a delivery): once this owner has got a
                    # whole batch past where the last one stopped (the last one died
                    # within the batch after that point, if its audio killed it), the
                    # entry is not poison, so its count goes back to 1.  One whose audio
                    # kills owners never gets here.  (Not "any entry past that point":
                    # a takeover re-reads from before it, in other batch boundaries.)
                    progressed = True
                    try:
                        await self.bus.keep_alive(self.stream, self.group, self.consumer,
                                                  [entry_id], reset_deliveries=True)
                    except RedisError as e:  # NOGROUP etc.: must not end the session
                        log.debug("resetting the delivery count: %s", e, extra={"sid": sid})
            except RedisError as e:
                await self._redis_down(e, 0.5)
                continue
            if ended:
                log.info("session ended", extra={"sid": sid})
                break
        else:
            return  # shutting down: leave the session entry pending for another owner
        await self._ack(entry_id)

    def _reader_down(self, error: Exception) -> None:
        """The audio reader's Redis failure: counted and logged like any other (health
        goes false while Redis is unreachable); the reader retries by itself."""
        if self._count_redis_error(error) in ("down", "loading"):
            self.redis_ok = False

    async def _save(self, owner: Owner, sid: str, position: bytes,
                    state_json: str | None) -> None:
        """The resume point and the stage's state there, in one script: a new owner
        resumes from both or from neither, and a stale owner writes neither."""
        if not await self.retrying(self.bus.save_session_state, owner, sid, position,
                                   state_json):
            raise OwnershipLost(owner.entry_id)

    async def _emit_owned(self, owner: Owner, *frames) -> None:
        if await self.retrying(self.bus.emit_owned, owner, *frames) is None:
            raise OwnershipLost(owner.entry_id)
        self._emitted[owner.entry_id] = self._emitted.get(owner.entry_id, 0) + 1

    def _resume_point(self, marks: deque, seen_id: str) -> tuple[bytes, str]:
        """Where a new owner should resume (audio id) and the state to write: the latest
        mark at or before the stage's ``replay_from`` (all of them when it says none),
        with the latest snapshot under ``latest``.  Marks older than it are dropped."""
        latest = marks[-1][1]
        replay_from = latest.get("replay_from") if isinstance(latest, dict) else None
        base = len(marks) - 1
        if isinstance(replay_from, (int, float)):
            while base > 0 and not (isinstance(marks[base][1].get("at"), (int, float))
                                    and marks[base][1]["at"] <= replay_from):
                base -= 1
        for _ in range(base):
            marks.popleft()
        base_id, base_snap = marks[0]
        state = {**base_snap, "latest": latest, "_seen_id": seen_id}
        try:
            return base_id, json.dumps(state)
        except (TypeError, ValueError) as e:  # a stage bug must not stop the session
            log.warning("session snapshot failed: %s", e)
            return marks[-1][0], "{}"

    @staticmethod
    def _read_snapshot(sid: str, state: bytes | None) -> dict | None:
        """The last owner's snapshot; one that cannot be read is logged and ignored."""
        if not state:
            return None
        try:
            snapshot = json.loads(state)
        except ValueError:
            snapshot = None
        if not isinstance(snapshot, dict):
            log.warning("unreadable session snapshot ignored", extra={"sid": sid})
            return None
        return snapshot

    def _open_session(self, opened: SessionOpen, snapshot: dict | None) -> Any:
        """The stage's session object, restored from the last owner's snapshot if any.
        A snapshot that cannot be restored is logged and ignored: the session then
        starts afresh rather than not at all."""
        if not snapshot:
            return self.stage.open_session(opened)
        try:
            return self.stage.open_session(opened, snapshot)
        except Exception as e:
            log.warning("session snapshot not restored (%s): starting afresh", e,
                        extra={"sid": opened.sid})
            return self.stage.open_session(opened)

    def _snapshot_dict(self, sid: str, session: Any) -> dict:
        try:
            snap = self.stage.snapshot(session)
            return snap if isinstance(snap, dict) else {}
        except Exception as e:  # a stage bug must not stop the session; nothing is restored
            log.warning("session snapshot failed: %s", e, extra={"sid": sid})
            return {}

    async def _handle_audio(self, owner: Owner, sid: str, session: Any, audio_id: bytes,
                            data: bytes) -> bool:
        picked = time.time()
        try:
            frame = decode(data, self.settings.max_frame_bytes,
                           (Audio, SessionEnd, SessionConfig))
            if frame.sid != sid:
                raise FrameError(f"frame for session {frame.sid!r} in the stream of {sid!r}",
                                 "wrong_session")
        except FrameError as e:
            metrics.BAD_FRAMES.labels(self.name, e.reason).inc()
            metrics.ITEMS.labels(self.name, "error").inc()
            log.warning("rejected malformed audio frame: %s", e, extra={"sid": sid})
            return False
        if isinstance(frame, SessionEnd):
            return True
        metrics.QUEUE_WAIT.labels(self.name).observe(max(0.0, picked - entry_ms(audio_id) / 1000))
        try:
            async for out in self.stage.process(frame, session):
                await self._emit_owned(owner, out)
            outcome = "ok"
        except OwnershipLost:
            raise
        except RedisError as e:
            if redis_error_kind(e) in RETRYABLE or redis_error_kind(e) == "nogroup":
                raise
            log.warning("audio frame failed: %s", e, extra={"sid": sid})
            outcome = "error"
        except Exception as e:
            log.warning("audio frame rejected: %s", e, extra={"sid": sid})
            metrics.BAD_FRAMES.labels(self.name, "invalid_audio").inc()
            outcome = "error"
        metrics.ITEMS.labels(self.name, outcome).inc()
        metrics.PROCESSING.labels(self.name).observe(time.time() - picked)
        return False


def _id(entry_id: bytes | str) -> tuple[int, int]:
    """``entry_order``, with an empty or corrupt id (from a snapshot) as nothing seen."""
    try:
        return entry_order(entry_id) if entry_id else (0, 0)
    except ValueError:
        return 0, 0


def run_stage(stage: Stage, settings: Settings) -> None:
    """Entry point of a worker process: the session runtime for a session-owning stage
    (VAD), the plain runtime for every other stage."""
    runtime_cls = SessionRuntime if isinstance(stage, SessionStage) else Runtime
    try:
        asyncio.run(runtime_cls(stage, settings).run())
    except KeyboardInterrupt:
        pass
