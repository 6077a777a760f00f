"""What both ends of a WebRTC call made with aiortc need (the gateway's calls,
gateway/webrtc*.py, and the client, client/webrtc.py): decoded frames as int16 mono, and a
receiver that hands each audio packet on as soon as it is complete.  aiortc is imported
by the callers; nothing here needs it at import time."""

from __future__ import annotations

import fractions
import logging
from typing import Any

import numpy as np

log = logging.getLogger("s2s.rtc")

JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"


def mono_int16(frame: Any) -> np.ndarray:
    """A decoded ``av.AudioFrame`` (any channel count, packed or planar, s16 or float)
    -> int16 mono at the frame's rate."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        samples = data.reshape(channels, -1).astype(np.float32).mean(axis=0)
    else:
        samples = data.reshape(-1, channels).astype(np.float32).mean(axis=1)
    if frame.format.name.startswith(("flt", "dbl")):
        samples = samples * 32767.0
    return np.clip(np.round(samples), -32768, 32767).astype(np.int16)


def int16_frame(pcm: bytes, rate: int, pts: int) -> Any:
    """Mono 16-bit ``pcm`` as the ``av.AudioFrame`` a sending track returns, stamped
    ``pts`` in samples: stereo, the one channel in both.  aiortc's Opus encoder codes
    stereo, and a mono frame reaches it through ffmpeg's upmix, which puts the channel in
    both at -3 dB (0.707): every call then heard the caller 3 dB quieter than it spoke
    (measured: delivered/sent RMS 0.706 mono, 1.001 stereo)."""
    from av import AudioFrame

    samples = np.frombuffer(pcm, "<i2")
    frame = AudioFrame(format="s16", layout="stereo", samples=len(samples))
    frame.planes[0].update(np.repeat(samples, 2).tobytes())
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


class Resampler:
    """int16 mono at ``in_rate`` -> int16 mono at ``out_rate``, piece by piece, with
    libswresample (through av, which aiortc brings).  It holds back only its filter's half
    length (16 output samples) and gives each 20 ms frame out as 20 ms: soxr's stream
    gives fixed blocks (LQ 48 -> 24 kHz: 470 samples a call, then 940), so it held
    between 0 and 19 ms of each end's audio, ~10 ms on average, at each resampling of the
    call (the caller's 16 -> 48 kHz, the gateway's 48 -> 24, the reply's 48 -> 16)."""

    def __init__(self, in_rate: int, out_rate: int):
        from av import AudioResampler

        self.in_rate, self.out_rate = in_rate, out_rate
        self.pts = 0
        self._swr = (None if in_rate == out_rate else
                     AudioResampler(format="s16", layout="mono", rate=out_rate))

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self._swr is None or not len(samples):
            return samples
        from av import AudioFrame

        frame = AudioFrame.from_ndarray(np.asarray(samples, "<i2").reshape(1, -1),
                                        format="s16", layout="mono")
        frame.sample_rate = self.in_rate
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, self.in_rate)
        self.pts += len(samples)
        out = [f.to_ndarray().reshape(-1) for f in self._swr.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.int16)


def hand_on_at_once(receiver: Any) -> bool:
    """Let ``receiver`` (an aiortc RTCRtpReceiver of audio) decode each packet as it
    arrives.  aiortc's audio jitter buffer holds 4 packets before the first (80 ms of
    Opus at 20 ms a packet: measured as the last 80 ms of a call's speech reaching the
    session only once more audio came), and even without that hold it hands a packet on
    only when the next one shows it complete (20 ms more).  An Opus packet is a whole
    frame, and neither end plays what it receives on a clock (the gateway feeds the VAD,
    the client measures), so holding smooths nothing and delays every turn.  aiortc has
    no setting for it: its private jitter buffer is replaced; False (and the default
    kept) if aiortc changed."""
    from aiortc.jitterbuffer import JitterBuffer, JitterFrame

    class AtOnce(JitterBuffer):
        """Each packet on as it comes; one not newer than the last (late, or repeated) is
        dropped, as a frame already played would be."""

        def __init__(self) -> None:
            super().__init__(capacity=16)
            self.last: int | None = None

        def add(self, packet: Any) -> tuple[bool, Any]:
            seq = packet.sequence_number
            if self.last is not None and not 0 < (seq - self.last) % 65536 < 32768:
                return False, None
            self.last = seq
            return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)

    buffer = getattr(receiver, JITTER_ATTR, None)
    if not isinstance(buffer, JitterBuffer) or getattr(buffer, "_is_video", False):
        log.warning("aiortc's audio jitter buffer was not found: its 80 ms hold stays")
        return False
    setattr(receiver, JITTER_ATTR, AtOnce())
    return True
