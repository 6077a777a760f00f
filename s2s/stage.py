"""What a stage author writes: a small class with ``setup`` and ``process``.

    class SttStage(Stage):
        name = "stt"
        def setup(self):                      # load the model (runs in a thread)
            ...
        async def process(self, frame):       # one input frame -> output frames
            text = await self.run_blocking(self.model.transcribe, frame.pcm)
            yield Transcript(...)

The runtime (``s2s.worker``) does everything else: reading, acking, claiming,
dropping stale turns, metrics, health and shutdown.  Frames are routed by kind
(``s2s.bus.routes``), so a stage only says *what* it produced.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable, TypeVar

from .bus import SESSION_OWNER
from .config import Settings
from .frames import Frame, SessionOpen

T = TypeVar("T")


class SessionState:
    """The per-session state a stage may keep in Redis (so any worker can serve any
    turn), behind plain methods: stages never see Redis commands."""

    def __init__(self, bus: Any, retrying: Any = None):
        self._bus = bus
        # the runtime's Runtime.retrying: passing Redis trouble (OOM, a replica, a
        # restart still loading) is waited out inside these calls, never seen by stages
        self._retry = retrying

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await (self._retry(fn, *args) if self._retry else fn(*args))

    async def current_turn(self, sid: str) -> int:
        return await self._call(self._bus.current_turn, sid)

    async def advance_turn(self, sid: str) -> int:
        # fenced by the session the calling task owns, if any (raises OwnershipLost)
        return await self._call(self._bus.advance_turn, sid, SESSION_OWNER.get())

    async def prefs(self, sid: str) -> dict[str, str]:
        """What the client asked for (``instructions``, ``heard:<turn>``): see keys.prefs."""
        return await self._call(self._bus.prefs, sid)

    async def load_own(self, sid: str, stage: str) -> bytes | None:
        """A stage's own small per-session value (``save_own``), None when there is none."""
        return await self._call(self._bus.stage_value, sid, stage)

    async def save_own(self, sid: str, stage: str, value: str) -> None:
        await self._call(self._bus.set_stage_value, sid, stage, value)

    async def load(self, sid: str, default: Any = None) -> Any:
        raw = await self._call(self._bus.context, sid)
        return json.loads(raw) if raw else default

    async def save(self, sid: str, value: Any) -> None:
        await self._call(self._bus.set_context, sid, json.dumps(value))


class Stage:
    name: str = "stage"
    #: items one worker processes at once unless S2S_CONCURRENCY says otherwise
    concurrency: int = 1
    #: inputs a worker reads beyond its free slots, so that ``priority`` can choose among
    #: them (0: strict stream order, the inputs are never decoded before their turn)
    lookahead: int = 0
    #: an input read ahead that waited this long (since it entered the stream) goes
    #: first whatever its priority, in stream order: later pieces are never starved
    max_priority_wait_s: float = 1.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self.state: SessionState  # set by the runtime before process() is called

    def setup(self) -> None:
        """Load models. Blocking is fine here: the runtime runs it in a thread."""

    def describe(self) -> str:
        """One line for logs and /healthz: which model/backend is loaded."""
        return self.name

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        raise NotImplementedError
        yield  # pragma: no cover  (makes this an async generator)

    def priority(self, frame: Frame) -> float:
        """Order key of an input read ahead (``lookahead`` > 0): lower goes first, ties
        in stream order.  E.g. TTS: 0 for the first piece of a reply (seq 0), 1 for the
        pieces after it.  Cheap and pure: it runs on the event loop for each input."""
        return 0.0

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking model call in a thread, keeping the event loop free."""
        return await asyncio.to_thread(fn, *args, **kwargs)


class SessionStage(Stage):
    """A stage that owns whole sessions (VAD): all audio of a session reaches the one
    worker that owns it.  ``open_session`` makes the per-session object that
    ``process`` receives with every audio frame."""

    #: sessions one worker owns at once
    concurrency = 64

    def open_session(self, frame: SessionOpen, snapshot: dict | None = None) -> Any:
        """Make the per-session object.  ``snapshot`` is what ``snapshot`` returned for
        this session on its last owner, when this worker takes the session over (the
        owner died); ``None`` on a session's first open.  The runtime passes it only
        when it is a non-empty dict, so ``open_session(self, frame)`` still works for a
        stage that keeps no state across a takeover."""
        raise NotImplementedError

    def snapshot(self, session: Any) -> dict:
        """A small JSON-able dict of the per-session state that must survive a takeover.
        The runtime stores it with the session's audio position after every batch of
        audio frames (so keep it small and cheap), and hands it to the next owner's
        ``open_session``.  Default: nothing."""
        return {}

    async def process(self, frame: Frame, session: Any = None) -> AsyncIterator[Frame]:  # type: ignore[override]
        raise NotImplementedError
        yield  # pragma: no cover
