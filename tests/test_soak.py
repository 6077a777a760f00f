"""The soak harness (bench/soak.py), CI-sized: one session for a minute against a stack
it starts (the real VAD; scripted STT, LLM and TTS stages so no model loads for long).
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
    rc = soak.main(["--minutes", "1", "--sessions", "1", "--sample-s", "5", "--warmup-min", "0.25",
                    "--stage", "stt=tests.test_soak:ScriptedStt",
                    "--stage", "llm=tests.test_fuzz:ScriptedLlm",
                    "--stage", "tts=tests.test_fuzz:ScriptedTts",
                    "--json", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    series = report["series"]
    assert 11 <= len(series) <= 14  # every 5 s for 60 s
    gaps = [b["t"] - a["t"] for a, b in zip(series, series[1:])]
    assert all(3 <= g <= 8 for g in gaps), gaps
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
        assert p["samples"] >= 8 and math.isfinite(p["slope_pct_per_hour"])
        assert p["rss_mb_first"] > 1
    assert report["redis_used_memory_mb"]["target"] == 52
    assert png.stat().st_size > 10_000
    assert "Redis used_memory" in capsys.readouterr().out
