"""G.711 μ-law and A-law (8 kHz telephony audio) to and from 16-bit PCM, with numpy.

The Realtime API's `audio/pcmu` and `audio/pcma` formats.  Python's `audioop` is gone
from 3.13, so the codec is here: the ITU reference algorithms (as in Sun's g711.c),
decoded through 256-entry tables and encoded through 65,536-entry tables built once.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_SEG_END_ULAW = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_SEG_END_ALAW = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(value: int, ends: tuple[int, ...]) -> int:
    for i, end in enumerate(ends):
        if value <= end:
            return i
    return len(ends)


def _ulaw_byte(sample: int) -> int:
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 33
    seg = _segment(value, _SEG_END_ULAW)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((value >> (seg + 1)) & 0xF)) ^ mask


def _ulaw_sample(byte: int) -> int:
    u = ~byte & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return 0x84 - t if u & 0x80 else t - 0x84


def _alaw_byte(sample: int) -> int:
    value = sample >> 3
    if value >= 0:
        mask = 0xD5
    else:
        mask, value = 0x55, -value - 1
    seg = _segment(value, _SEG_END_ALAW)
    if seg >= 8:
        return 0x7F ^ mask
    aval = seg << 4
    aval |= ((value >> 1) if seg < 2 else (value >> seg)) & 0x0F
    return aval ^ mask


def _alaw_sample(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


@lru_cache(maxsize=None)
def _tables(law: str) -> tuple[np.ndarray, np.ndarray]:
    """(decode table: 256 int16 samples, encode table: 65,536 bytes by uint16 sample)."""
    to_byte, to_sample = (_ulaw_byte, _ulaw_sample) if law == "ulaw" else (_alaw_byte, _alaw_sample)
    decode = np.array([to_sample(b) for b in range(256)], np.int16)
    samples = np.arange(65536, dtype=np.int32)
    samples[samples >= 32768] -= 65536
    encode = np.array([to_byte(int(s)) for s in samples], np.uint8)
    return decode, encode


def decode(data: bytes, law: str) -> bytes:
    """G.711 bytes (``law``: ``ulaw`` or ``alaw``) to 16-bit little-endian PCM."""
    table, _ = _tables(law)
    return table[np.frombuffer(data, np.uint8)].astype("<i2").tobytes()


def encode(pcm: bytes, law: str) -> bytes:
    """16-bit little-endian PCM to G.711 bytes."""
    _, table = _tables(law)
    return table[np.frombuffer(pcm, "<i2").view(np.uint16)].tobytes()


def prepare() -> None:
    """Build both laws' tables now (about 0.3 s): at the gateway's start, not inside the
    first phone call's event loop, where every other session would wait for it."""
    for law in ("ulaw", "alaw"):
        _tables(law)
