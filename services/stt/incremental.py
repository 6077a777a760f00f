"""Incremental STT: a continued thought is not transcribed again from its start.

The VAD continues a thought that resumes after a pause: each new utterance carries the
audio from the thought's start (``start_s``) to the new end, and earlier pieces are
superseded.  Decoding all of it again costs more with every pause.  Instead a record
of the thought (``Thought``) is kept per session, and the next piece decodes only the
audio from the *previous* pause on, with the text before that pause as whisper's
previous-text prompt:

    pieces      |-- 1 --|pause|--- 2 ---|pause|-- 3 --|pause|-- 4 --|
    piece 4 decodes               base ^ [------ 3 ------ 4 -------]
    prompt: the text of 1 and 2 (``base_text``); transcript = base_text + what it heard

Why the one-piece overlap: decoded alone, the new audio loses words whisper takes for a
repetition of the prompt (jfk.wav's "ask what you can do for your country" after "ask
not what your country can do for you" came out as "country"), and the word at a cut is
often wrong ("and so my fellow america" at jfk's first pause); heard again with the
audio before it, whisper gets both right.  Where the overlap's words end is found with
whisper's word alignment (cross-attention DTW) of that decode: the words that start
before the last pause join ``base_text`` for the next piece, if the last decode heard
the same words there (``advance``).  Every cut lies inside a
pause (the VAD sent the piece after ``vad_min_silence_ms`` of silence; the piece ends
``vad_speech_pad_ms`` into it), so no word straddles it.

The record is trusted only if it is provably about the same audio: same thought start,
same rate, more audio, and the CRC32 of the new utterance's first ``samples`` equals
the stored one.  Anything else (another thought, a replay after a VAD takeover that cut
the audio differently, a lost or expired record) decodes the whole utterance as
before, so a miss costs time, never accuracy.  The record lives in Redis (the stage's
SessionState), so the next piece may go to any STT worker.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass, replace


@dataclass
class Thought:
    """What was heard of a thought so far (JSON in Redis, a few hundred bytes)."""
    start_s: float    # the thought's start (Utterance.start_s)
    sr: int           # the utterance's sample rate
    samples: int      # audio samples (at sr, from the utterance's first) heard so far
    crc: int          # zlib.crc32 of those samples' bytes
    text: str         # the transcript of those samples
    base: int = 0     # where the next piece's decode starts (the previous pause)...
    base_text: str = ""  # ... and the transcript of the audio before it
    logprob: float = 0.0
    language: str = ""

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes | None) -> "Thought | None":
        """A stored record, or None when there is none or it is malformed (a bad record
        must only cost a whole decode)."""
        if not raw:
            return None
        try:
            t = cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None
        ints = (t.samples, t.crc, t.sr, t.base)
        if not (all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
                and 0 <= t.base < t.samples and isinstance(t.text, str)
                and isinstance(t.base_text, str) and isinstance(t.start_s, (int, float))):
            return None
        return t


def same_thought(thought: Thought | None, start_s: float) -> bool:
    return thought is not None and abs(thought.start_s - start_s) < 1e-6


def prefix_of(thought: Thought | None, pcm: bytes, sr: int, start_s: float) -> Thought | None:
    """``thought`` if its audio is a prefix of this utterance's (the same audio, maybe
    more of it), else None.  Equal length means the same utterance again (a redelivery)."""
    if not same_thought(thought, start_s) or thought.sr != sr:
        return None
    n = thought.samples * 2
    if n > len(pcm) or zlib.crc32(pcm[:n]) != thought.crc:
        return None
    return thought


def join(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p.strip())


def words(text: str) -> list[str]:
    return [w for w in (re.sub(r"[^a-z0-9']", "", w.lower()) for w in text.split()) if w]



def advance(thought: Thought, known: Thought, head: str) -> Thought:
    """``thought`` (decoded from ``known.base`` on) with the next start moved to the pause
    where ``known`` ended, ``head`` being the words this decode heard before that pause.
    It moves only if this decode and the last agree on those words (streaming whisper's
    "local agreement"): whisper often changes its mind about earlier words once more
    audio follows (jfk.wav's "ass not" became "ask not"; a dictated "10001" heard as
    "1001" came right again), and the word alignment may cut a word on the wrong side
    of the pause.  One difference is allowed: the last word of the last decode, cut by
    the pause, may be a shorter or longer form of the new one ("america" at the pause,
    "Americans" with more audio; the newer decode is kept).  Else the next piece starts
    from the same pause as this one, and hears those words again."""
    new, old = words(head), words(known.text)[len(words(known.base_text)):]
    if not old or len(new) != len(old) or new[:-1] != old[:-1] \
            or not (new[-1].startswith(old[-1]) or old[-1].startswith(new[-1])):
        return thought
    return replace(thought, base=known.samples, base_text=join(known.base_text, head))
