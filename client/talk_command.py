"""``s2s talk``: talk to a running stack from a recording (or the microphone).

    s2s talk speech.wav                       # transcript, reply, latencies
    s2s talk speech.flac --out reply.wav      # also save the spoken reply
    s2s talk speech.wav --json                # one JSON object (transcript, reply, …)
    s2s talk --mic                            # live, through sounddevice (use headphones)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from s2s.audio import read_audio

SEND_RATE = 16000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="speech to send: WAV, FLAC, MP3, OGG…")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws",
                        help="the gateway: the URL `s2s up` printed (http://host:port/#key=…, "
                             "whose key is then used) or its WebSocket, ws://host:port/ws")
    parser.add_argument("--api-key", default=None,
                        help="API key or signed token for the gateway [default: the #key= of "
                             "--url, else env S2S_API_KEY]")
    parser.add_argument("--out", metavar="WAV", help="write the reply audio to this WAV file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--mic", action="store_true", help="talk live from the microphone")
    parser.add_argument("--out-rate", type=int, default=None,
                        help="reply audio sample rate to ask for (default: the voice's own)")
    parser.add_argument("--fast", action="store_true",
                        help="send the file 3x faster than real time (latencies still hold)")
    parser.add_argument("--tail", type=float, default=3.0,
                        help="seconds of silence sent after the file at least")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for replies after the file")
    parser.add_argument("--protocol", choices=("native", "realtime", "webrtc"), default="native",
                        help="a file's session over the native /ws, the Realtime WebSocket "
                             "/v1/realtime, or a Realtime WebRTC call (Opus tracks)")


def write_wav(path: str, pcm: bytes, sr: int) -> None:
    import soundfile as sf

    sf.write(path, np.frombuffer(pcm, np.int16), sr, subtype="PCM_16")


def main(args: argparse.Namespace) -> int:
    from .url import resolve_url_arg

    if not resolve_url_arg(args, "s2s talk"):  # from here on args.url holds no secret
        return 2
    if args.mic:
        return asyncio.run(_mic(args))
    if not args.file:
        print("s2s talk: give a FILE to send, or --mic", file=sys.stderr)
        return 2
    if not Path(args.file).is_file():
        print(f"s2s talk: no such file: {args.file}", file=sys.stderr)
        return 2
    from .protocol import talk

    try:
        pcm = read_audio(args.file)
    except Exception as e:
        print(f"s2s talk: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(talk(args.url, pcm, SEND_RATE, out_rate=args.out_rate,
                                  realtime=not args.fast, tail_silence_s=args.tail,
                                  reply_timeout_s=args.timeout, api_key=args.api_key,
                                  protocol=args.protocol))
    except (OSError, Exception) as e:
        print(f"s2s talk: cannot talk to {args.url}: {type(e).__name__}: {e}\n"
              "Is the stack running? Start it with `s2s up`.", file=sys.stderr)
        return 1
    if args.out and result.audio:
        write_wav(args.out, result.audio, result.sample_rate)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"you said:   {result.transcript or '(nothing heard)'}")
        print(f"assistant:  {result.reply or '(no reply)'}")
        for t in result.turns:
            if not t.transcript and not t.reply:
                continue
            flags = " interrupted" if t.interrupted else " superseded" if t.superseded else ""
            print(f"  turn {t.turn}:{flags} voice-to-voice {_ms(t.voice_to_voice_ms)}"
                  f" (gateway {_ms(t.server_voice_to_voice_ms)}), transcript "
                  f"{_ms(t.first_transcript_ms)}, first reply text {_ms(t.first_reply_text_ms)}")
        if args.out and result.audio:
            print(f"reply audio: {args.out} ({len(result.audio) / 2 / result.sample_rate:.1f} s)")
        for e in result.errors:
            print(f"error: {e.get('code')}: {e.get('message')}", file=sys.stderr)
        if result.timed_out:
            print(f"no reply to every turn within {args.timeout:.0f} s", file=sys.stderr)
    return 0 if result.reply and not result.timed_out else 1


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "-"


async def _mic(args: argparse.Namespace) -> int:
    try:
        import sounddevice as sd  # type: ignore[import-not-found]
    except Exception as e:  # not installed, or no PortAudio library
        print(f"s2s talk --mic needs the sounddevice package and PortAudio ({e}).\n"
              "Install it with `pip install sounddevice` (and libportaudio2), or talk through "
              "the web page of `s2s up`.", file=sys.stderr)
        return 2
    from .protocol import Connection

    conn = await Connection.open(args.url, SEND_RATE, args.out_rate, api_key=args.api_key)
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue[bytes] = asyncio.Queue()
    playback = bytearray()  # what the speaker still has to play

    def on_mic(indata, frames, time_info, status) -> None:
        loop.call_soon_threadsafe(mic.put_nowait, bytes(indata))

    def on_speaker(outdata, frames, time_info, status) -> None:
        n = min(len(playback), len(outdata))
        outdata[:n] = playback[:n]
        outdata[n:] = b"\x00" * (len(outdata) - n)
        del playback[:n]

    print(f"session {conn.session_id}: speak (Ctrl-C to stop; headphones avoid echo)")
    out_sr = conn.output_sample_rate  # the gateway sends every reply at this rate

    async def send() -> None:
        while True:
            await conn.send_audio(await mic.get())

    async def receive() -> None:
        while (msg := await conn.recv()) is not None:
            if isinstance(msg, bytes):
                playback.extend(msg)
                continue
            kind = msg.get("type")
            if kind == "interrupt":
                playback.clear()
            elif kind == "audio_start" and msg.get("voice_to_voice_ms") is not None:
                print(f"            (voice-to-voice {msg['voice_to_voice_ms']:.0f} ms)")
            elif kind == "transcript":
                print(f"you:        {msg['text']}")
            elif kind == "reply_text" and msg.get("text"):
                print(f"assistant:  {msg['text']}")
            elif kind == "error":
                print(f"error: {msg.get('code')}: {msg.get('message')}", file=sys.stderr)

    with sd.RawInputStream(samplerate=SEND_RATE, channels=1, dtype="int16",
                           blocksize=SEND_RATE // 50, callback=on_mic), \
            sd.RawOutputStream(samplerate=out_sr, channels=1, dtype="int16",
                               callback=on_speaker):
        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await conn.close()
    return 0
