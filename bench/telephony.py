"""Phone calls against the WebSocket path: transcript accuracy at 8 kHz μ-law, and
voice-to-voice of a call on a running stack.

    python -m s2s.bench.telephony wer                 # in-process real VAD + STT, no Redis
    python -m s2s.bench.telephony latency --url URL --rounds 5

``wer``: each file (tests/data's real speech: jfk.wav against its known text, lecture.wav
against tiny.en's most careful 16 kHz transcript, so that row favours 16 kHz) is streamed
in 20 ms frames through the real VAD stage and its utterances through the real STT stage,
once at 16 kHz as recorded and once as a phone carries it (resampled to 8 kHz, G.711
μ-law encoded and decoded: what /telephony/twilio hands the session); WER of the final
transcripts of each thought.

``latency``: the same question (a file, default the France question spoken by espeak-ng)
is asked in turns over ``/ws`` (16 kHz PCM) and over ``/telephony/twilio`` (a caller
following Twilio's flow: 8 kHz μ-law, 20 ms messages in real time), alternating, each in
a fresh session.  Voice-to-voice, the same for both: arrival of the first reply audio -
the moment the client sent the frame holding the file's last speech sample (found once,
offline: s2s.bench.sweep.speech_end)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from s2s.gateway import g711  # noqa: E402

from .telephony_client import RATE, TwilioCall, to_phone  # noqa: E402
from .wer import wer  # noqa: E402

SR = 16000
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")


def phone_pcm(pcm16k: np.ndarray) -> np.ndarray:
    """What the session gets from a call: 8 kHz PCM decoded from μ-law."""
    return np.frombuffer(g711.decode(to_phone(pcm16k), "ulaw"), "<i2")


# --- transcript accuracy -----------------------------------------------------------------------
def transcribe(stt, pcm: np.ndarray, sr: int) -> str:
    """The final transcripts of each thought the real VAD cuts from ``pcm`` (at ``sr``)."""
    from s2s import config
    from s2s.frames import Audio, SessionOpen, Utterance
    from s2s.services.vad.worker import VadStage

    class Turns:
        turn = 0

        async def advance_turn(self, sid: str) -> int:
            self.turn += 1
            return self.turn

    vad = VadStage(config.load({}, environ={}))
    vad.setup()
    vad.state = Turns()

    async def run() -> str:
        session = vad.open_session(SessionOpen(sid="bench", in_sr=sr, out_sr=sr))
        x = np.concatenate([pcm, np.zeros(2 * sr, np.int16)])
        step, finals = sr // 50, {}
        for i in range(0, len(x), step):
            async for u in vad.process(Audio(sid="bench", pcm=x[i:i + step].tobytes(), sr=sr),
                                       session):
                if isinstance(u, Utterance):
                    text = ""
                    async for out in stt.process(u):
                        text = out.text
                    finals[u.start_s] = text  # a continued thought replaces its piece
        return " ".join(finals.values())
    return asyncio.run(run())


def wer_rows() -> list[str]:
    from s2s import config
    from s2s.audio import read_audio
    from s2s.services.stt.worker import SttStage

    stt = SttStage(config.load({"stt_incremental": False}, environ={}))
    stt.setup()
    lecture = read_audio(DATA / "lecture.wav", SR)
    segments, _ = stt.whisper.model.transcribe(lecture.astype(np.float32) / 32768, beam_size=5,
                                               language="en", vad_filter=False)
    refs = {"jfk.wav": JFK_TEXT, "lecture.wav": " ".join(s.text.strip() for s in segments)}
    rows, all_ref, all_16, all_8 = [], [], [], []
    for name, ref in refs.items():
        pcm = read_audio(DATA / name, SR)
        t16 = transcribe(stt, pcm, SR)
        t8 = transcribe(stt, phone_pcm(pcm), RATE)
        print(f"{name} 16 kHz: {t16}\n{name}  8 kHz: {t8}\n", flush=True)
        rows.append(f"| {name} | {wer(ref, t16):.1%} | {wer(ref, t8):.1%} |")
        all_ref.append(ref)
        all_16.append(t16)
        all_8.append(t8)
    rows.append(f"| **both** | {wer(' '.join(all_ref), ' '.join(all_16)):.1%} | "
                f"{wer(' '.join(all_ref), ' '.join(all_8)):.1%} |")
    return ["| file | WER 16 kHz PCM | WER 8 kHz μ-law |", "|---|---|---|", *rows]


# --- voice-to-voice ----------------------------------------------------------------------------
async def ws_turn(url: str, key: str | None, pcm: np.ndarray, end_s: float, lead_s: float,
                  timeout_s: float) -> float | None:
    from s2s.client import talk

    x = np.concatenate([np.zeros(int(lead_s * SR), np.int16), pcm])
    result = await talk(url, x, SR, tail_silence_s=1.0, reply_timeout_s=timeout_s,
                        marks=[lead_s + end_s], api_key=key)
    first = next((t.first_audio_at for t in result.turns if t.first_audio_at), None)
    sent = result.marks_at[0] if result.marks_at else None
    return None if first is None or sent is None else (first - sent) * 1000


async def twilio_turn(url: str, key: str | None, pcm: np.ndarray, end_s: float, lead_s: float,
                      timeout_s: float) -> float | None:
    call = await TwilioCall.open(url, api_key=key)
    try:
        pos = await call.silence(lead_s)
        pos = await call.speak(to_phone(pcm), pos)
        deadline = time.monotonic() + timeout_s
        while not call.heard.media and time.monotonic() < deadline and not call.closed.is_set():
            pos = await call.silence(0.1, pos)
        sent = call.sent_at(lead_s + end_s)
        first = call.heard.first_media_at
        return None if first is None or sent is None else (first - sent) * 1000
    finally:
        await call.hang_up()


def _stats(ms: list[float]) -> str:
    if not ms:
        return "no reply"
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return f"p50 {statistics.median(ms):.0f} ms (IQR {q[0]:.0f}-{q[2]:.0f}, n={len(ms)})"


def latency(args: argparse.Namespace) -> int:
    from s2s.client.url import gateway_url

    from .sweep import espeak_say, speech_end

    target = gateway_url(args.url)
    key = target.key if target.key is not None else os.environ.get("S2S_API_KEY")
    ws_url = target.url
    call_url = ws_url.rsplit("/", 1)[0] + "/telephony/twilio"
    if args.wav:
        from s2s.audio import read_audio
        pcm = read_audio(args.wav, SR)
    else:
        pcm = espeak_say(args.say)
    end_s = (speech_end(pcm) + 1) / SR
    out: dict[str, list[float]] = {"ws": [], "twilio": []}

    async def run() -> None:
        for r in range(args.rounds + 1):  # the first round warms the stack up, not counted
            for name in ("ws", "twilio"):
                ms = await (ws_turn(ws_url, key, pcm, end_s, args.lead, args.timeout)
                            if name == "ws" else
                            twilio_turn(call_url, key, pcm, end_s, args.lead, args.timeout))
                print(f"round {r} {name}: {ms if ms is None else round(ms)} ms", flush=True)
                if r and ms is not None:
                    out[name].append(ms)
    asyncio.run(run())
    print(f"\nvoice-to-voice, {args.rounds} rounds, input ends at {end_s:.2f} s")
    print(f"| path | voice-to-voice |\n|---|---|\n| /ws, 16 kHz PCM | {_stats(out['ws'])} |\n"
          f"| /telephony/twilio, 8 kHz μ-law | {_stats(out['twilio'])} |")
    if out["ws"] and out["twilio"]:
        print(f"twilio - ws, p50: {statistics.median(out['twilio']) - statistics.median(out['ws']):+.0f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s2s.bench.telephony", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("wer", help="transcript WER at 16 kHz and at 8 kHz μ-law (in-process)")
    lat = sub.add_parser("latency", help="voice-to-voice of /ws and of a phone call")
    lat.add_argument("--url", required=True, help="the URL `s2s up` printed (key included)")
    lat.add_argument("--rounds", type=int, default=5)
    lat.add_argument("--say", default="What is the capital of France? Answer in one sentence.")
    lat.add_argument("--wav", help="a 16 kHz speech file instead of --say")
    lat.add_argument("--lead", type=float, default=0.5, help="silence before the speech (s)")
    lat.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.what == "wer":
        print("\n".join(wer_rows()))
        return 0
    return latency(args)


if __name__ == "__main__":
    sys.exit(main())
