"""The runtime of a session-owning stage (VAD), on top of ``s2s.worker.Runtime``:
whole sessions, not single entries, are owned, kept fresh, claimed and resumed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from redis.exceptions import ResponseError

from . import keys, metrics
from .bus import entry_ms
from .frames import Audio, FrameError, SessionEnd, SessionOpen, decode
from .config import Settings
from .stage import SessionStage, Stage
from .worker import REDIS_DOWN, Runtime

log = logging.getLogger("s2s.worker")


class SessionRuntime(Runtime):
    """Runtime of a session-owning stage (VAD).  The entry of a session in
    ``s2s:vad:sessions`` stays pending while its owner lives (kept fresh); if the
    owner dies another worker claims it and resumes from the last audio entry the
    dead owner processed (``s2s:vadpos:{sid}``), with the stage's snapshot of the
    session at that entry (``s2s:vadstate:{sid}``, ``SessionStage.snapshot``)."""

    stage: SessionStage

    async def _handle(self, entry_id: bytes, data: bytes) -> None:
        try:
            opened = decode(data, self.settings.max_frame_bytes, SessionOpen)
        except FrameError as e:
            metrics.BAD_FRAMES.labels(self.name, e.reason).inc()
            log.warning("rejected malformed session entry %s: %s", entry_id.decode(), e)
            await self._ack(entry_id)
            return
        sid = opened.sid
        try:
            position, state = await self.bus.redis.mget(keys.vad_pos(sid), keys.vad_state(sid))
        except REDIS_DOWN as e:
            # Not acked and no longer in flight (so no longer kept fresh): the entry is
            # claimed again after claim_idle_s, by this worker or another.
            log.warning("Redis lost while opening a session (%s); it will be retried", e,
                        extra={"sid": sid})
            return
        position = position or b"0-0"
        session = self._open_session(opened, state)
        log.info("owning session", extra={"sid": sid, "resume_from": position.decode(),
                                          "restored": bool(state and state != b"{}")})
        idle_since = time.monotonic()
        progressed = False
        while not self.stopping.is_set():
            try:
                res = await self.bus.redis.xread({keys.audio(sid): position}, count=50,
                                                 block=self.settings.block_ms)
            except REDIS_DOWN as e:
                await self._redis_down(e, 0.5)
                continue
            if not res:
                if time.monotonic() - idle_since > self.settings.session_ttl_s:
                    log.info("session idle too long: releasing", extra={"sid": sid})
                    break
                continue
            idle_since = time.monotonic()
            ended = False
            try:
                for audio_id, fields in res[0][1]:
                    ended = await self._handle_audio(sid, session, audio_id,
                                                     fields.get(b"f", b""))
                    position = audio_id
                    if ended:
                        break
                # The position and the stage's state at that position, in one MULTI (one
                # round trip): a new owner resumes from both or from neither.  An ended
                # session drops its state: a reopened session starts anew (its client
                # counts audio positions from its new connection).
                pipe = self.bus.redis.pipeline(transaction=True)
                pipe.set(keys.vad_pos(sid), position, ex=self.settings.session_ttl_s)
                if ended:
                    pipe.delete(keys.vad_state(sid))
                else:
                    pipe.set(keys.vad_state(sid), self._snapshot(sid, session),
                             ex=self.settings.session_ttl_s)
                await pipe.execute()
                if not progressed:
                    # A session lives long and changes owners on every worker restart
                    # (each takeover counts as a delivery): once this owner has got past
                    # where the last one stopped, the entry is not poison, so its count
                    # goes back to 1.  One whose audio kills owners never gets here.
                    progressed = True
                    try:
                        await self.bus.keep_alive(self.stream, self.group, self.consumer,
                                                  [entry_id], reset_deliveries=True)
                    except ResponseError as e:  # NOGROUP etc.: must not end the session
                        log.debug("resetting the delivery count: %s", e, extra={"sid": sid})
            except REDIS_DOWN as e:
                await self._redis_down(e, 0.5)
                continue
            if ended:
                log.info("session ended", extra={"sid": sid})
                break
        else:
            return  # shutting down: leave the session entry pending for another owner
        await self._ack(entry_id)

    def _open_session(self, opened: SessionOpen, state: bytes | None) -> Any:
        """The stage's session object, restored from the last owner's snapshot if any.
        A snapshot that cannot be read or restored is logged and ignored: the session
        then starts afresh rather than not at all."""
        snapshot = None
        if state:
            try:
                snapshot = json.loads(state)
            except ValueError:
                pass
            if not isinstance(snapshot, dict):
                log.warning("unreadable session snapshot ignored", extra={"sid": opened.sid})
                snapshot = None
        if not snapshot:
            return self.stage.open_session(opened)
        try:
            return self.stage.open_session(opened, snapshot)
        except Exception as e:
            log.warning("session snapshot not restored (%s): starting afresh", e,
                        extra={"sid": opened.sid})
            return self.stage.open_session(opened)

    def _snapshot(self, sid: str, session: Any) -> str:
        try:
            return json.dumps(self.stage.snapshot(session))
        except Exception as e:  # a stage bug must not stop the session; nothing is restored
            log.warning("session snapshot failed: %s", e, extra={"sid": sid})
            return "{}"

    async def _handle_audio(self, sid: str, session: Any, audio_id: bytes, data: bytes) -> bool:
        picked = time.time()
        try:
            frame = decode(data, self.settings.max_frame_bytes, (Audio, SessionEnd))
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
                await self.bus.emit(out)
            outcome = "ok"
        except REDIS_DOWN:
            raise
        except Exception as e:
            log.warning("audio frame rejected: %s", e, extra={"sid": sid})
            metrics.BAD_FRAMES.labels(self.name, "invalid_audio").inc()
            outcome = "error"
        metrics.ITEMS.labels(self.name, outcome).inc()
        metrics.PROCESSING.labels(self.name).observe(time.time() - picked)
        return False


def run_stage(stage: Stage, settings: Settings) -> None:
    """Entry point of a worker process: the session runtime for a session-owning stage
    (VAD), the plain runtime for every other stage."""
    runtime_cls = SessionRuntime if isinstance(stage, SessionStage) else Runtime
    try:
        asyncio.run(runtime_cls(stage, settings).run())
    except KeyboardInterrupt:
        pass
