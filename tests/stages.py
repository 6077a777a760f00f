"""A minimal real stage for exercising the worker runtime without loading a model:
it answers each Transcript with a Notice carrying the same text, after a delay
taken from S2S_TEST_DELAY_S (so a test can kill the worker mid-item)."""

import asyncio
import os

from s2s.frames import Notice, Transcript
from s2s.stage import Stage


class EchoStage(Stage):
    name = "echo"

    def setup(self) -> None:
        self.delay = float(os.environ.get("S2S_TEST_DELAY_S", "0"))

    async def process(self, frame: Transcript):
        await asyncio.sleep(self.delay)
        yield Notice(sid=frame.sid, turn=frame.turn, marks=dict(frame.marks), event="echo",
                     message=frame.text)


class FailingStage(Stage):
    """A stage whose model never loads (for `s2s up` failing at start)."""
    name = "failing"

    def setup(self) -> None:
        raise RuntimeError("this test stage fails on purpose while loading")
