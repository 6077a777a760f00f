"""The soak harness (bench/soak.py), CI-sized: one session for 40 s against a stack it
starts (the real VAD; scripted STT, LLM and TTS stages so no model loads for long): enough
for three turns of jfk.wav and nine samples after the warm-up.
It checks the harness, not the slopes: samples at the interval, an RSS for every
process of the stack in each, Redis used_memory, turns answered, JSON and plot written."""

from __future__ import annotations

import json
import math

import pytest

from s2s.bench import soak
from s2s.frames import Transcript, Utterance
from s2s.stage import Stage


class ScriptedStt(Stage):
    """Hears "hello" in every utterance (the VAD before it is real)."""
    name = "stt"

    async def process(self, frame: Utterance):
        yield Transcript(sid=frame.sid, turn=frame.turn, text="Hello there.", out_sr=frame.out_sr,
                         start_s=frame.start_s, end_s=frame.end_s, marks=dict(frame.marks))


@pytest.mark.timeout(300)
def test_a_short_soak_produces_sane_samples(tmp_path, capsys):
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    minutes, sample_s = 40 / 60, 4.0
    rc = soak.main(["--minutes", str(minutes), "--sessions", "1", "--sample-s", str(sample_s),
                    "--warmup-min", "0.1",
                    "--stage", "stt=tests.test_soak:ScriptedStt",
                    "--stage", "llm=tests.test_fuzz:ScriptedLlm",
                    "--stage", "tts=tests.test_fuzz:ScriptedTts",
                    "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    series = report["series"]
    expected = round(minutes * 60 / sample_s) + 1  # every 4 s for 40 s, both ends
    assert expected - 2 <= len(series) <= expected + 1, len(series)
    gaps = [b["t"] - a["t"] for a, b in zip(series, series[1:])]
    assert all(0.6 * sample_s <= g <= 1.6 * sample_s for g in gaps), gaps
    names = {"redis", "gateway", "vad", "stt", "llm", "tts"}
    for sample in series:
        assert names <= set(sample["rss"]), sample["rss"].keys()
        assert all(2**20 < (sample["rss"][n] or 0) < 8 * 2**30 for n in names), sample["rss"]
        assert 2**19 < sample["redis"] < 2**30
    assert [s["turns"] for s in series] == sorted(s["turns"] for s in series)
    assert report["turns_completed"] >= 2, report  # jfk (11 s) answered, more than once
    assert not [e for e in report["errors"] if e.startswith("died")], report["errors"]
    for name in names:
        p = report["processes"][name]
        assert p["samples"] >= expected - 3 and math.isfinite(p["slope_pct_per_hour"])
        assert p["rss_mb_first"] > 1
    assert report["redis_used_memory_mb"]["target"] == 52
    assert png.stat().st_size > 10_000
    assert "Redis used_memory" in capsys.readouterr().out
