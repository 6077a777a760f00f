"""The audio of a WebRTC call: the caller's microphone track in, the reply track out.

``MicPump`` reads the remote (Opus-decoded) track and hands 16-bit mono PCM at the
session's rate to a sink, resampled with libswresample (``s2s.rtc.Resampler``: each frame
out whole, ~0.7 ms held).
``ReplyTrack`` is the outgoing track: reply PCM is queued and leaves in 20 ms frames
paced on a real-time clock (aiortc encodes them to Opus), silence when there is none.
``clear()`` drops everything queued at once (barge-in); ``played(tag)`` says how much
of one response's audio has gone out, which is what the caller heard, give or take the
network and its jitter buffer."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from s2s.rtc import Resampler, int16_frame, mono_int16

from .limits import within

log = logging.getLogger("s2s.gateway.webrtc")

TRACK_RATE = 48000          # Opus's own clock: frames of this rate pass the encoder as is
FRAME_MS = 20
FRAME_SAMPLES = TRACK_RATE * FRAME_MS // 1000
# Opus's encoder look-ahead, which the decoder's first output carries as a lead of
# nothing (Ogg Opus calls it pre-skip; RTP says nothing of it): dropped, the session's
# audio lines up with what the caller sent sample for sample, as over /ws, so the VAD's
# 32 ms windows and the STT cut the same speech at the same places (left in, every
# call's speech came 6.5 ms late in session time and the end of speech was found a VAD
# window later in 6 of 7 inputs, as measured by the bench's vad_end_s)
OPUS_LOOKAHEAD_S = 0.0065
MAX_QUEUED_S = 120.0        # reply audio waiting to be played (MAX_AUDIO_S of the gateway)
KEEP_TAGS = 16              # responses whose played seconds are remembered


class MicPump:
    """Reads ``track`` until it ends; ``sink(pcm)`` gets each frame as int16 bytes at
    ``rate`` (the frame's own rate is resampled, mono mixed down)."""

    def __init__(self, track: MediaStreamTrack, rate: int, sink: Callable[[bytes], None]):
        self.track, self.rate, self.sink = track, rate, sink
        self.frames = 0
        self._resampler: Resampler | None = None
        self._in_rate = 0
        self._skip: int | None = None   # look-ahead samples still to drop

    async def run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:  # the caller's track ended (hang-up, failed ICE)
                return
            self.frames += 1
            if frame.sample_rate != self._in_rate:
                self._in_rate = frame.sample_rate
                self._resampler = Resampler(frame.sample_rate, self.rate)
            samples = mono_int16(frame)
            if self._skip is None:
                self._skip = round(OPUS_LOOKAHEAD_S * frame.sample_rate)
            if self._skip:
                dropped = samples[: self._skip]
                samples = samples[len(dropped):]
                self._skip -= len(dropped)
            pcm = self._resampler(samples)
            if len(pcm):
                self.sink(np.asarray(pcm, "<i2").tobytes())


class ReplyTrack(MediaStreamTrack):
    """The outgoing audio track: queued 16-bit mono PCM at TRACK_RATE, paced in real time."""

    kind = "audio"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock
        self.chunks: collections.deque[tuple[str, bytes]] = collections.deque()
        self.queued = 0                 # bytes in chunks
        self.dropped_s = 0.0            # reply audio over MAX_QUEUED_S, never played
        self.idle = asyncio.Event()     # nothing queued: what was pushed has gone out
        self.idle.set()
        self._played: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._start: float | None = None
        self._pts = 0
        self._silent = True             # the last frame sent carried no reply audio
        self._pushed = asyncio.Event()

    def push(self, pcm: bytes, tag: str) -> None:
        """Queue reply audio of response ``tag`` (int16 mono at TRACK_RATE)."""
        if not pcm:
            return
        if self.queued + len(pcm) > MAX_QUEUED_S * TRACK_RATE * 2:
            self.dropped_s += len(pcm) / 2 / TRACK_RATE
            log.warning("reply audio over %.0f s queued: %d bytes dropped", MAX_QUEUED_S, len(pcm))
            return
        self.chunks.append((tag, pcm))
        self.queued += len(pcm)
        self.idle.clear()
        self._pushed.set()

    def clear(self) -> float:
        """Drop all queued audio now; returns the seconds dropped."""
        dropped = self.queued / 2 / TRACK_RATE
        self.chunks.clear()
        self.queued = 0
        self.idle.set()
        return dropped

    def played(self, tag: str) -> float:
        """Seconds of response ``tag``'s audio sent so far."""
        return self._played.get(tag, 0) / 2 / TRACK_RATE

    def _take(self, want: int) -> bytes:
        out = bytearray()
        while self.chunks and len(out) < want:
            tag, pcm = self.chunks[0]
            piece = pcm[: want - len(out)]
            out += piece
            self._played[tag] = self._played.get(tag, 0) + len(piece)
            self._played.move_to_end(tag)
            while len(self._played) > KEEP_TAGS:
                self._played.popitem(last=False)
            if len(piece) == len(pcm):
                self.chunks.popleft()
            else:
                self.chunks[0] = (tag, pcm[len(piece):])
        self.queued -= len(out)
        if not self.chunks:
            self.idle.set()
        return bytes(out)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self.clock()
        if self._start is None:
            self._start = now
        else:
            wait = self._start + self._pts / TRACK_RATE - now
            if wait > 0 and self._silent and not self.chunks:
                # silence went out last: a reply's first frame leaves as soon as it is
                # pushed, not at the next tick (10 ms sooner on average); the clock then
                # runs from there
                self._pushed.clear()
                try:
                    await within(wait, self._pushed.wait())
                    self._start = self.clock() - self._pts / TRACK_RATE
                except asyncio.TimeoutError:
                    pass
            elif wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:  # the loop stalled: carry on from now, not in a burst
                self._start = now - self._pts / TRACK_RATE
        want = FRAME_SAMPLES * 2
        pcm = self._take(want)
        self._silent = not pcm
        if len(pcm) < want:
            pcm += bytes(want - len(pcm))
        frame = int16_frame(pcm, TRACK_RATE, self._pts)
        self._pts += FRAME_SAMPLES
        return frame
