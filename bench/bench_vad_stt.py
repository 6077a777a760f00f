"""Listening benchmark: VAD cost, end-of-speech decision delay, STT latency.

    python -m s2s.bench.bench_vad_stt

Runs the real stages in-process (no Redis) on tests/data speech, one model thread
each, and prints a table with the targets next to the numbers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from s2s import config  # noqa: E402
from s2s.audio import read_audio  # noqa: E402
from s2s.frames import Audio, SessionOpen, Utterance  # noqa: E402
from s2s.services.stt.worker import FULL_WINDOW, SttStage  # noqa: E402
from s2s.services.vad.worker import CHUNK, SR, SileroVad, VadStage  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
FRAME_MS = 20


def load(name: str) -> np.ndarray:
    return read_audio(DATA / name, SR)


class _Turns:
    turn = 0

    async def advance_turn(self, sid: str) -> int:
        self.turn += 1
        return self.turn


def vad_chunk_cost() -> tuple[float, float]:
    """ms per 32 ms chunk: the bare model, and through the stage with 20 ms frames."""
    vad = SileroVad()
    audio = load("lecture.wav")
    x = audio[: len(audio) // CHUNK * CHUNK].astype(np.float32) / 32768
    t = time.perf_counter()
    vad.probs(x, vad.new_state())
    bare = (time.perf_counter() - t) * 1000 / (len(x) // CHUNK)
    stage = _vad_stage()
    t = time.perf_counter()
    asyncio.run(_stream(stage, audio))
    staged = (time.perf_counter() - t) * 1000 / (len(audio) // CHUNK)
    return bare, staged


def _vad_stage() -> VadStage:
    stage = VadStage(config.load({}, environ={}))
    stage.setup()
    stage.state = _Turns()
    return stage


async def _stream(stage: VadStage, pcm: np.ndarray) -> list[tuple[Utterance, float]]:
    session = stage.open_session(SessionOpen(sid="bench"))
    step, out = SR * FRAME_MS // 1000, []
    for i in range(0, len(pcm), step):
        async for o in stage.process(Audio(sid="bench", pcm=pcm[i:i + step].tobytes(), sr=SR),
                                     session):
            if isinstance(o, Utterance):
                out.append((o, min(i + step, len(pcm)) / SR))
    return out


# jfk.wav's speech ends as labelled by hand in tests/data/README.md (0.1 s resolution)
JFK_LABELLED_ENDS = (2.3, 4.4, 7.7, 11.0)


def decision_delays(name: str) -> tuple[list[float], list[float]]:
    """Audio time from the speech's end to the utterance being sent: against the end
    the VAD found, and (jfk) against the hand-labelled ends."""
    pcm = np.concatenate([load(name), np.zeros(SR, np.int16)])
    results = asyncio.run(_stream(_vad_stage(), pcm))
    vs_vad = [(decided - u.end_s) * 1000 for u, decided in results]
    vs_label = ([(decided - end) * 1000 for (_, decided), end in zip(results, JFK_LABELLED_ENDS)]
                if name == "jfk.wav" and len(results) == len(JFK_LABELLED_ENDS) else [])
    return vs_vad, vs_label


def stt_latency(runs: int = 5) -> list[tuple[float, float, float]]:
    """(seconds, median ms with the short window, median ms over whisper's 30 s window)."""
    stt = SttStage(config.load({}, environ={}))
    stt.setup()
    pcm = np.tile(load("jfk.wav"), 2)
    rows = []
    for seconds in (1, 3, 10):
        piece = pcm[int(0.3 * SR):int((0.3 + seconds) * SR)]
        utt = Utterance(sid="bench", pcm=piece.tobytes(), sr=SR)

        async def once():
            return [t async for t in stt.process(utt)]
        asyncio.run(once())  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            asyncio.run(once())
            times.append((time.perf_counter() - t) * 1000)
        feats = [stt.whisper.model.feature_extractor(piece.astype(np.float32) / 32768)]
        full = []
        for _ in range(max(2, runs // 2)):
            t = time.perf_counter()
            stt.whisper._decode(feats, FULL_WINDOW, 200)
            full.append((time.perf_counter() - t) * 1000)
        rows.append((seconds, statistics.median(times), statistics.median(full)))
    return rows


def main() -> None:
    s = config.load({}, environ={})
    print(f"s2s listening benchmark on {os.cpu_count()} CPU core(s), one model thread each\n")
    bare, staged = vad_chunk_cost()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| VAD cost per 32 ms chunk (model only) | {bare:.3f} ms | ≪ 32 ms |")
    print(f"| VAD cost per 32 ms chunk (stage, 20 ms frames, resample, endpointing) | "
          f"{staged:.3f} ms | ≪ 32 ms |")
    limit = s.vad_min_silence_ms + 40
    for name in ("jfk.wav", "lecture.wav"):
        vs_vad, vs_label = decision_delays(name)
        print(f"| end-of-speech decision − speech end (VAD's end), {name}, n={len(vs_vad)} | "
              f"mean {statistics.mean(vs_vad):.0f} ms, max {max(vs_vad):.0f} ms | ≤ {limit} ms |")
        if vs_label:
            print(f"| end-of-speech decision − hand-labelled end, {name} | "
                  f"{', '.join(f'{d:.0f}' for d in vs_label)} ms | (labels ±100 ms) |")
    for seconds, short, full in stt_latency():
        target = "≤ 250 ms" if seconds == 3 else ""
        print(f"| STT latency, {seconds} s utterance (median of 5) | {short:.0f} ms "
              f"(30 s window: {full:.0f} ms) | {target} |")
    print(f"\n(min silence {s.vad_min_silence_ms} ms, threshold {s.vad_threshold}, "
          f"STT beam {s.stt_beam_size}; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
