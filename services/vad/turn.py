"""Semantic end of turn: has the user finished, or only paused mid-thought?

The VAD hears a pause; a pause alone cannot tell "what is the capital of France?"
from "my number is one zero zero ... (breath) ... nine oh two".  The smart-turn v3
model (Daily, BSD-2-Clause; a Whisper-tiny encoder with a small classifier, 8 MB
ONNX) listens to the last 8 s of the turn's audio, prosody included, and gives the
probability that the turn is complete.  Only its weights are used: the file is
extracted from the pipecat-ai wheel by ``scripts/install.sh`` into
``<venv>/share/s2s/`` and run here on onnxruntime, on one thread, in ~20-60 ms.

Input: 16 kHz float audio, the last 8 s (shorter audio is zero-padded at the front),
normalised to zero mean and unit variance, as Whisper log-mel features (80 mels, 10 ms
hop, 800 frames), computed with numpy: the VAD role has no torch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

SR = 16000
WINDOW_S = 8
N_FFT, HOP, N_MELS = 400, 160, 80
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"


def default_model_path() -> Path:
    """Where scripts/install.sh puts the weights: <venv>/share/s2s/."""
    return Path(sys.prefix) / "share" / "s2s" / MODEL_FILE


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (what Whisper's filterbank uses): linear below 1 kHz, log above."""
    f = np.asarray(f, np.float64)
    return np.where(f < 1000, 3 * f / 200, 15 + np.log(np.maximum(f, 1e-9) / 1000) * 27 / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def _mel_filters() -> np.ndarray:
    """(N_FFT//2+1, N_MELS) triangular filters with Slaney area normalisation."""
    fft_hz = np.linspace(0, SR / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SR / 2), N_MELS + 2))
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_hz[:, None] - lower) / (centre - lower)
    falling = (upper - fft_hz[:, None]) / (upper - centre)
    return np.maximum(0, np.minimum(rising, falling)) * (2 / (upper - lower))


MEL = _mel_filters()
HANN = np.hanning(N_FFT + 1)[:-1]  # periodic, as torch.hann_window


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel features (80, 800) of exactly 8 s of 16 kHz audio."""
    x = audio.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * HANN, axis=-1)) ** 2
    spec = np.log10(np.maximum(power @ MEL, 1e-10)).T[:, :-1]  # Whisper drops the last frame
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio``; shorter audio is zero-padded at the front."""
    n = WINDOW_S * SR
    if len(audio) >= n:
        return audio[-n:]
    return np.concatenate([np.zeros(n - len(audio), audio.dtype), audio])


class TurnModel:
    """smart-turn v3 on onnxruntime, one thread, shared by all sessions."""

    def __init__(self, path: str | Path | None = None, threshold: float = 0.5):
        self.path = Path(path) if path else default_model_path()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"end-of-turn model {self.path} is missing: run scripts/install.sh (or set "
                f"S2S_VAD_TURN_MODEL to the .onnx file, or to 'off')")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # engines share the cores: one thread each
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_features"]:
            raise RuntimeError(f"{self.path} is not a smart-turn v3 model (inputs {names})")
        self.threshold = threshold

    def probability(self, pcm16: np.ndarray) -> float:
        """Blocking: probability that the turn whose audio (16 kHz int16 or float, up to
        the pause) is ``pcm16`` is complete."""
        audio = pcm16.astype(np.float32)
        if pcm16.dtype == np.int16:
            audio /= 32768.0
        feats = log_mel(last_window(audio))[None]
        out = self.session.run(None, {"input_features": feats})[0]
        return float(np.asarray(out).reshape(-1)[0])

    def decide(self, pcm16: np.ndarray) -> tuple[bool, float, float]:
        """(complete?, probability, seconds the decision took)."""
        t0 = time.perf_counter()
        p = self.probability(pcm16)
        return p >= self.threshold, p, time.perf_counter() - t0
