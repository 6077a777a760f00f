"""When to answer: how long the LLM stage waits after the user's speech ended.

People answer when the thought sounds done and stop at once when the other person
goes on; they do not wait a fixed second after every statement.  Three signals say
whether the thought is done:

* ``audio``: smart-turn v3's probability that the turn is complete, from the
  thought's audio, prosody included (``Transcript.turn_prob``; None: no model ran).
* ``llm``: the reply model's own probability that the user's message ends here, the
  probability of ``<|im_end|>`` right after the transcript in the chat prompt (as
  LiveKit's turn detector does; ``Backend.end_of_turn``; None: the backend cannot
  tell, e.g. vllm or an OpenAI-compatible server).
* the words: ``Transcript.complete`` (false when they dangle: "and the", a comma;
  without the audio model it is the whole verdict) and ``asks`` (a question or a
  request wants its answer now).

The hold (counted from the end of speech) then scales with the uncertainty::

    asks                          -> 0
    each model's confidence: its probability over its own "done" threshold, at most 1
        (audio: vad_turn_threshold; llm: LLM_DONE, SmolLM2-135M gives <|im_end|> far
        less mass than smart-turn gives "complete")
    c = min of the confidences present (0 when the words dangle; none present: the old
        fixed llm_statement_hold_ms for words that sound done)
    hold = llm_turn_hold_ms * (1 - c)

so a turn both models call done is answered at once, and one they doubt waits longer
the more they doubt it, up to ``llm_turn_hold_ms``.  ``min``
because each model misses what the other hears: smart-turn hears a finished
sentence's fall in a dictation paused after a whole sentence, the LLM reads the
words without the voice; either doubting is reason to wait a little.  When the wait
was too short the user goes on, the reply stops and the whole thought is answered
once (false-interruption recovery, docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Histogram

# The LLM's P(<|im_end|>) at or above this: it calls the turn done (calibrated on the
# eval's speech with bench/turn_end_calibration.py; the numbers are in docs/quality.md)
LLM_DONE = 0.02

HOLDS = Histogram("s2s_llm_turn_hold_seconds", "Silence the LLM stage waited for the user to "
                  "go on before answering, from the end-of-turn confidence.",
                  buckets=(0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0))
PROBE_SECONDS = Histogram("s2s_llm_end_of_turn_seconds", "Time the LLM's end-of-turn "
                          "probability took (one prefill in the generation loop).",
                          buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1))


@dataclass(frozen=True)
class TurnEnd:
    """The signals of one turn and what they decide.  ``complete`` is the transcript's
    verdict: the audio model's unless the words dangle, the words' alone without it;
    ``audio_threshold`` is the audio model's own (vad_turn_threshold)."""
    audio: float | None
    llm: float | None
    complete: bool
    asks: bool
    audio_threshold: float = 0.5

    @property
    def dangles(self) -> bool:
        """The words plainly go on ("and the", a trailing comma)."""
        return not self.complete and (self.audio is None or self.audio >= self.audio_threshold)

    @property
    def confidence(self) -> float | None:
        """How sure the signals are that the user finished (0..1; None: no probability)."""
        if self.asks:
            return 1.0
        if self.dangles:
            return 0.0
        present = [min(p / done, 1.0) for p, done in ((self.audio, self.audio_threshold),
                                                        (self.llm, LLM_DONE)) if p is not None]
        return min(present) if present else None

    def hold_ms(self, turn_hold_ms: float, statement_hold_ms: float) -> float:
        """Silence to wait after the speech before answering, in ms."""
        c = self.confidence
        if c is None:  # neither model: only the words, which cannot tell a pause
            return statement_hold_ms if self.complete else turn_hold_ms
        return turn_hold_ms * (1.0 - c)

    def describe(self) -> str:
        def p(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"
        return (f"audio {p(self.audio)} llm {p(self.llm)} "
                f"{'dangles' if self.dangles else 'complete' if self.complete else 'incomplete'}"
                f"{' asks' if self.asks else ''}: confidence {p(self.confidence)}")
