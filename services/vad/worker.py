"""VAD stage: owns sessions, finds where the user speaks, cuts utterances.

Silero VAD (v5, ONNX) runs on onnxruntime directly over 32 ms chunks (512 samples
at 16 kHz).  Each session carries the model's recurrent state and the last 64
samples of the previous chunk (the "context" silero's own OnnxWrapper prepends),
so streaming gives the same probabilities as running the whole file at once.

Endpointing follows silero's hysteresis: a chunk at or above ``vad_threshold``
starts (or continues) speech, one below ``threshold - 0.15`` counts as silence.
After ``vad_min_speech_ms`` of speech the turn advances and SpeechStarted goes out
(the barge-in signal); after ``vad_min_silence_ms`` of silence (or at
``vad_max_utterance_s``) the utterance goes to STT with ``vad_speech_pad_ms`` of
audio on each side.

A short min silence answers fast but also cuts at pauses mid-thought.  Speech that
resumes within ``vad_continue_ms`` of an utterance's end therefore *continues* it:
the next utterance starts where the thought started (earlier pieces and pauses
included, up to ``vad_max_utterance_s``), so STT hears the whole thought instead of
fragments it transcribes badly.  Each piece still opens a new turn, so the work on
the earlier pieces is dropped as stale: the continuation carries their audio.

Speculative turns: after ``vad_speculate_ms`` of silence (less than the min silence)
the utterance already goes to STT (``speculative``), preceded by a ``TurnStatus``
"tentative" to the session's out stream, so STT, the LLM and TTS start while the
gateway holds the turn's output.  When the pause reaches the min silence a
``TurnStatus`` "committed" releases it (no second utterance: the speculative one
holds the same audio).  If speech resumes first, the turn advances (``advance_turn``,
no SpeechStarted: the speech never stopped): every stage drops the speculation's work
as stale, the gateway drops what it held, and the next utterance carries the whole
thought in the new turn.  ``s2s_speculations_total{outcome}`` counts used / wasted.

Takeover: when the owner dies, the next one resumes with its ``snapshot``, so session
positions (``at_s``, ``start_s``, ``end_s``: the client's audio timeline) go on where
they were instead of restarting at 0.  While speech is in progress (or may still be
continued) the snapshot asks to be resumed from before the thought's start
(``replay_from``, with ``REPLAY_WARMUP_S`` for the model state to settle): the new owner
re-reads that audio with a fresh endpointer and model, so the utterance comes out
whole.  What the dead owner already sent (up to ``seen16``, its last position) is not
sent again: events of the replayed audio are only re-lived, and the turn goes on from
the dead owner's ``turn``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client import Counter, Histogram

from s2s.audio import StreamResampler, pcm16_to_float, to_int16
from s2s.frames import Audio, SessionConfig, SessionOpen, SpeechStarted, TurnStatus, Utterance
from s2s.stage import SessionStage

from .turn import TurnModel

log = logging.getLogger("s2s.vad")

SR = 16000          # the model's rate; utterances go to STT at this rate too
CHUNK = 512         # samples per model call (32 ms)
CONTEXT = 64        # samples of the previous chunk the v5 model sees again
NEG_OFFSET = 0.15   # speech ends only below threshold - 0.15 (silero's hysteresis)
MAX_FRAME_S = 10.0  # live audio comes in pieces of tens of ms; a longer frame is abuse
REPLAY_WARMUP_S = 0.5  # audio re-read before a thought at a takeover, for the model state
EARLY_S = 2.0       # speech resuming this soon after an answered pause: answered too early
# the turn model (~35 ms) starts this long (64 ms) before a speculative utterance needs it
DECISION_LEAD = 1024

TURN_DECISION = Histogram("s2s_turn_decision_seconds", "Time the end-of-turn model took to "
                          "decide at a pause.", buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075,
                                                         0.1, 0.15, 0.2, 0.3, 0.5, 1.0))
TURN_VERDICTS = Counter("s2s_turn_verdicts", "End-of-turn decisions at pauses, by verdict "
                        "(complete, incomplete, unknown: no model, or it failed).", ["verdict"])
SPECULATIONS = Counter("s2s_speculations", "Utterances sent early at a short pause "
                       "(vad_speculate_ms), by outcome: used (the end of turn was confirmed) or "
                       "wasted (the user went on; the turn's work was dropped).", ["outcome"])
TURN_EARLY = Counter("s2s_turn_early", "Pauses the turn model called complete after which the "
                     "user went on within 2 s (answered before the user finished).")


def silero_model_path() -> Path:
    """The ONNX file shipped in the silero-vad wheel (without importing its torch code)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed (pip install --no-deps silero-vad)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"


class SileroVad:
    """The ONNX model (shared by all sessions; onnxruntime's run() is thread-safe)."""

    def __init__(self, path: Path | None = None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # engines share 2 cores: one thread each
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = path or silero_model_path()
        # A 2 MB model on 32 ms chunks: the CPU is faster than a GPU round trip.
        self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise RuntimeError(f"{self.path} is not a silero v5 model (inputs {sorted(names)})")
        self._sr = np.array(SR, dtype=np.int64)

    @staticmethod
    def new_state() -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((2, 1, 128), np.float32), np.zeros(CONTEXT, np.float32)

    def probs(self, audio: np.ndarray, state: tuple[np.ndarray, np.ndarray]
              ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Speech probability of each whole 512-sample chunk of ``audio`` (float32,
        16 kHz, length a multiple of 512), carrying (rnn state, context) along."""
        rnn, context = state
        out = np.empty(len(audio) // CHUNK, np.float32)
        for i in range(len(out)):
            chunk = audio[i * CHUNK:(i + 1) * CHUNK]
            x = np.concatenate([context, chunk])[None, :]
            prob, rnn = self.session.run(None, {"input": x, "state": rnn, "sr": self._sr})
            out[i] = prob[0, 0]
            context = chunk[-CONTEXT:]
        return out, (rnn, context)


class VadSession:
    """One session: resampler, model state, recent audio and the endpointing state.
    Positions are sample indices at 16 kHz from the start of the session."""

    def __init__(self, opened: SessionOpen, settings):
        self.sid, self.in_sr, self.out_sr = opened.sid, opened.in_sr, opened.out_sr
        self.resample = StreamResampler(opened.in_sr, SR)
        self.model_state = SileroVad.new_state()
        self.buf = np.zeros(0, np.int16)  # recent 16 kHz audio, buf[0] is sample buf_start
        self.buf_start = 0
        self.n_vad = 0       # next chunk to run through the model
        self.in_samples = 0  # input samples received (at in_sr), to map audio -> wall time
        s = settings
        self.threshold = s.vad_threshold
        self.neg_threshold = max(s.vad_threshold - NEG_OFFSET, 0.01)
        self.min_silence = int(s.vad_min_silence_ms * SR / 1000)
        self.min_speech = int(s.vad_min_speech_ms * SR / 1000)
        # speech going on with a thought already sent (maybe answered: its reply must stop
        # at once) opens its turn after less speech than a new one
        self.resume_min_speech = min(int(s.vad_resume_min_speech_ms * SR / 1000),
                                     self.min_speech)
        self.pad = int(s.vad_speech_pad_ms * SR / 1000)
        self.max_len = int(s.vad_max_utterance_s * SR)
        self.continue_len = int(s.vad_continue_ms * SR / 1000)
        self.speculate = int(s.vad_speculate_ms * SR / 1000)  # 0: no speculative turns
        self.speculated = False  # an utterance of this pause went out early (tentative turn)
        self.triggered = False  # inside speech (maybe not yet long enough to count)
        self.started = False    # SpeechStarted sent for this speech
        self.start = 0          # first chunk of the speech
        self.temp_end = 0       # first silent chunk of a pause that may end the speech
        self.thought = 0        # start of the thought: where the next utterance begins
        self.last_end: int | None = None  # end of the last utterance (None: nothing to continue)
        self.turn = 0
        self.replay_until = 0  # at a takeover: the dead owner sent events up to here
        # A takeover inside a speculated pause: the replay runs on another chunk grid, so
        # its events there may fall a chunk either side of the dead owner's.  dead_spec:
        # the end of the pause whose speculation the dead owner sent and had not yet
        # confirmed (not sent again; its confirmation is sent even if re-lived: the
        # gateway ignores a second one).  spec_silent: the replay re-lived a speculation
        # the dead owner never sent (the confirmation then sends the whole utterance).
        self.dead_spec: int | None = None
        self.spec_silent = False
        self.config: dict[str, float] = {}  # the client's own settings (SessionConfig)
        self.answered_at: int | None = None  # end of the last utterance called complete
        self.pending: tuple[int, asyncio.Future] | None = None  # (pause start, decision)
        self.turn_checked = True  # False after a takeover: the turn is read from Redis once

    def snapshot(self) -> dict:
        """What a new owner needs for positions to go on: the input samples received.
        ``samples_16k`` is the same position at 16 kHz (a fresh resampler starts there:
        the old one's few unflushed samples are skipped, so no drift builds up).  ``at``
        (= samples_16k) and ``replay_from`` tell the runtime where a new owner must
        resume for speech in progress to be whole; ``seen16`` and ``turn`` what was sent."""
        at = self.in_samples * SR // self.in_sr
        busy = self.triggered or self.continues(self.n_vad)
        replay_from = max(self.thought - self.pad - int(REPLAY_WARMUP_S * SR), 0) if busy else at
        return {"in_sr": self.in_sr, "in_samples": self.in_samples, "samples_16k": at,
                "at": at, "replay_from": min(replay_from, at),
                "seen16": max(at, self.replay_until), "turn": self.turn,
                "spec": self.dead_spec if self.dead_spec is not None
                else self.temp_end if self.speculated else None,
                **({"config": self.config} if self.config else {})}

    def configure(self, vad: dict[str, float]) -> None:
        """The client's turn detection for this session (the gateway checked the ranges):
        ``threshold``, ``min_silence_ms``, ``speech_pad_ms``; kept in the snapshot so a new
        owner applies it too."""
        if "threshold" in vad:
            self.threshold = vad["threshold"]
            self.neg_threshold = max(self.threshold - NEG_OFFSET, 0.01)
        if "min_silence_ms" in vad:
            self.min_silence = int(vad["min_silence_ms"] * SR / 1000)
        if "speech_pad_ms" in vad:
            self.pad = int(vad["speech_pad_ms"] * SR / 1000)
        self.config.update(vad)

    def restore(self, snap: dict) -> None:
        """Continue positions from ``snap`` (``snapshot`` of the last owner); the model
        and the endpointer start afresh there.  A malformed snapshot raises ValueError."""
        in_sr, in_samples, at16 = (snap.get(k) for k in ("in_sr", "in_samples", "samples_16k"))
        latest = snap.get("latest") if isinstance(snap.get("latest"), dict) else {}
        seen, turn = latest.get("seen16", at16), latest.get("turn", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (in_sr, in_samples, at16, seen, turn)) or not in_sr:
            raise ValueError(f"bad VAD snapshot {snap!r:.200}")
        self.in_samples = in_samples if in_sr == self.in_sr else at16 * self.in_sr // SR
        self.buf_start = self.n_vad = at16
        self.replay_until, self.turn = seen, turn
        self.turn_checked = False
        spec = latest.get("spec")
        self.dead_spec = spec if isinstance(spec, int) and not isinstance(spec, bool) else None
        config = latest.get("config", snap.get("config"))
        if isinstance(config, dict):
            self.configure({k: float(v) for k, v in config.items()
                            if k in ("threshold", "min_silence_ms", "speech_pad_ms")
                            and isinstance(v, (int, float)) and not isinstance(v, bool)})

    @property
    def now_s(self) -> float:
        """Session audio position of the last sample received, in seconds."""
        return self.in_samples / self.in_sr

    def feed(self, pcm: bytes, vad: SileroVad) -> list[tuple[int, float]]:
        """Blocking: append audio, run every new whole chunk; [(chunk start, prob)]."""
        samples = pcm16_to_float(pcm)
        self.in_samples += len(samples)
        audio = self.resample(samples)
        self.buf = np.concatenate([self.buf, to_int16(audio)])
        end = self.buf_start + len(self.buf)
        n = (end - self.n_vad) // CHUNK
        if n <= 0:
            return []
        lo = self.n_vad - self.buf_start
        new = self.buf[lo:lo + n * CHUNK].astype(np.float32) / 32768.0
        probs, self.model_state = vad.probs(new, self.model_state)
        starts = [self.n_vad + i * CHUNK for i in range(n)]
        self.n_vad += n * CHUNK
        return list(zip(starts, probs.tolist()))

    def step(self, at: int, prob: float) -> list[tuple]:
        """Endpointing for the chunk starting at ``at``: ("speech", start) when the
        speech has lasted min_speech, ("utt", start, end) when it is over."""
        events: list[tuple] = []
        now = at + CHUNK
        if prob >= self.threshold:
            if self.speculated:  # the user goes on: the early utterance was premature
                self.speculated = False
                events.append(("resume", at))
            self.temp_end = 0
            if not self.triggered:
                self.triggered, self.started, self.start = True, False, at
                if not self.continues(at):
                    self.thought = at
        elif prob < self.neg_threshold and self.triggered:
            self.temp_end = self.temp_end or at
            if now - self.temp_end >= self.min_silence:
                events += self._close(self.temp_end)
            elif self.speculate and self.started and not self.speculated \
                    and now - self.temp_end >= max(self.speculate, self.pad):
                # (the trailing pad must be heard: the utterance is cut with it)
                self.speculated = True
                events.append(("spec", self.thought, self.temp_end))
        resumes = self.thought < self.start  # continues the last utterance's thought
        # sooner only where a reply may be heard already: the last pause was called done
        # (inside a thought still going on, a breath or a click must not restart the turn)
        quick = resumes and self.answered_at is not None
        if self.triggered and not self.started and not self.temp_end \
                and now - self.start >= (self.resume_min_speech if quick else self.min_speech):
            self.started = True
            events.append(("speech", self.start, resumes))
            if self.answered_at is not None and self.start - self.answered_at <= EARLY_S * SR:
                TURN_EARLY.inc()  # the model said "complete", and the user went on
            self.answered_at = None
        # cut a monologue (a continued thought counts whole once this speech is real)
        begin = self.thought if self.started else self.start
        if self.triggered and now + CHUNK - begin > self.max_len:
            events += self._close(self.temp_end or now)
            self.last_end = None  # no pause here: what follows is a new thought
        return events

    def continues(self, at: int) -> bool:
        """Does speech starting at ``at`` continue the last utterance's thought?"""
        return self.last_end is not None and at - self.last_end <= self.continue_len \
            and at - self.thought < self.max_len

    def _close(self, end: int) -> list[tuple]:
        # speech shorter than min_speech never opened a turn: a blip, dropped; a pause
        # whose utterance went out early only confirms it
        kind = "commit" if self.speculated else "utt"
        event = [(kind, self.thought, end)] if self.started else []
        self.speculated = False
        if self.started:
            self.last_end = end
        self.triggered = self.started = False
        self.temp_end = 0
        return event

    def cut(self, start: int, end: int) -> bytes:
        lo = max(start - self.pad - self.buf_start, 0)
        hi = max(end + self.pad - self.buf_start, 0)
        return self.buf[lo:hi].astype("<i2").tobytes()

    def trim(self) -> None:
        """Keep only what a coming utterance may still need: from its thought's start
        (with pad) while speech goes on or may still continue it."""
        keep = self.triggered or self.continues(self.n_vad)
        keep_from = (self.thought if keep else self.n_vad) - self.pad - CHUNK
        drop = keep_from - self.buf_start
        if drop > 0:
            self.buf = self.buf[drop:]
            self.buf_start += drop


class VadStage(SessionStage):
    name = "vad"

    def setup(self) -> None:
        self.vad = SileroVad()
        self.turn_model: TurnModel | None = None
        if self.settings.vad_turn_model.lower() != "off":
            try:
                self.turn_model = TurnModel(self.settings.vad_turn_model or None,
                                            self.settings.vad_turn_threshold)
            except Exception as e:  # the text heuristic in STT still decides: degrade, say so
                log.warning("no end-of-turn model (%s); the transcript's ending decides", e)

    def describe(self) -> str:
        turn = (f"smart-turn ({self.turn_model.path.name}, threshold "
                f"{self.turn_model.threshold})" if self.turn_model else "no turn model")
        return f"silero-vad v5 onnx ({self.vad.path.name}) cpu, 1 thread; end of turn: {turn}"

    def open_session(self, frame: SessionOpen, snapshot: dict | None = None) -> VadSession:
        session = VadSession(frame, self.settings)
        if snapshot:
            session.restore(snapshot)
        return session

    def snapshot(self, session: VadSession) -> dict:
        return session.snapshot()

    async def process(self, frame: Audio, session: VadSession = None):  # type: ignore[override]
        if not session.turn_checked:
            # The dead owner may have advanced the turn after its last snapshot, and the
            # replay need not re-live that advance (another chunk grid, a fresh model):
            # an utterance sent in the snapshot's older turn would be dropped as stale.
            session.turn = max(session.turn, await self.state.current_turn(session.sid))
            session.turn_checked = True
        if isinstance(frame, SessionConfig):
            session.configure(frame.vad)
            return
        if not isinstance(frame, Audio):
            raise ValueError(f"expected audio, got a {type(frame).__name__} frame")
        if frame.sr != session.in_sr:
            raise ValueError(f"audio at {frame.sr} Hz in a session opened at {session.in_sr} Hz")
        if len(frame.pcm) % 2 or frame.seconds > MAX_FRAME_S:
            raise ValueError(f"bad audio frame: {len(frame.pcm)} bytes at {frame.sr} Hz")
        recv = frame.marks.get("recv") or time.time()  # wall time of the frame's last sample
        chunks = await self.run_blocking(session.feed, frame.pcm, self.vad)
        for at, prob in chunks:
            events = session.step(at, prob)
            self._decide_early(session, at)  # before a "spec" event of this chunk awaits it
            for event in events:
                kind = event[0]
                if not self._live(session, event, at + CHUNK <= session.replay_until):
                    continue  # re-lived after a takeover: the dead owner sent it already
                if kind == "commit" and session.spec_silent:
                    kind = "utt"  # the dead owner never sent this pause's speculation
                session.spec_silent, session.dead_spec = False, None
                if kind == "speech":
                    session.turn = await self.state.advance_turn(session.sid)
                    yield SpeechStarted(sid=session.sid, turn=session.turn, at_s=event[1] / SR,
                                        continues=event[2],
                                        marks={"speech_start": self._wall(session, recv,
                                                                          event[1])})
                elif kind == "spec":
                    utt = await self._utterance(session, recv, event[1], event[2])
                    utt.speculative = True
                    decided = asyncio.get_running_loop().create_future()  # the verdict is
                    decided.set_result((utt.complete, utt.turn_prob, None))  # not again
                    session.pending = (event[2], decided)
                    yield TurnStatus(sid=session.sid, turn=session.turn, status="tentative")
                    yield utt  # after the status: the gateway holds this turn's output
                elif kind == "commit":
                    SPECULATIONS.labels("used").inc()
                    yield TurnStatus(sid=session.sid, turn=session.turn, status="committed")
                elif kind == "resume":
                    # superseded: a new turn (stages drop the old one's work; the gateway,
                    # which held it, plays nothing of it and sends no interrupt)
                    SPECULATIONS.labels("wasted").inc()
                    session.answered_at = None
                    session.turn = await self.state.advance_turn(session.sid)
                else:
                    yield await self._utterance(session, recv, event[1], event[2])
        session.trim()

    @staticmethod
    def _live(session: VadSession, event: tuple, relived: bool) -> bool:
        """Is this event to be sent (not re-lived after a takeover)?  Keeps the takeover
        speculation state (``VadSession.dead_spec``/``spec_silent``) up to date."""
        kind = event[0]
        near = session.dead_spec is not None and kind in ("spec", "commit") \
            and abs(event[2] - session.dead_spec) <= 2 * CHUNK  # the dead owner's pause
        if relived:
            if kind == "spec":
                session.spec_silent = not near
            elif kind == "commit" and near:
                return True  # the dead owner had not confirmed it yet
            else:
                session.spec_silent = False
            return False
        return not (kind == "spec" and near)  # the dead owner sent it (a chunk earlier)

    def _decide_early(self, session: VadSession, at: int) -> None:
        """Start the end-of-turn decision inside the pause, halfway through the min silence
        (and once the pause holds the utterance's trailing pad), or DECISION_LEAD before a
        speculative utterance goes out: the model then runs while the VAD waits out the
        rest, so the verdict costs the reply no time.  If the user goes on, the result is
        unused (the short gaps between words end before that)."""
        end = session.temp_end
        start_after = max(session.pad, session.min_silence // 2)
        if session.speculate:
            # a speculative utterance awaits the verdict: have it ready by then.  The model
            # needs no trailing pad (the utterance for STT does): it may start earlier.
            start_after = min(start_after, max(2 * CHUNK, session.speculate - DECISION_LEAD))
        if self.turn_model is None or not (session.started and end) \
                or at + CHUNK - end < start_after \
                or (session.pending is not None and session.pending[0] == end):
            return
        pcm = session.cut(session.thought, end)
        session.pending = (end, asyncio.ensure_future(self._decide(pcm)))

    async def _utterance(self, session: VadSession, recv: float, start: int,
                         end: int) -> Utterance:
        pcm = session.cut(start, end)
        pending, session.pending = session.pending, None
        if pending is not None and pending[0] == end:
            complete, prob, took = await pending[1]
        else:  # a monologue cut at max length, or a pause shorter than the pad
            complete, prob, took = await self._decide(pcm)
        if took is not None:
            TURN_DECISION.observe(took)
        TURN_VERDICTS.labels({True: "complete", False: "incomplete", None: "unknown"}[
            complete]).inc()
        session.answered_at = end if complete else None
        utt = Utterance(sid=session.sid, turn=session.turn, pcm=pcm, sr=SR, start_s=start / SR,
                        end_s=end / SR, out_sr=session.out_sr, complete=complete,
                        turn_prob=prob, marks={"speech_end": self._wall(session, recv, end)})
        utt.stamp("vad_sent")
        return utt

    async def _decide(self, pcm: bytes) -> tuple[bool | None, float | None, float | None]:
        """The turn model's verdict on the thought so far, its probability and the seconds
        it took (None: no model, or it failed: STT's text heuristic decides)."""
        if self.turn_model is None:
            return None, None, None
        try:
            complete, prob, took = await self.run_blocking(
                self.turn_model.decide, np.frombuffer(pcm, np.int16))
        except Exception as e:  # never lose the utterance over the turn model
            log.warning("end-of-turn model failed: %s", e)
            return None, None, None
        log.debug("end of turn: p=%.3f (%s) in %.0f ms", prob, complete, took * 1000)
        return complete, min(max(prob, 0.0), 1.0), took

    @staticmethod
    def _wall(session: VadSession, recv: float, sample: int) -> float:
        """Wall time of a session sample: the frame's last sample arrived at ``recv``."""
        return recv - (session.now_s - sample / SR)
