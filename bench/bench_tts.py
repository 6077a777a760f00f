"""TTS benchmark: time to first audio and real-time factor of the TTS stage.

    python -m s2s.bench.bench_tts [--repeat 5] [--out-rate 16000] [--voice PATH]

Runs the real stage (``TtsStage.process``, one onnxruntime thread) on short, medium
and long reply chunks, as the first chunk of a reply (seq 0: a long first sentence
is cut so its head renders sooner) and as a later one (seq 1), and prints medians:
first audio (text in -> first ReplyAudio out), total synthesis time, seconds of
audio, and the real-time factor (synthesis time / audio duration; < 1 is faster
than real time).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

SENTENCES = {
    "short": "Sure, I can help.",
    "medium": "The capital of France is Paris, a city famous for its museums and cafes.",
    "long": "I'm sorry for any misunderstanding but as a voice assistant I can only talk "
            "about what I know, so let me tell you a little about the history of the moon "
            "landing in nineteen sixty nine. Three astronauts flew to the moon that summer.",
}


async def measure(stage, text: str, seq: int, out_rate: int) -> tuple[float, float, float]:
    from s2s.frames import ReplyText

    frame = ReplyText(sid="bench", seq=seq, text=text, final=True, out_sr=out_rate)
    t0 = time.perf_counter()
    first = None
    samples, sr = 0, 0
    async for out in stage.process(frame):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(out.pcm) // 2
        sr = out.sr
    return first or 0.0, time.perf_counter() - t0, samples / sr if sr else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median reported)")
    parser.add_argument("--out-rate", type=int, default=0,
                        help="resample to this rate as a client asks (0: the voice's own)")
    parser.add_argument("--voice", default="", help="Piper .onnx voice (default: the bundled one)")
    args = parser.parse_args(argv)

    from s2s import config
    from s2s.services.tts.worker import TtsStage

    stage = TtsStage(config.load({"tts_voice": args.voice}))
    t0 = time.perf_counter()
    stage.setup()
    print(f"{stage.describe()}; loaded in {time.perf_counter() - t0:.2f}s; "
          f"output {args.out_rate or stage.rate} Hz; median of {args.repeat}\n")
    head = f"{'text':<8}{'seq':>4}{'chars':>7}{'first audio ms':>16}{'total ms':>10}" \
           f"{'audio s':>9}{'RTF':>7}"
    print(head)
    print("-" * len(head))
    for name, text in SENTENCES.items():
        for seq in (0, 1):
            runs = [asyncio.run(measure(stage, text, seq, args.out_rate))
                    for _ in range(args.repeat)]
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            audio = statistics.median(r[2] for r in runs)
            print(f"{name:<8}{seq:>4}{len(text):>7}{first * 1000:>16.0f}{total * 1000:>10.0f}"
                  f"{audio:>9.2f}{total / audio if audio else 0:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
