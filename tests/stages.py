"""A minimal real stage for exercising the worker runtime without loading a model:
it answers each Transcript with a Notice carrying the same text, after a delay
taken from S2S_TEST_DELAY_S (so a test can kill the worker mid-item)."""

import asyncio
import os

from s2s.frames import Audio, Notice, Transcript
from s2s.stage import SessionStage, Stage


class EchoStage(Stage):
    name = "echo"

    def setup(self) -> None:
        self.delay = float(os.environ.get("S2S_TEST_DELAY_S", "0"))

    async def process(self, frame: Transcript):
        await asyncio.sleep(self.delay)
        yield Notice(sid=frame.sid, turn=frame.turn, marks=dict(frame.marks), event="echo",
                     message=frame.text)


class CrashStage(EchoStage):
    """Echoes, but kills its process outright on the text "crash": no exception, no
    cleanup, no ack, like a segfault or an OOM kill in a native library."""

    async def process(self, frame: Transcript):
        if frame.text == "crash":
            os._exit(1)
        async for out in super().process(frame):
            yield out


class CrashSessionStage(SessionStage):
    """A session-owning stage (reads s2s:vad:sessions like the VAD) that answers each
    audio frame with a Notice, and kills its process on the samples b"\xde\xad"."""
    name = "vad"

    def open_session(self, frame):
        return None

    async def process(self, frame: Audio, session=None):
        if frame.pcm == b"\xde\xad":
            os._exit(1)
        yield Notice(sid=frame.sid, event="heard", message=str(len(frame.pcm)))


class FailingStage(Stage):
    """A stage whose model never loads (for `s2s up` failing at start)."""
    name = "failing"

    def setup(self) -> None:
        raise RuntimeError("this test stage fails on purpose while loading")
