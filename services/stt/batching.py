"""Several sessions' utterances decoded together (see the STT worker's docstring).

On one CPU thread a batch of whisper decodes costs about as much as its longest member
(the decoder's matrix-vector steps become matrix-matrix ones), so utterances that wait
together are batched when their lengths are similar (``group_similar``), shortest
group first; on CUDA all that wait (``group_by_prompt``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
from prometheus_client import Counter

SR = 16000
SIMILAR = 1.6  # CPU: utterances batched together differ at most this much in length

BATCHED = Counter("s2s_stt_batched", "Utterances decoded in a batch with others (CPU or CUDA).")

@dataclass
class Job:
    """One utterance to decode: 16 kHz audio; ``prompt``, the text said before it (a
    continued thought's, whisper's previous-text prompt; "" for none); ``split_s``: also
    find which words start before this time (``Heard.aligner``); ``stop``, set when its
    turn is superseded."""
    audio: np.ndarray
    prompt: str = ""
    split_s: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)



def group_similar(jobs: list[Job], max_batch: int) -> list[list[int]]:
    """CPU batching: indices of ``jobs`` in groups decoded together, shortest group first.
    A group holds jobs of similar length (the longest at most SIMILAR times the shortest,
    or all under 2 s): a batch costs about what its longest member costs, so a short
    utterance batched with a long one would wait for it.  Jobs with previous text and
    without it are never in one group (see Whisper._prompts)."""
    groups: list[list[int]] = []
    for prompted in (False, True):
        order = sorted((i for i, j in enumerate(jobs) if bool(j.prompt) == prompted),
                       key=lambda i: len(jobs[i].audio))
        for i in order:
            g = groups[-1] if groups and bool(jobs[groups[-1][0]].prompt) == prompted else None
            if g and len(g) < max_batch \
                    and len(jobs[i].audio) <= max(SIMILAR * len(jobs[g[0]].audio), 2 * SR):
                g.append(i)
            else:
                groups.append([i])
    groups.sort(key=lambda g: len(jobs[g[0]].audio))
    return groups


def group_by_prompt(jobs: list[Job], max_batch: int) -> list[list[int]]:
    """CUDA: all that wait in one batch (a GPU batch costs little more than one item),
    but those with previous text apart from those without (see Whisper._prompts)."""
    groups = [[i for i, j in enumerate(jobs) if not j.prompt],
              [i for i, j in enumerate(jobs) if j.prompt]]
    return [g for g in groups if g]


class MicroBatcher:
    """Utterances that wait together share one call of ``fn`` (a list of items -> a list
    of results): those arriving within ``wait_s`` of the first, and all that queued up
    while the last batch ran.  ``split`` cuts what waits into groups run one after the
    other (each group's results are handed out as soon as it is done)."""

    def __init__(self, fn: Callable[[list], list], max_batch: int,
                 run: Callable[..., Awaitable], wait_s: float = 0.005,
                 split: Callable[[list, int], list[list[int]]] | None = None):
        self.fn, self.max_batch, self.run, self.wait_s = fn, max_batch, run, wait_s
        self.split = split
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.Task | None = None

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # created on first use, inside the (current) event loop
            self.queue, self.loop = asyncio.Queue(), loop
            self.server = loop.create_task(self._serve(self.queue))
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _serve(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            items = [item for item, _ in batch]
            groups = self.split(items, self.max_batch) if self.split else [list(range(len(batch)))]
            for group in groups:
                live = [batch[i] for i in group if not batch[i][1].done()]  # cancelled: stale
                if live:
                    await self._run(live)

    async def _run(self, batch: list) -> None:
        try:
            results = await self.run(self.fn, [item for item, _ in batch])
            if len(batch) > 1:
                BATCHED.inc(len(batch))
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
        except Exception as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)


