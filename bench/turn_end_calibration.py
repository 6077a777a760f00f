"""Calibrate the end-of-turn combination (services/llm/turn_end.py) on the eval's speech.

For every pause of the eval set's turns (a dictation's pause mid-thought: the user goes
on; the end of a statement or question: done) it runs what the stack runs there, on the
thought's audio up to that pause: smart-turn v3 (the VAD's probability), whisper tiny.en
(the transcript, its text heuristic) and the reply model's P(<|im_end|>) (the
transformers backend's ``end_of_turn``, timed), then reports precision and recall of
"done" for the audio model, the LLM and both at thresholds, and the holds turn_end gives.

    .venv/bin/python -m s2s.bench.turn_end_calibration [--groups ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from s2s import config
from s2s.bench.eval_set import CONVERSATIONS, SR, Voices
from s2s.services.llm import turn_end
from s2s.services.llm.replies import asks
from s2s.services.stt.worker import Whisper, turn_complete
from s2s.services.vad.turn import TurnModel

GROUPS = ["dictation", "sentence-first", "statements", "factual", "multiturn", "digits"]
PAD = int(0.1 * SR)  # the VAD cuts an utterance with vad_speech_pad_ms after the speech


def piece_ends(audio: np.ndarray, starts: list[float]) -> list[int]:
    """Sample where each piece's speech ends: the last 32 ms frame above an energy floor
    before the next piece starts."""
    bounds = [int(s * SR) for s in starts] + [len(audio)]
    ends = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = audio[lo:hi].astype(np.float32) / 32768
        n = len(x) // 512
        rms = np.sqrt((x[:n * 512].reshape(n, 512) ** 2).mean(axis=1))
        loud = np.nonzero(rms > 0.01)[0]
        ends.append(lo + (int(loud[-1]) + 1) * 512 if len(loud) else hi)
    return ends


def samples(groups: list[str], voices: Voices):
    """(conversation id, group, label, pause after (s or None), audio up to the pause)."""
    for conv in CONVERSATIONS:
        if conv.group not in groups:
            continue
        turn = conv.turns[0]  # the first turn: no history the model would need
        audio, starts = voices.turn_audio(conv.voice, turn)
        ends = piece_ends(audio, starts)
        for i, end in enumerate(ends):
            last = i == len(ends) - 1
            pause = None if last else starts[i + 1] - end / SR
            yield conv.id, conv.group, "done" if last else "goes on", pause, \
                audio[:min(end + PAD, len(audio))]


async def measure(groups: list[str], full: bool) -> list[dict]:
    settings = config.load(environ={})
    from s2s.services.llm.backends.hf import TransformersBackend

    voices = Voices(Path("~/.cache/s2s/eval-audio"))
    audio_model = TurnModel(None, settings.vad_turn_threshold)
    whisper = Whisper(settings.stt_model, "cpu", "auto", 1, "en", settings.stt_digits)
    llm = TransformersBackend(settings)
    llm.setup()
    rows = []
    for cid, group, label, pause, pcm in samples(groups, voices):
        audio_p = audio_model.probability(pcm)
        text = whisper.transcribe([pcm.astype(np.float32) / 32768])[0].text.strip()
        complete = turn_complete(audio_p >= settings.vad_turn_threshold, text)
        messages = [{"role": "system", "content": settings.llm_system_prompt},
                    {"role": "user", "content": text}]
        t0 = time.perf_counter()
        llm_p = await llm.end_of_turn(messages)
        cold = time.perf_counter() - t0
        warm = plain_p = None
        if full:
            t0 = time.perf_counter()
            await llm.end_of_turn(messages)  # the prompt's keys/values are cached now
            warm = time.perf_counter() - t0
            # LiveKit's detector reads the words without punctuation: is that better here?
            plain_p = await llm.end_of_turn(messages[:1] + [{"role": "user",
                                                             "content": plain(text)}])
        rows.append(dict(id=cid, group=group, label=label, pause=pause, text=text,
                         audio=round(audio_p, 4), llm=round(llm_p, 4), complete=complete,
                         llm_plain=plain_p and round(plain_p, 4),
                         asks=asks(text), cold_ms=round(cold * 1000, 1),
                         warm_ms=warm and round(warm * 1000, 1)))
        print(f"{group:14} {label:8} audio {audio_p:.2f} llm {llm_p:.2f} ({plain_p}) "
              f"{'asks ' if rows[-1]['asks'] else ''}{cold * 1000:4.0f}/{warm} ms "
              f"{text!r}", flush=True)
    llm.close()
    return rows


def plain(text: str) -> str:
    return re.sub(r"[^\w\s'-]", "", text).lower().strip()


TEXTS = ("llm", "llm_plain")  # (llm_plain: with --full)


def done_by(row: dict, audio_at: float | None, llm_at: float | None, text: str) -> bool:
    """Called done: a question, or words that do not dangle and every model used at or
    above its threshold (None: that model is not used)."""
    end = turn_end.TurnEnd(row["audio"], row[text], row["complete"], row["asks"])
    if end.asks:
        return True
    if end.dangles:
        return False
    return (audio_at is None or row["audio"] >= audio_at) and \
        (llm_at is None or row[text] >= llm_at)


def report(rows: list[dict]) -> None:
    judged = [r for r in rows if not r["asks"]]  # questions are answered at once anyway
    print(f"\n{len(rows)} pauses, {len(judged)} without a question/request "
          f"({sum(r['label'] == 'done' for r in judged)} done, "
          f"{sum(r['label'] != 'done' for r in judged)} going on)")
    print("\ntext      audio>=  llm>=  precision recall  (of 'done': both at or above)")
    done = sum(r["label"] == "done" for r in judged)
    for text in TEXTS:
        if any(r[text] is None for r in judged):
            continue
        for audio_at in (None, 0.5):
            for llm_at in (None, 0.02, 0.05, 0.1, 0.2, 0.3):
                if audio_at is None and llm_at is None:
                    continue
                said = [r for r in judged if done_by(r, audio_at, llm_at, text)]
                hits = sum(r["label"] == "done" for r in said)
                print(f"{text:9} {audio_at or '-':>6} {llm_at or '-':>6} "
                      f"{hits / len(said) if said else 1:10.2f} {hits / done if done else 1:6.2f}"
                      f"  ({len(said)} said done)")
    s = config.load(environ={})
    print(f"\nholds with turn_end (LLM_DONE {turn_end.LLM_DONE}), by group and label:")
    by: dict[tuple, list] = {}
    for r in rows:
        end = turn_end.TurnEnd(r["audio"], r["llm"], r["complete"], r["asks"],
                               s.vad_turn_threshold)
        hold = end.hold_ms(s.llm_turn_hold_ms, s.llm_statement_hold_ms)
        early = r["pause"] is not None and hold / 1000 < r["pause"]
        by.setdefault((r["group"], r["label"]), []).append((hold, early))
    for (group, label), v in sorted(by.items()):
        holds = [h for h, _ in v]
        print(f"  {group:14} {label:8} n={len(v):3} hold p50 {statistics.median(holds):5.0f} ms"
              f" mean {statistics.mean(holds):5.0f} ms; hold shorter than the pause: "
              f"{sum(e for _, e in v)}")
    cold = [r["cold_ms"] for r in rows]
    warm = [r["warm_ms"] for r in rows if r["warm_ms"] is not None]
    print(f"\nLLM end-of-turn probability: first {statistics.median(cold):.0f} ms p50 "
          f"(max {max(cold):.0f})" + (f", prompt cached {statistics.median(warm):.0f} ms p50"
                                      if warm else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--json", help="write the measured rows here")
    ap.add_argument("--rows", help="report on rows measured before (a --json file)")
    ap.add_argument("--full", action="store_true", help="also time a second (cached) probe "
                    "and probe the words without punctuation")
    args = ap.parse_args()
    if args.rows:
        rows = json.loads(Path(args.rows).read_text())
    else:
        rows = asyncio.run(measure(args.groups.split(","), args.full))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
