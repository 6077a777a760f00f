"""Listening benchmark: VAD cost, end-of-speech decision delay, STT latency.

    python -m s2s.bench.bench_vad_stt [--only stt]

Runs the real stages in-process (no Redis) on tests/data speech, one model thread
each, and prints a table with the targets next to the numbers; then incremental STT
(each utterance the real VAD emits for jfk.wav and lecture.wav: ms and WER, whole vs
incremental) and batched vs one-by-one decoding of 2 and 4 waiting utterances.
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
from s2s.services.stt.batching import Job, group_similar  # noqa: E402
from s2s.services.stt.worker import FULL_WINDOW, SttStage  # noqa: E402
from s2s.services.vad.worker import CHUNK, SR, SileroVad, VadStage  # noqa: E402
from s2s.bench.wer import wer  # noqa: E402

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
    # a new utterance each time (incremental off: a repeat would be "the same again")
    stt = SttStage(config.load({"stt_incremental": False}, environ={}))
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
            stt.whisper._decode(feats, FULL_WINDOW, 200, [stt.whisper.prompt], [Job(piece)])
            full.append((time.perf_counter() - t) * 1000)
        rows.append((seconds, statistics.median(times), statistics.median(full)))
    return rows


JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")


def vad_utterances(name: str) -> list[Utterance]:
    """The utterances the real VAD sends for a file streamed in 20 ms frames (a thought
    continued after a pause comes again, longer, with the same start)."""
    pcm = np.concatenate([load(name), np.zeros(2 * SR, np.int16)])
    return [u for u, _ in asyncio.run(_stream(_vad_stage(), pcm))]


def stt_stage(**overrides) -> SttStage:
    stt = SttStage(config.load(overrides, environ={}))
    stt.setup()
    return stt


def compare_sequence(whole: SttStage, incr: SttStage, utts: list[Utterance], runs: int = 3
                     ) -> tuple[list[float], list[float], float, str, str]:
    """Each utterance in turn, as the stack sends them, through both stages: CPU ms
    each until the transcript is out (one model thread: on an idle machine the wall
    time), the best of ``runs``, whole and incremental interleaved so that others' load
    hits both alike (the incremental stage's record is put back before each repeat);
    the CPU ms the incremental stage spends after its transcripts (preparing the next
    piece: word alignment), summed; and the final transcripts (the last piece of each
    thought, joined)."""
    incr.local.clear()

    async def once(stt: SttStage, u: Utterance) -> tuple[float, float, str]:
        t = time.process_time()  # CPU time of this process: others' load barely moves it
        text, took = "", None
        async for o in stt.process(u):
            text, took = o.text, time.process_time() - t
        total = time.process_time() - t
        took = total if took is None else took
        return took * 1000, (total - took) * 1000, text

    async def run():
        w_ms, i_ms, after, w_fin, i_fin = [], [], 0.0, {}, {}
        for u in utts:
            record = incr.local.get(u.sid)
            best_w = best_i = best_after = float("inf")
            for _ in range(runs):
                ms, _, w_fin[u.start_s] = await once(whole, u)
                best_w = min(best_w, ms)
                if record is not None:
                    incr.local[u.sid] = record
                else:
                    incr.local.pop(u.sid, None)
                ms, later, i_fin[u.start_s] = await once(incr, u)
                best_i, best_after = min(best_i, ms), min(best_after, later)
            w_ms.append(best_w)
            i_ms.append(best_i)
            after += best_after
        return w_ms, i_ms, after, " ".join(w_fin.values()), " ".join(i_fin.values())
    return asyncio.run(run())


def lecture_reference(stt: SttStage) -> str:
    """lecture.wav has no human transcript: the reference is tiny.en's most careful one
    (faster-whisper's own transcribe(): beam 5, 30 s windows, previous text as prompt)."""
    segments, _ = stt.whisper.model.transcribe(load("lecture.wav").astype(np.float32) / 32768,
                                               beam_size=5, language="en", vad_filter=False)
    return " ".join(s.text.strip() for s in segments)


def incremental_rows() -> list[str]:
    whole, incr = stt_stage(stt_incremental=False), stt_stage(stt_incremental=True)
    rows = []
    refs = {"jfk.wav": JFK_TEXT, "lecture.wav": lecture_reference(whole)}
    for name in ("jfk.wav", "lecture.wav"):
        utts = vad_utterances(name)
        compare_sequence(whole, incr, utts[:1], 1)  # warm-up
        w_ms, i_ms, after, w_text, i_text = compare_sequence(whole, incr, utts)
        last = {u.start_s: u for u in utts}
        seen: set[float] = set()
        for u, a, b in zip(utts, w_ms, i_ms):
            how = "continued" if u.start_s in seen else "new thought"
            seen.add(u.start_s)
            rows.append(f"| {name} {u.start_s:.1f}–{u.end_s:.1f} s ({how}, {u.seconds:.1f} s "
                        f"of audio) | {a:.0f} ms | {b:.0f} ms |")
        rows.append(f"| **{name} total STT CPU** (incremental: + preparing the next piece "
                    f"after each transcript) | {sum(w_ms):.0f} ms | {sum(i_ms):.0f} + "
                    f"{after:.0f} ms |")
        rows.append(f"| **{name} STT of the last piece of each thought** (waited for) | "
                    f"{sum(a for u, a in zip(utts, w_ms) if last[u.start_s] is u):.0f} ms | "
                    f"{sum(b for u, b in zip(utts, i_ms) if last[u.start_s] is u):.0f} ms |")
        rows.append(f"| **{name} WER** of the final transcripts (of each thought) | "
                    f"{wer(refs[name], w_text):.1%} | {wer(refs[name], i_text):.1%} |")
        print(f"{name} whole:       {w_text}\n{name} incremental: {i_text}\n", flush=True)
    return rows


def _utterances_of(pcm: np.ndarray, sid: str) -> list[Utterance]:
    pcm = np.concatenate([pcm, np.zeros(2 * SR, np.int16)])
    return [u for u, _ in asyncio.run(_stream(_vad_stage(), pcm))]


def eval_set_rows() -> list[str]:
    """The evaluation set's dictation turns (Piper and espeak voices, 0.5-1.2 s pauses
    mid-thought): WER of the final transcripts, whole vs incremental, against the text
    that was spoken (numbers said as words, so digits count as errors both ways)."""
    import tempfile

    from s2s.bench.eval_set import CONVERSATIONS, Voices
    whole, incr = stt_stage(stt_incremental=False), stt_stage(stt_incremental=True)
    voices = Voices(Path(tempfile.gettempdir()) / "s2s-eval-audio")
    rows, refs, w_all, i_all, w_ms, i_ms = [], [], [], [], 0.0, 0.0
    for conv in CONVERSATIONS:
        if conv.group != "dictation":
            continue
        for turn in conv.turns:
            try:
                pcm, _ = voices.turn_audio(conv.voice, turn)
            except Exception as e:  # a voice that is not installed: say so, go on
                rows.append(f"| {conv.id} | (no audio: {e}) | |")
                continue
            utts = _utterances_of(pcm, "bench")
            a, b, after, w_text, i_text = compare_sequence(whole, incr, utts, 1)
            w_ms, i_ms = w_ms + sum(a), i_ms + sum(b) + after
            refs.append(turn.text)
            w_all.append(w_text)
            i_all.append(i_text)
            rows.append(f"| {conv.id} ({len(utts)} pieces) | {wer(turn.text, w_text):.0%} | "
                        f"{wer(turn.text, i_text):.0%} |")
    rows.append(f"| **all {len(refs)} dictation turns** (CPU {w_ms:.0f} / {i_ms:.0f} ms) | "
                f"{wer(' '.join(refs), ' '.join(w_all)):.1%} | "
                f"{wer(' '.join(refs), ' '.join(i_all)):.1%} |")
    return rows


def batch_rows(runs: int = 3) -> list[str]:
    """Decoding 2 and 4 utterances of similar length that wait together: one batch vs one
    by one (total, and the mean time each one's transcript is ready)."""
    stt = stt_stage()
    jfk, lec = load("jfk.wav").astype(np.float32) / 32768, load("lecture.wav").astype(
        np.float32) / 32768
    pieces = [jfk[int(0.3 * SR):int(4.5 * SR)], lec[int(9.3 * SR):int(13.5 * SR)],
              jfk[int(5.3 * SR):int(9.5 * SR)], lec[int(30 * SR):int(34.2 * SR)]]
    stt.whisper.decode_jobs([Job(pieces[0])])

    def best(fn):  # CPU time (one model thread): others' load barely moves it
        ts = []
        for _ in range(runs):
            t = time.process_time()
            ready = fn()
            ts.append(((time.process_time() - t) * 1000, ready))
        return min(ts)

    def one_by_one(jobs):
        t, ready = time.process_time(), []
        for j in jobs:
            stt.whisper.decode_jobs([j])
            ready.append((time.process_time() - t) * 1000)
        return statistics.mean(ready)

    rows = []
    for n in (2, 4):
        jobs = [Job(p) for p in pieces[:n]]
        assert len(group_similar(jobs, n)) == 1  # what the worker batches
        seq, seq_ready = best(lambda: one_by_one(jobs))
        bat, _ = best(lambda: stt.whisper.decode_jobs(jobs))
        rows.append(f"| {n} utterances of ~4.2 s waiting together | {seq:.0f} ms "
                    f"(each ready after {seq_ready:.0f} ms on average) | {bat:.0f} ms "
                    f"(all ready together) |")
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m s2s.bench.bench_vad_stt", description=__doc__.split("\n\n")[0],
        epilog="Runs in-process on tests/data speech (no Redis, no stack): a few minutes "
               "on 2 cores.")
    parser.add_argument("--only", choices=["stt"], help="stt: only the incremental, eval-set "
                        "and batching tables (skips VAD cost, decision delay and latency)")
    if parser.parse_args().only == "stt":
        return stt_main()
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
          f"STT beam {s.stt_beam_size}; load average {os.getloadavg()[0]:.2f})\n")
    stt_main()


def stt_main() -> None:
    rows = incremental_rows()
    print("| utterance the VAD sent (CPU ms to the transcript, best of 3) | STT whole | "
          "STT incremental |")
    print("|---|---|---|")
    print("\n".join(rows))
    print("\n| eval-set dictation turn | WER whole | WER incremental |")
    print("|---|---|---|")
    print("\n".join(eval_set_rows()))
    print("\n| decode (CPU ms, best of 3) | one by one | one batch |")
    print("|---|---|---|")
    print("\n".join(batch_rows()))
    print(f"\n(one CPU thread; lecture.wav's WER is against tiny.en's own beam-5, 30 s-window "
          f"transcript, jfk.wav's against the speech's text; load average "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
