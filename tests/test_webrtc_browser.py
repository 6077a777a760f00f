"""OpenAI's Realtime WebRTC guide, its browser example as written there, pointed at s2s.

The page code below is the guide's shape (an RTCPeerConnection, an <audio> element for
the model's track, the microphone's track added, a data channel named ``oai-events``,
``offer.sdp`` POSTed to ``…/v1/realtime/calls?model=…`` with ``Authorization: Bearer
<ephemeral key>`` and ``Content-Type: application/sdp``, the answer set as the remote
description, then events sent and received on the channel), run in Chromium against the
real stack (Redis, the four stage workers, a gateway process).  The ephemeral key is an
s2s ticket (``s2s.ticket.<ticket>``), minted by the test as a backend would, with its key.

The microphone is Chromium's fake device playing tests/data/jfk.wav: the transcript comes
as Realtime events, the reply as audio on the track (measured by the browser's stats);
then a typed message and response.create get their own answer."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest

from tests.conftest import TEST_API_KEY, gateway_process
from tests.test_web import browser, fake_mic_wav, pytestmark as web_marks

pytestmark = web_marks

GUIDE_JS = """
async ([EPHEMERAL_KEY, baseUrl]) => {
  window.events = [];
  // Create a peer connection
  const pc = new RTCPeerConnection();

  // Set up to play remote audio from the model
  const audioElement = document.createElement("audio");
  audioElement.autoplay = true;
  document.body.append(audioElement);
  pc.ontrack = (e) => (audioElement.srcObject = e.streams[0]);

  // Add local audio track for microphone input in the browser
  const ms = await navigator.mediaDevices.getUserMedia({ audio: true });
  pc.addTrack(ms.getTracks()[0]);

  // Set up data channel for sending and receiving events
  const dc = pc.createDataChannel("oai-events");
  dc.addEventListener("message", (e) => window.events.push(JSON.parse(e.data)));

  // Start the session using the Session Description Protocol (SDP)
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);

  const model = "gpt-realtime";
  const sdpResponse = await fetch(`${baseUrl}?model=${model}`, {
    method: "POST",
    body: offer.sdp,
    headers: {
      Authorization: `Bearer ${EPHEMERAL_KEY}`,
      "Content-Type": "application/sdp",
    },
  });

  const answer = {
    type: "answer",
    sdp: await sdpResponse.text(),
  };
  await pc.setRemoteDescription(answer);
  Object.assign(window, { pc, dc, audioElement });
  return { status: sdpResponse.status, sdp: answer.sdp };
}
"""

SEND_JS = """
(text) => {
  // as the guide sends events: a user message, then a response for it
  const event = {
    type: "conversation.item.create",
    item: { type: "message", role: "user", content: [{ type: "input_text", text }] },
  };
  window.dc.send(JSON.stringify(event));
  window.dc.send(JSON.stringify({ type: "response.create" }));
}
"""

STATS_JS = """
async () => {
  const report = await window.pc.getStats();
  let inbound = null, outbound = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") inbound = s;
    if (s.type === "outbound-rtp" && s.kind === "audio") outbound = s;
  });
  const codec = inbound && report.get(inbound.codecId);
  return { energy: inbound.totalAudioEnergy, duration: inbound.totalSamplesDuration,
           received: inbound.packetsReceived, sent: outbound.packetsSent,
           codec: codec && codec.mimeType, playing: !!window.audioElement.srcObject };
}
"""


def events(page) -> list[dict]:
    return page.evaluate("() => window.events")


def wait_event(page, pred, timeout_s: float, what: str) -> list[dict]:
    waited = 0.0
    while waited < timeout_s:
        got = events(page)
        if any(pred(e) for e in got):
            return got
        page.wait_for_timeout(250)
        waited += 0.25
    raise AssertionError(f"timed out waiting for {what}; events: "
                         f"{[e['type'] for e in events(page)][-40:]}\n{page.console[-10:]}")


def ticket(url: str) -> str:
    req = urllib.request.Request(url + "/auth/ticket", method="POST",
                                 headers={"Authorization": f"Bearer {TEST_API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["ticket"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_openai_guide_browser_example_talks_to_s2s(redis_url, workers, tmp_path):
    for stage in ("vad", "stt", "llm", "tts"):
        workers.start(stage)
    for stage in ("vad", "stt", "llm", "tts"):
        workers.wait_ready(stage, timeout=240)
    mic = fake_mic_wav(tmp_path, lead_s=1.5)
    with gateway_process(redis_url, tmp_path) as (url, _), browser(tmp_path, mic_wav=mic) as page:
        page.goto(url + "/healthz")  # the gateway's origin, as the guide's page is its app's
        answered = page.evaluate(GUIDE_JS, ["s2s.ticket." + ticket(url),
                                            url + "/v1/realtime/calls"])
        assert answered["status"] == 201
        assert "opus/48000/2" in answered["sdp"] and "a=rtpmap:0 " not in answered["sdp"]
        got = wait_event(page, lambda e: e["type"] == "session.created", 30, "session.created")
        assert got[0]["type"] == "session.created" and got[0]["session"]["id"].startswith("sess_")

        # the fake microphone's speech: transcribed, answered on the track
        got = wait_event(page, lambda e: e["type"] == "output_audio_buffer.stopped", 240,
                         "a spoken reply to be played out")
        kinds = [e["type"] for e in got]
        transcripts = [e["transcript"].lower() for e in got if e["type"] ==
                       "conversation.item.input_audio_transcription.completed"]
        # the VAD may cut the sentence at its pauses: its pieces, in order
        said = " ".join(transcripts)
        assert "ask not" in said and "your country" in said, transcripts
        for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "response.created", "response.output_audio_transcript.delta",
                     "output_audio_buffer.started", "response.done"):
            assert kind in kinds, (kind, kinds)
        assert "response.output_audio.delta" not in kinds  # the audio is on the track
        started = next(e for e in got if e["type"] == "output_audio_buffer.started")
        assert started["voice_to_voice_ms"] > 0
        stats = page.evaluate(STATS_JS)
        assert stats["codec"] == "audio/opus" and stats["playing"], stats
        assert stats["sent"] > 300, stats            # ≥ 6 s of microphone in 20 ms frames
        assert stats["received"] > 100, stats
        # the reply was heard: its energy over what was played is well above silence
        assert stats["energy"] > 0 and math.sqrt(stats["energy"] / stats["duration"]) > 0.003, stats

        # a typed message and response.create, as the guide sends events
        before = len([e for e in got if e["type"] == "response.done"])
        page.evaluate(SEND_JS, "What is the capital of France? Answer in one word.")
        got = wait_event(page, lambda e: e["type"] == "conversation.item.done"
                         and e["item"]["content"][0].get("text", "").startswith("What is"),
                         30, "the typed item")
        for _ in range(720):  # 180 s
            dones = [e for e in events(page) if e["type"] == "response.done"]
            if len(dones) > before:
                break
            page.wait_for_timeout(250)
        assert len(dones) > before, "no response to the typed message"
        done = dones[-1]["response"]
        assert done["status"] == "completed"
        reply = done["output"][0]["content"][0]["transcript"]
        assert reply.strip(), done
        errors = [m for m in page.console if m.startswith("pageerror")]
        assert not errors, errors
