"""The web client (gateway/static/) in a real headless Chromium.

- test_web_client_full_stack: Redis, the four stage workers and the gateway, with
  Chromium's fake microphone playing tests/data/jfk.wav: the page shows the transcript,
  the reply and plays the reply audio.
- test_web_client_gateway_down: the page, served without a gateway, says so.
- test_web_client_logs_in_with_the_fragment_key: the page trades the #key=… of the URL
  `s2s up` prints for a one-time ticket, and clears it from the address bar.
- the others drive the page against a small scripted stand-in server (below), for what
  the real stack does not do on demand: reply chunks, interrupt, dropped connections.

Needs Debian's Chromium (/usr/bin/chromium; `scripts/install.sh --browser`) and the
`playwright` Python package, used only as a driver for that Chromium (never
`playwright install`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ROOT, TEST_API_KEY, gateway_process

STATIC = ROOT / "gateway" / "static"
JFK = ROOT / "tests" / "data" / "jfk.wav"
CHROMIUM = os.environ.get("S2S_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "web-client.png"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
                       reason=f"no Chromium at {CHROMIUM}: install it with "
                              "`scripts/install.sh --browser` (apt-get install chromium)"),
    pytest.mark.skipif(sync_playwright is None,
                       reason="the playwright package is missing (pip install playwright; "
                              "it drives /usr/bin/chromium, no browser download)"),
]

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_mic_wav(tmp: Path, lead_s: float = 1.0, tail_s: float = 4.0) -> Path:
    """tests/data/jfk.wav as Chromium's fake microphone plays it: 48 kHz, with silence
    before the speech (the page is still opening the session) and after it (played
    once with %noloop, the fake device then stops: the VAD needs the trailing pause)."""
    import soxr

    data, sr = sf.read(str(JFK), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    mono = soxr.resample(mono, sr, 48000) if sr != 48000 else mono
    lead = np.zeros(int(48000 * lead_s), np.float32)
    tail = np.zeros(int(48000 * tail_s), np.float32)
    out = tmp / "mic.wav"
    sf.write(str(out), np.concatenate([lead, mono, tail]), 48000, subtype="PCM_16")
    return out


@contextlib.contextmanager
def browser(tmp: Path, *, mic_wav: Path | None = None, grant_mic: bool = True):
    """A fresh headless Chromium (its own profile dir) with a fake microphone."""
    flags = list(CHROMIUM_FLAGS) + ["--use-fake-device-for-media-stream"]
    if grant_mic:
        flags.append("--use-fake-ui-for-media-stream")
    if mic_wav is not None:
        # %noloop: play the file once, then silence (Chromium loops it otherwise)
        flags.append(f"--use-file-for-fake-audio-capture={mic_wav}%noloop")
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=flags,
            ignore_default_args=["--mute-audio"], viewport={"width": 880, "height": 620})
        console: list[str] = []
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.console = console  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def stats(page) -> dict:
    return page.evaluate("() => ({...window.s2sStats})")


def wait_for(page, predicate, timeout: float, what: str, interval: float = 0.25):
    """Polls predicate(stats) until true; fails with the page's state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(page)
        if predicate(s):
            return s
        page.wait_for_timeout(interval * 1000)
    raise AssertionError(f"timed out waiting for {what}\nstats: {stats(page)}\n"
                         f"page: {page.inner_text('main')}\nconsole: {page.console[-20:]}")


def save_screenshot(page, *paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))


# ------------------------------------------------------------------ full stack

def test_web_client_logs_in_with_the_fragment_key(redis_url, tmp_path):
    """The real gateway (auth on, no workers needed for a session to open): the page
    reads #key=…, removes it from the address bar, trades it for a ticket and opens a
    session; a wrong key or none ends in a clear "refused", with no retry loop."""
    with gateway_process(redis_url, tmp_path) as (url, _):
        with browser(tmp_path) as page:
            page.goto(url + "/#key=" + TEST_API_KEY)
            assert page.evaluate("() => location.href") == url + "/"
            page.click("#talk")
            s = wait_for(page, lambda s: s["state"] == "ready", 30, "the session to be ready")
            assert s["sessionId"] and len(s["sessionId"]) >= 22
            page.click("#talk")
            page.reload()  # the key stays with the tab, not in the address bar
            page.click("#talk")
            wait_for(page, lambda s: s["state"] == "ready", 30, "the session after a reload")
            assert not [m for m in page.console if m.startswith("pageerror")]
        with browser(tmp_path) as page:
            page.goto(url + "/#key=wrong-key")
            page.click("#talk")
            wait_for(page, lambda s: s["errors"], 30, "the refusal")
            assert "key was not accepted (unknown API key)" in page.inner_text("main")
        with browser(tmp_path) as page:
            page.goto(url + "/")  # no key at all: the gateway says what is missing
            page.click("#talk")
            wait_for(page, lambda s: s["errors"], 30, "the refusal")
            assert "no credential" in page.inner_text("main")
        # the key never reached the gateway in a URL (nor anything it logs)
        assert TEST_API_KEY not in (tmp_path / "gateway.log").read_text(errors="replace")


def _stack_missing() -> str | None:
    needed = [ROOT / "gateway" / "app.py", ROOT / "gateway" / "server.py"] + [
        ROOT / "services" / s / "worker.py" for s in ("vad", "stt", "llm", "tts")]
    missing = [str(p.relative_to(ROOT)) for p in needed if not p.exists()]
    return ", ".join(missing) or None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_web_client_full_stack(redis_url, workers, tmp_path):
    missing = _stack_missing()
    if missing:
        pytest.skip(f"the stack is not complete yet (missing {missing})")
    # defaults: the VAD cuts at jfk.wav's pauses (up to 1 s) but each piece continues
    # the thought, so the last transcript holds the whole sentence
    for stage in ("vad", "stt", "llm", "tts"):
        workers.start(stage)
    for stage in ("vad", "stt", "llm", "tts"):
        workers.wait_ready(stage, timeout=240)
    mic = fake_mic_wav(tmp_path)
    with gateway_process(redis_url, tmp_path) as (url, _), browser(tmp_path, mic_wav=mic) as page:
        page.goto(url + "/#key=" + TEST_API_KEY)  # what `s2s up` prints
        assert page.title().startswith("s2s")
        page.click("#talk")
        s = wait_for(page, lambda s: s["state"] == "ready", 30, "the session to be ready")
        assert s["sessionId"]
        wait_for(page, lambda s: any("ask not what your country" in t.lower()
                                     for t in _bubbles(page, "user")),
                 120, "the transcript")
        wait_for(page, lambda s: s["replies"] >= 1 and s["audioChunksPlayed"] >= 3, 180,
                 "a reply to be shown and its audio played")
        reply = page.inner_text(".msg.bot .text")
        assert reply.strip(), "empty assistant bubble"
        page.wait_for_selector(".msg.bot .latency", timeout=10_000)
        s = stats(page)
        assert s["lastVoiceToVoiceMs"] is not None and s["lastVoiceToVoiceMs"] > 0
        assert s["audioSecondsPlayed"] > 0.2
        assert s["micFramesSent"] > 100
        # by default a WebRTC call (Opus both ways), measured by the browser's own stats
        assert s["transport"] == "webrtc" and s["fallbacks"] == 0, s
        assert s["rtcCodec"] == "audio/opus" and s["rtcPacketsReceived"] > 50, s
        page.wait_for_timeout(1500)  # let a little more of the reply render
        # docs/web-client.png is refreshed only on request, so test runs leave the tree clean
        save_screenshot(page, tmp_path / "web-client.png",
                        *([SCREENSHOT] if os.environ.get("S2S_UPDATE_DOCS") == "1" else []))
        page.click("#talk")  # stop: sends bye
        assert page.get_attribute("#talk", "aria-pressed") == "false"
        errors = [m for m in page.console if m.startswith("pageerror")]
        assert not errors, errors


# ------------------------------------------------------------------ gateway down

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def static_server():
    """The gateway/ folder over plain HTTP: the page at /static/index.html, no /ws."""
    handler = functools.partial(_QuietHandler, directory=str(ROOT / "gateway"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(120)
def test_web_client_gateway_down(tmp_path):
    with static_server() as url, browser(tmp_path) as page:
        page.goto(url + "/static/index.html")
        page.click("#talk")
        alert = page.locator("#alert")
        alert.wait_for(state="visible", timeout=15_000)
        page.wait_for_function(
            "() => document.getElementById('alert-text').textContent.includes('Reconnecting in')",
            timeout=15_000)
        text = alert.inner_text()
        assert "Cannot reach the s2s server" in text, text
        assert page.inner_text("#conn") == "Offline"
        # it keeps trying, with growing delays
        wait_for(page, lambda s: len([e for e in s["errors"] if e["code"] == "connection"]) >= 2,
                 20, "a second connection attempt")
        save_screenshot(page, tmp_path / "gateway-down.png")
        page.click("#talk")  # Stop ends the retries and clears the alert
        assert page.locator("#alert").is_hidden()


# ------------------------------------------------------------------ scripted stand-in

class StandIn:
    """A scripted stand-in for the gateway: serves gateway/static/ and speaks the
    WebSocket protocol. Each connection runs ``script(ws, session)``; the default one
    answers the first second of microphone audio with one turn."""

    def __init__(self, script=None):
        self.script = script or self.one_turn
        self.hellos: list[dict] = []
        self.audio_bytes = 0
        self.connections = 0
        self.byes = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread = None

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import FileResponse
        from starlette.routing import Mount, Route, WebSocketRoute
        from starlette.staticfiles import StaticFiles

        async def index(request):
            return FileResponse(STATIC / "index.html")

        async def ws_endpoint(ws):
            await ws.accept()
            self.connections += 1
            hello = json.loads(await ws.receive_text())
            self.hellos.append(hello)
            session = {"id": hello.get("session_id") or f"standin-{self.connections}",
                       "audio": 0, "hello": hello}
            await ws.send_json({"type": "ready", "session_id": session["id"],
                                "sample_rate": hello["sample_rate"],
                                "output_sample_rate": hello.get("output_sample_rate", 24000)})
            reader = asyncio.create_task(self._read(ws, session))
            try:
                await self.script(ws, session)
                await reader
            except Exception:
                pass
            finally:
                reader.cancel()

        return Starlette(routes=[Route("/", index), Mount("/static", StaticFiles(directory=STATIC)),
                                 WebSocketRoute("/ws", ws_endpoint)])

    async def _read(self, ws, session):
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                session["audio"] += len(msg["bytes"])
                self.audio_bytes += len(msg["bytes"])
            elif msg.get("text") and json.loads(msg["text"]).get("type") == "bye":
                self.byes += 1

    @staticmethod
    async def audio_seconds(session, seconds: float, timeout: float = 20):
        """Until the session has sent `seconds` of microphone audio."""
        rate = session["hello"]["sample_rate"]
        deadline = time.monotonic() + timeout
        while session["audio"] < seconds * rate * 2:
            if time.monotonic() > deadline:
                raise TimeoutError("no microphone audio")
            await asyncio.sleep(0.02)

    @staticmethod
    def tone(seconds: float, sr: int, freq: float = 330.0) -> list[bytes]:
        """A soft tone as 20 ms int16 chunks."""
        n = int(seconds * sr)
        t = np.arange(n) / sr
        pcm = (0.2 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2").tobytes()
        step = int(sr * 0.02) * 2
        return [pcm[i:i + step] for i in range(0, len(pcm), step)]

    async def reply(self, ws, turn: int, text_chunks, seconds: float, v2v_ms: float = 480.0,
                    pace: float = 0.5):
        """A whole turn: reply text in chunks, then audio (sent at 1/pace × real time)."""
        sr = 24000
        for seq, chunk in enumerate(text_chunks):
            await ws.send_json({"type": "reply_text", "turn": turn, "seq": seq, "text": chunk,
                                "final": seq == len(text_chunks) - 1})
            await asyncio.sleep(0.05)
        await ws.send_json({"type": "audio_start", "turn": turn, "sample_rate": sr,
                            "voice_to_voice_ms": v2v_ms})
        for chunk in self.tone(seconds, sr):
            await ws.send_bytes(chunk)
            await asyncio.sleep(0.02 * pace)
        await ws.send_json({"type": "reply_done", "turn": turn})

    async def one_turn(self, ws, session):
        await self.audio_seconds(session, 0.5)
        await ws.send_json({"type": "speech_started", "turn": 1})
        await self.audio_seconds(session, 1.0)
        await ws.send_json({"type": "transcript", "turn": 1, "end_s": 1.0,
                            "text": "And so my fellow Americans, ask not what your country can do "
                                    "for you."})
        await self.reply(ws, 1, ["That line is from John F. Kennedy's inaugural address",
                                 "in January 1961.", "Do you want to hear more of it?"],
                         seconds=1.5, v2v_ms=612.4)

    def __enter__(self):
        import uvicorn

        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", ws="websockets-sansio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(10)


def _bubbles(page, who: str) -> list[str]:
    return page.eval_on_selector_all(f".msg.{who} .text", "els => els.map(e => e.textContent)")


@pytest.mark.timeout(120)
def test_web_client_protocol(tmp_path):
    """Hello/ready, mic PCM at 16 kHz, chunked reply text in one bubble, latency badge,
    gapless playback counted, bye on Stop."""
    with StandIn() as server, browser(tmp_path) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        s = wait_for(page, lambda s: s["audioChunksPlayed"] >= 70, 30, "the reply audio")
        hello = server.hellos[0]
        assert hello["type"] == "hello" and hello["sample_rate"] == 16000
        assert "session_id" not in hello
        assert s["sessionId"] == "standin-1"
        assert s["micFramesSent"] > 40 and server.audio_bytes % 640 == 0  # 20 ms frames
        assert _bubbles(page, "user") == [
            "And so my fellow Americans, ask not what your country can do for you."]
        assert _bubbles(page, "bot") == [
            "That line is from John F. Kennedy's inaugural address in January 1961. "
            "Do you want to hear more of it?"]
        assert page.inner_text(".msg.bot .latency b") == "612 ms"
        assert page.inner_text(".msg.bot .latency").endswith("voice-to-voice")
        wait_for(page, lambda s: s["audioChunksPlayed"] == 75, 5, "all 75 chunks played")
        s = stats(page)
        assert s["audioChunksDropped"] == 0
        assert abs(s["audioSecondsPlayed"] - 1.5) < 0.01
        save_screenshot(page, tmp_path / "standin.png")
        page.click("#talk")
        deadline = time.monotonic() + 5
        while server.byes < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.byes == 1


@pytest.mark.timeout(120)
def test_web_client_interrupt_flushes_playback(tmp_path):
    async def script(ws, session):
        await StandIn.audio_seconds(session, 0.3)
        await ws.send_json({"type": "transcript", "turn": 1, "text": "Tell me a long story."})
        await ws.send_json({"type": "reply_text", "turn": 1, "seq": 0, "final": True,
                            "text": "Once upon a time there was a very long story."})
        await ws.send_json({"type": "audio_start", "turn": 1, "sample_rate": 24000,
                            "voice_to_voice_ms": 700})
        for chunk in StandIn.tone(10.0, 24000):  # ten seconds at once: all scheduled
            await ws.send_bytes(chunk)
        await asyncio.sleep(1.0)
        await ws.send_json({"type": "speech_started", "turn": 2})
        await ws.send_json({"type": "interrupt", "turn": 2})
        for chunk in StandIn.tone(1.0, 24000):  # late audio of the old turn: dropped
            await ws.send_bytes(chunk)
        await asyncio.sleep(0.5)
        await ws.send_json({"type": "transcript", "turn": 2, "text": "Stop, please."})
        await StandIn().reply(ws, 2, ["Sure."], seconds=0.4, v2v_ms=350)
        await asyncio.sleep(30)

    with StandIn(script) as server, browser(tmp_path) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        wait_for(page, lambda s: s["interrupts"] == 1, 20, "the interrupt")
        s = stats(page)
        assert s["audioChunksPlayed"] < 150, s  # most of the 500 chunks were never heard
        s = wait_for(page, lambda s: s["audioChunksPlayed"] >= 20 and s["lastVoiceToVoiceMs"] == 350
                     and page.evaluate("document.body.dataset.phase") == "listening",
                     15, "the second reply to play out")
        assert s["audioChunksDropped"] == 50, s  # the late second of turn 1
        played_before = s["audioChunksPlayed"]
        page.wait_for_timeout(1000)
        assert stats(page)["audioChunksPlayed"] == played_before  # nothing left queued
        assert "interrupted" in page.get_attribute(".turn[data-turn='1'] .msg.bot", "class")
        assert _bubbles(page, "user") == ["Tell me a long story.", "Stop, please."]
        assert _bubbles(page, "bot")[-1] == "Sure."


@pytest.mark.timeout(120)
def test_web_client_reconnects_and_resumes(tmp_path):
    async def script(ws, session):
        if len(server.hellos) == 1:
            await StandIn.audio_seconds(session, 0.3)
            await ws.close(code=1011)  # the server goes away
            return
        await asyncio.sleep(30)

    with StandIn(script) as server, browser(tmp_path) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        page.wait_for_function(
            "() => document.getElementById('alert-text').textContent.includes('Reconnect')",
            timeout=10_000)
        s = wait_for(page, lambda s: s["reconnects"] == 1 and s["state"] == "ready", 20,
                     "the reconnection")
        assert server.hellos[1].get("session_id") == "standin-1"  # resumed
        assert s["sessionId"] == "standin-1"
        assert "Reconnected" in page.inner_text("#alert")
        assert page.inner_text("#conn") == "Connected"
        sent = stats(page)["micFramesSent"]
        page.wait_for_timeout(500)
        assert stats(page)["micFramesSent"] > sent  # streaming again


@pytest.mark.timeout(120)
def test_web_client_joins_unanswered_turns(tmp_path):
    """The user went on before an answer came (the earlier turn was dropped): one user
    bubble holds all that was said, a continuation's transcript in place of the parts
    it re-heard; an empty turn (a cough) leaves nothing."""
    async def script(ws, session):
        await StandIn.audio_seconds(session, 0.2)
        for turn, text in ((1, "What is the weather"), (2, "in Paris tomorrow?"), (3, "")):
            await ws.send_json({"type": "speech_started", "turn": turn})
            await asyncio.sleep(0.2)
            await ws.send_json({"type": "transcript", "turn": turn, "text": text})
        await ws.send_json({"type": "speech_started", "turn": 4})
        await ws.send_json({"type": "transcript", "turn": 4, "text": "In Celsius."})
        await StandIn().reply(ws, 4, ["Mild, around 18 degrees."], seconds=0.2)
        # a continuation (same start_s) re-heard turn 5: it replaces it, not joined to it
        for turn, text, end in ((5, "Thanks!", 21.0), (6, "Thanks! See you.", 23.0)):
            await ws.send_json({"type": "speech_started", "turn": turn})
            await ws.send_json({"type": "transcript", "turn": turn, "text": text,
                                "start_s": 20.0, "end_s": end})
        await asyncio.sleep(30)

    with StandIn(script) as server, browser(tmp_path) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        wait_for(page, lambda s: s["transcripts"] == 6, 20, "six transcripts")
        assert _bubbles(page, "user") == ["What is the weather in Paris tomorrow? In Celsius.",
                                          "Thanks! See you."]
        assert _bubbles(page, "bot") == ["Mild, around 18 degrees."]


@pytest.mark.timeout(120)
def test_web_client_microphone_denied(tmp_path):
    with StandIn() as server, browser(tmp_path, grant_mic=False) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        page.locator("#alert").wait_for(state="visible", timeout=10_000)
        assert "Microphone access was denied" in page.inner_text("#alert")
        assert page.get_attribute("#talk", "aria-pressed") == "false"
        assert server.connections == 0
        assert stats(page)["errors"][-1]["code"] == "mic_denied"


# ------------------------------------------------------------------ the mic resampler

RESAMPLE_JS = """
async ([rate, freq, amp]) => {
  const ctx = new OfflineAudioContext(1, rate, rate);  // one second
  await ctx.audioWorklet.addModule('/static/mic-worklet.js');
  const frames = [];
  const node = new AudioWorkletNode(ctx, 's2s-mic', {
    numberOfInputs: 1, numberOfOutputs: 0,
    processorOptions: {targetRate: 16000, frameMs: 20}});
  node.port.onmessage = (e) => frames.push(Array.from(e.data.pcm));
  const osc = ctx.createOscillator();
  osc.frequency.value = freq;
  const gain = ctx.createGain();
  gain.gain.value = amp;
  osc.connect(gain).connect(node);
  osc.start();
  await ctx.startRendering();
  await new Promise((r) => setTimeout(r, 300));  // the last frames are on their way
  return frames;
}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rate", [48000, 44100])
def test_mic_worklet_resamples_to_16k(tmp_path, rate):
    """The worklet's 20 ms frames at 16 kHz keep a 1 kHz tone (level and pitch) and
    suppress a 12 kHz one, which would alias without the low-pass."""
    with static_server() as url, browser(tmp_path) as page:
        page.goto(url + "/static/index.html")
        for freq, amp in ((1000.0, 0.5), (12000.0, 0.5)):
            frames = page.evaluate(RESAMPLE_JS, [rate, freq, amp])
            assert frames and all(len(f) == 320 for f in frames)  # 20 ms at 16 kHz
            assert 48 <= len(frames) <= 50  # one second, less the kernel's delay
            x = np.concatenate([np.asarray(f, np.float64) for f in frames]) / 32768
            steady = x[800:-800]
            rms = float(np.sqrt(np.mean(steady ** 2)))
            if freq < 8000:
                assert abs(rms - amp / math.sqrt(2)) < 0.01 * amp, rms
                spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
                peak_hz = np.argmax(spectrum) * 16000 / len(steady)
                assert abs(peak_hz - freq) < 5, peak_hz
            else:
                assert rms < 0.01 * amp, rms  # at least 40 dB down


@pytest.mark.timeout(120)
def test_web_client_falls_back_to_the_websocket(tmp_path):
    """A server without the WebRTC endpoint (the stand-in answers its POST with 404): the
    page says why in its error log and holds the conversation over the WebSocket."""
    with StandIn() as server, browser(tmp_path) as page:
        page.goto(server.url + "/")
        page.click("#talk")
        s = wait_for(page, lambda s: s["audioChunksPlayed"] >= 70, 30, "the reply audio")
        assert s["transport"] == "websocket" and s["fallbacks"] == 1, s
        assert any(e["code"] == "webrtc" and "HTTP 404" in e["message"] for e in s["errors"])
        assert server.connections == 1 and server.hellos[0]["sample_rate"] == 16000
        assert _bubbles(page, "user") == [
            "And so my fellow Americans, ask not what your country can do for you."]
