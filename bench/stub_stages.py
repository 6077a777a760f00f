"""STUB stages: timing stubs of STT, LLM and TTS, for ``s2s.bench.autoscale`` only.

NOT MODELS.  Each stub is the real stage class (the worker runtime, its slots, batching,
lookahead, turn holds, history and scheduling all run as in production) with only the
model call replaced by a sleep whose length follows the CPU figures this project measured
(docs/performance.md, services/*/worker.py), times a slowdown factor the bench sets
(``S2S_STUB_SLOWDOWN``).  They say STUB in their names, in ``describe()`` (logs,
``/healthz``) and in every text they produce:

- ``StubStt`` (services/stt/worker.py ``SttStage``): a batch of ``b`` utterances costs
  ``(0.10 s + 0.01 s per second of the longest) * BATCH_COST[b]`` (whisper tiny.en int8,
  one thread: ~125 ms for a short question, 2 utterances cost 1.33x one, 4 cost 2.8x).
  The transcript is filler words (2.5 a second of audio) ending in a full stop, so
  whether the turn is over is decided as in production by the real VAD's end-of-turn
  model and the LLM's holds.
- ``StubLlm`` (services/llm/worker.py ``LlmStage`` on the backend ``StubLlmBackend``):
  one generation loop per worker as the batched transformers backend: a new turn's
  prefill (80 ms) goes before the next step, a step advances every active reply by one
  token and costs ``27 ms + 5.9 ms per extra reply`` (SmolLM2-135M, one thread: 27 / 48
  / 68 ms for 1 / 4 / 8 rows).  The reply is a fixed text of ~58 tokens (4 characters
  each; three sentences, the first one short) that sounds for ~11 s.
- ``StubTts`` (services/tts/worker.py ``TtsStage``): a piece of ``p`` phonemes (here:
  characters) renders in ``0.04 s + 5.5 ms * p`` on the one render thread (Piper: ~0.15 s
  for 20, ~0.4 s for 65) and sounds for ``0.05 s * p`` (silence).

A stub's "model load" is a sleep of ``S2S_STUB_LOAD_S`` (defaults below), so a new pod
takes a little while to become ready, as a real one does.

``python -m s2s.bench.stub_stages gateway ARGS`` runs the real gateway with admission's
per-VAD-worker cap set to ``S2S_AUTOSCALE_VAD_SESSIONS`` (the bench's session scale; the
VAD workers get the same number as ``S2S_CONCURRENCY``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import sys
import time
from typing import AsyncIterator

import numpy as np

from s2s.config import Settings
from s2s.services.llm import backends
from s2s.services.llm.worker import LlmStage
from s2s.services.stt.batching import Job, MicroBatcher, group_similar
from s2s.services.stt.worker import Heard, SttStage
from s2s.services.tts.schedule import RenderQueue, Replies
from s2s.services.tts.worker import TtsStage

log = logging.getLogger("s2s.stub")

STUB = "STUB"
LOAD_S = {"stt": 1.0, "llm": 3.0, "tts": 1.0}  # a stub's "model load" (S2S_STUB_LOAD_S)

# STT: whisper tiny.en int8, one CPU thread (docs/performance.md, scaling.md)
STT_BASE_S = 0.10
STT_PER_AUDIO_S = 0.01
BATCH_COST = {1: 1.0, 2: 1.33, 3: 2.1, 4: 2.8}   # cost of a batch of b, in single decodes
STT_WORDS_PER_S = 2.5
# LLM: the batched transformers loop (services/llm/backends/batch.py)
LLM_PREFILL_S = 0.080
LLM_STEP_S = 0.027
LLM_STEP_PER_ROW_S = 0.0059
REPLY = ("Here is the stub's answer. This reply comes from the timing stub of the autoscale "
         "bench, not from a model, and it is the same for every turn. It is about as long as "
         "a short spoken answer, so that saying it takes a realistic time.")
CHARS_PER_TOKEN = 4        # a BPE token of English text, roughly
# TTS: Piper en_US-joe-medium on one thread (services/tts/worker.py)
TTS_BASE_S = 0.04
TTS_PER_PHONEME_S = 0.0055
AUDIO_PER_PHONEME_S = 0.05
TTS_RATE = 22050


def slowdown() -> float:
    return float(os.environ.get("S2S_STUB_SLOWDOWN", "1") or 1)


def load(stage: str) -> None:
    seconds = float(os.environ.get("S2S_STUB_LOAD_S", LOAD_S[stage]))
    log.warning("%s %s stage: a timing stub, no model (s2s.bench.autoscale only); "
                "slowdown x%g, 'loading' for %.1f s", STUB, stage, slowdown(), seconds)
    time.sleep(seconds)


def stt_cost(seconds: list[float], factor: float = 1.0) -> float:
    """Seconds a batch of utterances of these lengths takes (one decode each, batched)."""
    b = len(seconds)
    batch = BATCH_COST.get(b, BATCH_COST[4] + 0.7 * (b - 4))
    return (STT_BASE_S + STT_PER_AUDIO_S * max(seconds)) * batch * factor


def llm_step(rows: int, factor: float = 1.0) -> float:
    return (LLM_STEP_S + LLM_STEP_PER_ROW_S * max(rows - 1, 0)) * factor


def tts_cost(phonemes: int, factor: float = 1.0) -> float:
    return (TTS_BASE_S + TTS_PER_PHONEME_S * phonemes) * factor


# --- STT ---------------------------------------------------------------------------------
class StubWhisper:
    name = f"{STUB} (sleeps like whisper tiny.en int8 on one CPU thread)"

    def __init__(self, factor: float):
        self.factor = factor

    def decode_jobs(self, jobs: list[Job]) -> list[Heard | None]:
        """Blocking, like Whisper.decode_jobs: the encoder's share (60 %), then, unless
        every job was superseded meanwhile, the decoder's."""
        lengths = [len(j.audio) / 16000 for j in jobs]
        cost = stt_cost(lengths, self.factor)
        time.sleep(0.6 * cost)
        if all(j.stop.is_set() for j in jobs):
            return [None] * len(jobs)
        time.sleep(0.4 * cost)
        out: list[Heard | None] = []
        for seconds in lengths:
            n = max(2, round(seconds * STT_WORDS_PER_S))
            filler = " ".join(["words"] * (n - 2))
            out.append(Heard(f"Stub heard {filler}.".replace("  ", " ").replace(" .", "."),
                             -0.2, 0.01, "en", n))
        return out


class StubStt(SttStage):
    name = "stt"

    def setup(self) -> None:
        load("stt")
        self.whisper = StubWhisper(slowdown())  # type: ignore[assignment]
        self.batcher = MicroBatcher(self.whisper.decode_jobs, self.concurrency,
                                    self.run_blocking, 0.002, group_similar)

    def describe(self) -> str:
        return f"{STUB} stt x{slowdown():g}, batches of <= {self.concurrency}"


# --- LLM ---------------------------------------------------------------------------------
class StubLlmBackend(backends.Backend):
    """A batched generation loop that sleeps instead of running a model."""
    name = "stub"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.concurrency = settings.llm_max_batch
        self.factor = slowdown()
        self.tokens = re.findall(r".{1,%d}" % CHARS_PER_TOKEN, REPLY, re.S)
        self._new: list[_Row] = []
        self._active: list[_Row] = []
        self._loop: asyncio.Task | None = None

    def setup(self) -> None:
        load("llm")

    def describe(self) -> str:
        return f"{STUB} llm x{self.factor:g}, {self.concurrency} replies batched"

    async def _engine(self) -> None:
        """The generation loop: waiting turns' prefills first, else one decode step of
        every active reply (each gets one token)."""
        try:
            while True:
                self._active = [r for r in self._active if not r.closed]
                self._new = [r for r in self._new if not r.closed]
                if not (self._new or self._active):
                    return
                if self._new:
                    new, self._new = self._new, []
                    await asyncio.sleep(LLM_PREFILL_S * self.factor * len(new))
                    for row in new:  # the prefill yields each its first token
                        row.tokens.put_nowait(True)
                    self._active += new
                    continue
                await asyncio.sleep(llm_step(len(self._active), self.factor))
                for row in self._active:
                    row.tokens.put_nowait(True)
        finally:
            self._loop = None

    async def stream(self, messages, max_tokens, temperature) -> AsyncIterator[str]:
        row = _Row()
        self._new.append(row)
        self.running += 1
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._engine())
        try:
            for token in self.tokens[:max_tokens]:
                await row.tokens.get()
                yield token
        finally:  # done, closed or cancelled: the row leaves the batch at the next step
            row.closed = True
            self.running -= 1
            self._new = [r for r in self._new if r is not row]


class _Row:
    def __init__(self) -> None:
        self.tokens: asyncio.Queue = asyncio.Queue()
        self.closed = False


class StubLlm(LlmStage):
    name = "llm"

    def __init__(self, settings: Settings):
        super().__init__(dataclasses.replace(settings, llm_backend="stub"))


backends.REGISTRY["stub"] = f"{__name__}:StubLlmBackend"


# --- TTS ---------------------------------------------------------------------------------
class _RunOptions:
    def __init__(self) -> None:
        self.terminate = False


class _Ort:
    RunOptions = _RunOptions


class StubVoice:
    """Piper's phonemizer, roughly: one list of "phonemes" (characters) per sentence."""

    def phonemize(self, text: str) -> list[list[str]]:
        return [list(s) for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


class StubTts(TtsStage):
    name = "tts"

    def setup(self) -> None:
        load("tts")
        self.factor = slowdown()
        self.voice = StubVoice()  # type: ignore[assignment]
        self._ort = _Ort()
        self.queue = RenderQueue()
        self.replies = Replies()
        self.active = {}
        self.aborted = 0
        self.abort_error = None
        self.syn_config = None
        self.rate = TTS_RATE
        self.backend = "stub"
        self.voice_name = STUB

    def describe(self) -> str:
        return f"{STUB} tts x{self.factor:g}, one render thread"

    def _render(self, phonemes: list[str], out_sr: int = 0, run_options=None) -> np.ndarray:
        """Blocking, like Piper: sleeps the render time (stopped within 10 ms when
        ``run_options.terminate`` is set, as onnxruntime is), returns silence as long
        as the speech would be."""
        end = time.monotonic() + tts_cost(len(phonemes), self.factor)
        while (left := end - time.monotonic()) > 0:
            if run_options is not None and run_options.terminate:
                raise RuntimeError("Exiting due to terminate flag")
            time.sleep(min(left, 0.01))
        sr = out_sr or self.rate
        return np.zeros(int(len(phonemes) * AUDIO_PER_PHONEME_S * sr), np.int16)


# --- the gateway with a scaled admission cap ------------------------------------------------
def gateway_main(argv: list[str]) -> int:
    from s2s import cli
    from s2s.gateway import admission

    cap = int(os.environ.get("S2S_AUTOSCALE_VAD_SESSIONS", "0") or 0)
    if cap > 0:
        admission.VAD_SESSIONS_PER_WORKER = cap
    return cli.main(["gateway", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] != ["gateway"]:
        raise SystemExit("usage: python -m s2s.bench.stub_stages gateway [gateway flags]")
    sys.exit(gateway_main(sys.argv[2:]))
