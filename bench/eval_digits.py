"""Digits and spelled things, heard exactly: the digit error rate of dictations.

    python -m s2s.bench.eval_digits                  # every voice, the stage's settings
    python -m s2s.bench.eval_digits --voices piper espeak:en-gb --show

Phone numbers, card numbers, confirmation codes with letters and spelled names
(``DIGIT_DICTATIONS``), spoken in groups with 0.5-1.2 s pauses by each voice (the
project's Piper voice and espeak-ng voices; the audio is cached like bench/eval_set.py
caches it), are streamed in 20 ms frames through the real VAD stage and each utterance
through the real STT stage, in-process (``s2s.bench.telephony.transcribe``), so a
dictation is cut at its pauses and decoded as the stack decodes it (incrementally,
unless ``--whole``).  The transcript of each dictation is the final text of each of its
thoughts.

Digit error rate: the edit distance between the digits and letters said and those in
the transcript (numerals read digit by digit, number words as digits, single letters
as letters: ``s2s.services.stt.spoken_numbers``), over the number said; per voice and
overall (the sums of edits over the sums of symbols).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from s2s.services.stt.spoken_numbers import spoken_symbols  # noqa: E402

from .wer import wer  # noqa: E402

# (id, pieces spoken with pauses between them, the pauses in seconds)
DIGIT_DICTATIONS: list[tuple[str, list[str], list[float]]] = [
    ("phone-issue", ["one zero zero zero one", "nine oh two one", "zero zero one eight",
                     "zero three"], [0.8, 0.9, 0.7]),
    ("phone-us", ["four one five", "five five five", "two six seven one"], [0.7, 1.0]),
    ("phone-uk", ["oh two oh", "seven nine four six", "zero eight one two"], [1.0, 0.6]),
    ("card", ["four five three two", "zero zero one seven", "eight eight two nine",
              "six oh oh four"], [0.8, 1.1, 0.7]),
    ("card-said", ["my card number is four four five", "two one eight", "nine nine zero seven"],
     [0.7, 1.0]),
    ("pin", ["zero zero zero", "seven"], [1.2]),
    ("zip", ["nine four", "one zero five"], [0.5]),
    ("confirmation", ["B seven K", "four nine", "Q two"], [0.9, 0.6]),
    ("booking", ["the code is X R", "three five", "M"], [0.8, 1.0]),
    ("name-smith", ["S M", "I T H"], [0.6]),
    ("name-garcia", ["G A R", "C I A"], [0.9]),
    ("account", ["account three three zero", "one four oh", "two"], [0.7, 1.1]),
]
VOICES = ["piper", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3", "espeak:en-us+m3"]


def digit_error_rate(reference: str, hypothesis: str) -> float:
    """Edit distance over the digit/letter sequence of ``reference`` (what was said,
    words or numerals), divided by its length."""
    return wer(reference, hypothesis, spoken_symbols)


def errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, symbols said): summed over dictations for a pooled rate."""
    n = len(spoken_symbols(reference))
    return round(digit_error_rate(reference, hypothesis) * max(n, 1)), n


def dictation_audio(voices, voice: str, pieces: list[str], pauses: list[float]):
    from .eval_set import Turn

    return voices.turn_audio(voice, Turn(pieces, pauses))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s2s.bench.eval_digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voices", nargs="+", default=VOICES, metavar="VOICE",
                        help=f"piper and/or espeak:<voice> (default: {' '.join(VOICES)})")
    parser.add_argument("--only", nargs="+", metavar="ID", help="only these dictations")
    parser.add_argument("--whole", action="store_true",
                        help="decode every utterance whole (stt_incremental off)")
    parser.add_argument("--before", action="store_true",
                        help="also run with stt_digits off (whisper's own numerals, as before "
                             "the fix): one column each")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="other settings of the STT stage, e.g. stt_beam_size=5")
    parser.add_argument("--cache", default="~/.cache/s2s/eval_set",
                        help="where synthesized audio is kept (shared with bench/eval_set.py)")
    parser.add_argument("--show", action="store_true", help="print every transcript")
    args = parser.parse_args(argv)

    from s2s import config
    from s2s.services.stt.worker import SttStage

    from .eval_set import SR, Voices
    from .telephony import transcribe

    environ = {config.env_name(k): v for k, v in (kv.split("=", 1) for kv in args.set)}
    overrides = {"stt_incremental": False} if args.whole else {}
    runs = {"": overrides} if not args.before else \
        {"before (stt_digits off)": {**overrides, "stt_digits": False},
         "after (stt_digits on)": {**overrides, "stt_digits": True}}
    stages = {}
    for label, o in runs.items():
        stages[label] = SttStage(config.load(o, environ=environ))
        stages[label].setup()
    voices = Voices(Path(args.cache))
    chosen = [d for d in DIGIT_DICTATIONS if not args.only or d[0] in args.only]
    counts = {label: {} for label in stages}  # label -> voice -> [edits, symbols]
    for voice in args.voices:
        for did, pieces, pauses in chosen:
            pcm = dictation_audio(voices, voice, pieces, pauses)
            said = " ".join(pieces)
            for label, stt in stages.items():
                stt.local.clear()
                heard = transcribe(stt, pcm, SR)
                e, n = errors(said, heard)
                c = counts[label].setdefault(voice, [0, 0])
                c[0], c[1] = c[0] + e, c[1] + n
                if args.show or e:
                    print(f"{label[:6]:6} {voice:16} {did:13} {e}/{n}  said: "
                          f"{''.join(spoken_symbols(said))}  heard: "
                          f"{''.join(spoken_symbols(heard))}  {heard!r}", flush=True)
    for label, stt in stages.items():
        print(f"\nSTT{' ' + label if label else ''}: {stt.describe()}")
    print("| voice | " + " | ".join(f"{label or 'digit error rate'}" for label in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for voice in [*args.voices, ""]:
        cells = []
        for label in stages:
            e, n = (counts[label][voice] if voice else
                    [sum(c[k] for c in counts[label].values()) for k in (0, 1)])
            cells.append(f"{e / max(n, 1):.1%} ({e}/{n})")
        print(f"| {voice or '**all**'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
