"""What one client session is sent, decided from the frames of its output stream.

``Playback.feed(frame)`` returns the messages to send (dicts for JSON events, bytes
for reply audio) and keeps the per-turn state: frames of older turns are dropped,
a newer turn starts a fresh state (and an ``interrupt`` when a reply of the old
turn was pending, being sent or still playing on the client), reply text and audio
are released in (seq, chunk) order with duplicates dropped.  No I/O here, so the
ordering rules are tested without Redis or sockets.

A speculative turn (``TurnStatus`` "tentative", sent by the VAD at a short pause)
is held: its transcript, reply text, audio and notices wait, unprocessed, until
``TurnStatus`` "committed" flushes them at once (latencies and ``audio_start`` are
measured then, when the client gets them).  If the user goes on instead, a newer
turn arrives and the held frames are dropped: nothing of them was sent, so that is
no barge-in (no ``interrupt``).

A false interruption of the user: a reply went out (maybe still playing), and the user
goes on with the same thought (``SpeechStarted.continues``: the VAD will send the whole
thought again, and the LLM stage drops the reply to the fragment from the history).
The newer turn stops that reply (``interrupt`` when it is still playing) and
``turn_resumed`` tells the client which turn's reply answered too early, so a UI can
take it back; the whole thought gets one reply, in the new turn.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Union

import numpy as np
from prometheus_client import Counter

from s2s import metrics
from s2s.frames import (Frame, Notice, ReplyAudio, ReplyText, SpeechStarted, ToolCall, Transcript,
                        TurnStatus)

log = logging.getLogger("s2s.gateway")

RESUMED = Counter("s2s_turns_resumed", "Replies that answered a fragment: the user went on with "
                  "the same thought after a reply had gone out (turn_resumed; the whole thought "
                  "is answered once, in the new turn).")

Message = Union[dict, bytes]
GAP_TIMEOUT_S = 10.0     # a missing piece this long while later ones wait: skip it
PLAYBACK_MARGIN_S = 0.5  # client-side buffering allowed for when guessing "still playing"
MAX_BUFFERED = 4000      # frames held back per turn (a runaway producer cannot grow memory)


def latency_ms(frame: Frame, now: float) -> float | None:
    end = frame.marks.get("speech_end")
    return round((now - end) * 1000, 1) if end else None


class TurnState:
    def __init__(self, turn: int):
        self.turn = turn
        self.speech_sent = False
        self.transcript_sent = False
        self.reply_seen = False           # any reply text/audio of this turn arrived
        self.text_next = 0
        self.text_buf: dict[int, ReplyText] = {}
        self.text_done = False
        self.audio_next = (0, 0)
        self.audio_buf: dict[tuple[int, int], ReplyAudio] = {}
        self.blocked_since: float | None = None  # buffered pieces wait for a missing one
        self.audio_sr = 0                 # rate announced in audio_start (0: not started)
        self.audio_t0 = 0.0
        self.audio_s = 0.0                # seconds of audio sent
        self.done = False                 # reply_done sent
        self.held = False                 # tentative (speculative) turn: output waits
        self.committed = False            # the speculation was confirmed (a late
        self.held_frames: list[Frame] = []  # re-delivered "tentative" holds nothing)

    def playing(self, now: float) -> bool:
        """A reply is pending, being sent, or (estimated) still playing on the client."""
        if not self.reply_seen:
            return False
        if not self.done:
            return True
        return bool(self.audio_sr) and now < self.audio_t0 + self.audio_s + PLAYBACK_MARGIN_S


class Playback:
    def __init__(self, turn: int = 0, clock: Callable[[], float] = time.time,
                 marks: bool = False):
        self.clock = clock
        self.t = TurnState(turn)
        self.dropped = 0  # stale or duplicate frames
        self.marks = marks  # announce each audio piece's (seq, chunk) (hello "audio_marks")

    def resume(self, heard: object) -> bool:
        """A client resuming (maybe on another gateway) says what of the current turn it
        already got (hello ``heard``: turn, transcript, text_next, audio_next [seq, chunk],
        sample_rate); the replay of that turn then skips it, so nothing is heard twice.
        Anything malformed is ignored (the turn is replayed whole)."""
        if not isinstance(heard, dict) or heard.get("turn") != self.t.turn:
            return False
        t = self.t
        text_next, audio_next, sr = heard.get("text_next", 0), heard.get("audio_next"), \
            heard.get("sample_rate", 0)
        if not (_nat(text_next) and _nat(sr) and isinstance(audio_next, list)
                and len(audio_next) == 2 and all(_nat(x) for x in audio_next)):
            return False
        t.speech_sent = t.transcript_sent = bool(heard.get("transcript"))
        t.text_next = text_next
        t.audio_next = (audio_next[0], audio_next[1])
        if t.audio_next > (0, 0) and sr:
            t.audio_sr, t.audio_t0 = sr, self.clock()  # no second audio_start
            t.reply_seen = True
        return True

    @property
    def turn(self) -> int:
        return self.t.turn

    # --- frames in, messages out -------------------------------------------------------
    def feed(self, frame: Frame) -> list[Message]:
        out: list[Message] = []
        if frame.turn < self.t.turn:
            self.dropped += 1
            return out
        if frame.turn > self.t.turn:
            self._advance(frame.turn, out,
                          resumes=isinstance(frame, SpeechStarted) and frame.continues)
        t = self.t
        if isinstance(frame, TurnStatus):
            if frame.status == "tentative":
                t.held = not t.committed
            elif not t.committed:
                t.held, t.committed = False, True
                held, t.held_frames = t.held_frames, []
                for f in held:  # released at once, in arrival order
                    self._handle(f, out)
            return out
        if t.held and not isinstance(frame, SpeechStarted):
            if len(t.held_frames) >= MAX_BUFFERED:
                self.dropped += 1
            else:
                t.held_frames.append(frame)
            return out
        self._handle(frame, out)
        return out

    def _handle(self, frame: Frame, out: list[Message]) -> None:
        t = self.t
        now = self.clock()
        if isinstance(frame, SpeechStarted):
            if not t.speech_sent:
                t.speech_sent = True
                out.append({"type": "speech_started", "turn": t.turn, "at_s": frame.at_s})
        elif isinstance(frame, Transcript):
            if not t.transcript_sent:
                t.transcript_sent = True
                out.append({"type": "transcript", "turn": t.turn, "text": frame.text,
                            "start_s": frame.start_s, "end_s": frame.end_s})
                self._observe(metrics.FIRST_TRANSCRIPT, frame, now)
            else:
                self.dropped += 1
        elif isinstance(frame, ReplyText):
            self._text(frame, out, now)
        elif isinstance(frame, ReplyAudio):
            self._audio(frame, out, now)
        elif isinstance(frame, ToolCall):  # the client runs it, answers with tool_output
            t.reply_seen = True
            out.append({"type": "tool_call", "turn": t.turn, "call_id": frame.call_id,
                        "name": frame.name, "arguments": frame.arguments})
        elif isinstance(frame, Notice):
            if frame.event == "error":
                out.append({"type": "error", "code": "stage_error", "message": frame.message,
                            "turn": frame.turn})
            else:
                out.append({"type": "notice", "event": frame.event, "message": frame.message,
                            "turn": frame.turn})

    def supersede(self, turn: int) -> list[Message]:
        """The session moved on to ``turn`` without a frame saying so (the client cancelled
        the reply): drop the old turn's state, with an ``interrupt`` if it was playing."""
        out: list[Message] = []
        if turn > self.t.turn:
            self._advance(turn, out)
        return out

    def check_gaps(self) -> list[Message]:
        """Skip a piece that never came (a lost entry) so the reply goes on."""
        out: list[Message] = []
        t = self.t
        if t.audio_buf and t.blocked_since is not None and \
                self.clock() - t.blocked_since > GAP_TIMEOUT_S:
            skip_to = min(t.audio_buf)
            log.warning("reply audio piece %s never came: skipping to %s", t.audio_next, skip_to,
                        extra={"turn": t.turn})
            t.audio_next = skip_to
            self._release_audio(out, self.clock())
        return out

    # --- internals ---------------------------------------------------------------------------
    def _advance(self, turn: int, out: list[Message], resumes: bool = False) -> None:
        """``resumes``: the new turn's speech goes on with the old turn's thought."""
        if self.t.playing(self.clock()):
            out.append({"type": "interrupt", "turn": turn})
            metrics.INTERRUPTS.inc()
        if resumes and self.t.reply_seen:  # something of the old reply went out
            out.append({"type": "turn_resumed", "turn": turn, "replaced_turn": self.t.turn})
            RESUMED.inc()
        self.t = TurnState(turn)

    def _observe(self, histogram, frame: Frame, now: float) -> float | None:
        ms = latency_ms(frame, now)
        if ms is not None and ms >= 0:
            histogram.observe(ms / 1000)
        return ms

    def _text(self, frame: ReplyText, out: list[Message], now: float) -> None:
        t = self.t
        t.reply_seen = True
        if t.text_done or frame.seq < t.text_next or frame.seq in t.text_buf or \
                len(t.text_buf) >= MAX_BUFFERED:
            self.dropped += 1
            return
        t.text_buf[frame.seq] = frame
        while t.text_next in t.text_buf:
            f = t.text_buf.pop(t.text_next)
            if t.text_next == 0:
                self._observe(metrics.FIRST_REPLY_TEXT, f, now)
            out.append({"type": "reply_text", "turn": t.turn, "seq": f.seq, "text": f.text,
                        "final": f.final})
            t.text_next += 1
            if f.final:
                t.text_done = True
                t.text_buf.clear()

    def _audio(self, frame: ReplyAudio, out: list[Message], now: float) -> None:
        t = self.t
        t.reply_seen = True
        key = (frame.seq, frame.chunk)
        if t.done or key < t.audio_next or key in t.audio_buf or \
                len(t.audio_buf) >= MAX_BUFFERED:
            self.dropped += 1
            return
        t.audio_buf[key] = frame
        self._release_audio(out, now)
        if t.audio_buf and t.blocked_since is None:
            t.blocked_since = now

    def _release_audio(self, out: list[Message], now: float) -> None:
        t = self.t
        while t.audio_next in t.audio_buf:
            t.blocked_since = None
            f = t.audio_buf.pop(t.audio_next)
            if f.pcm:
                if not t.audio_sr:
                    t.audio_sr, t.audio_t0 = f.sr, now
                    ms = self._observe(metrics.VOICE_TO_VOICE, f, now)
                    if ms is not None and ms >= 0:
                        metrics.FIRST_AUDIO.observe(ms / 1000)
                    out.append({"type": "audio_start", "turn": t.turn, "sample_rate": f.sr,
                                "voice_to_voice_ms": ms})
                pcm = f.pcm if f.sr == t.audio_sr else resample(f.pcm, f.sr, t.audio_sr)
                t.audio_s += len(pcm) / 2 / t.audio_sr
                if self.marks:
                    out.append({"type": "audio_chunk", "turn": t.turn, "seq": f.seq,
                                "chunk": f.chunk, "last": f.last, "bytes": len(pcm)})
                out.append(pcm)
            if f.final:
                t.done = True
                t.audio_buf.clear()
                out.append({"type": "reply_done", "turn": t.turn})
                return
            t.audio_next = (f.seq + 1, 0) if f.last else (f.seq, f.chunk + 1)


def resample(pcm: bytes, sr: int, to_sr: int) -> bytes:
    """A piece at another rate than the turn's first (mixed voices): convert it."""
    import soxr

    return soxr.resample(np.frombuffer(pcm, np.int16), sr, to_sr).astype(np.int16).tobytes()


def _nat(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 31
