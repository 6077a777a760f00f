"""PCM helpers shared by stages, the gateway and tests: 16-bit PCM <-> float32,
one-shot and streaming resampling (soxr), and a loudness measure."""

from __future__ import annotations

import numpy as np
import soxr


def pcm16_to_float(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Little-endian int16 PCM (bytes or an int16 array) -> float32 in [-1, 1)."""
    samples = np.frombuffer(pcm, dtype="<i2") if not isinstance(pcm, np.ndarray) else pcm
    return samples.astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> little-endian int16 PCM bytes (clipped, not wrapped)."""
    return to_int16(audio).astype("<i2").tobytes()


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def read_audio(path, sr: int = 16000) -> np.ndarray:
    """Any file soundfile reads (WAV, FLAC, MP3, …) -> int16 mono at ``sr``."""
    import soundfile as sf

    data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    return to_int16(resample(data.mean(axis=1), file_sr, sr))


def resample(audio: np.ndarray, in_sr: int, out_sr: int) -> np.ndarray:
    """Resample a whole float32 (or int16) signal; returns the same dtype."""
    if in_sr == out_sr:
        return audio
    return soxr.resample(audio, in_sr, out_sr)


class StreamResampler:
    """Resamples a stream piece by piece without clicks at the piece boundaries
    (soxr keeps the filter state).  The same rate in and out passes through."""

    def __init__(self, in_sr: int, out_sr: int, dtype: str = "float32", quality: str = "HQ"):
        self.in_sr, self.out_sr = in_sr, out_sr
        self._stream = (None if in_sr == out_sr else
                        soxr.ResampleStream(in_sr, out_sr, 1, dtype=dtype, quality=quality))

    def __call__(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return audio
        return self._stream.resample_chunk(audio, last=last)


def rms_dbfs(audio: np.ndarray) -> float:
    """Loudness of a float32 signal in dB relative to full scale (-120 for silence)."""
    if audio.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return 20.0 * np.log10(max(rms, 1e-6))
