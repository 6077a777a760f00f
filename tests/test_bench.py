"""The load generator's statistics, table, plot and metrics arithmetic on synthetic results
(the real load run is the benchmark, not a test)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from s2s.bench import loadgen
from s2s.bench.loadgen import SessionSample, TurnSample
from s2s import cli
from s2s.metrics import LATENCY_BUCKETS


def synthetic_level(sessions: int, turns: int = 3, base: float = 600.0) -> list[SessionSample]:
    rng = np.random.default_rng(sessions)
    samples = []
    for s in range(sessions):
        sample = SessionSample(turns_expected=turns)
        for t in range(turns):
            v2v = float(base * (1 + 0.3 * sessions) + rng.normal(0, 40))
            sample.turns.append(TurnSample(voice_to_voice_ms=v2v, first_transcript_ms=v2v * 0.3,
                                           first_reply_text_ms=v2v * 0.6, transcript="ask not",
                                           reply="Sure."))
        samples.append(sample)
    return samples


def test_percentile_ignores_missing_values():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([None, float("nan")], 95) is None
    assert loadgen.percentile([1, 2, 3, None], 50) == 2
    assert loadgen.percentile(range(101), 95) == pytest.approx(95)
    assert loadgen.percentile([5, 1, 9], 100) == 9


def test_summarize_counts_answered_missing_and_errors():
    samples = synthetic_level(2, turns=2)
    samples[1].turns[1] = TurnSample(voice_to_voice_ms=None, interrupted=True)
    samples.append(SessionSample(turns_expected=2, errors=["ConnectionRefusedError: nope"]))
    level = loadgen.summarize(3, samples, wall_s=12.345)
    assert level["sessions"] == 3
    assert level["turns_expected"] == 6
    assert level["turns_answered"] == 3
    assert level["turns_missing"] == 3
    assert level["turns_interrupted"] == 1
    assert level["errors"] == 1 and level["error_messages"] == ["ConnectionRefusedError: nope"]
    v2v = [t.voice_to_voice_ms for s in samples for t in s.turns if t.voice_to_voice_ms]
    assert level["voice_to_voice_ms"]["p50"] == pytest.approx(float(np.median(v2v)))
    assert level["voice_to_voice_ms"]["max"] == pytest.approx(max(v2v))
    assert level["first_transcript_ms"]["p50"] < level["first_reply_text_ms"]["p50"] \
        < level["voice_to_voice_ms"]["p50"]
    json.dumps(level)  # the --json report is plain JSON


def test_results_of_the_real_client_are_read():
    from s2s.client import TalkResult, TurnResult

    result = TalkResult(turns=[
        TurnResult(turn=1, transcript="And so my fellow Americans,", superseded=True,
                   first_transcript_ms=300.0),
        TurnResult(turn=2, transcript="ask not", reply="Sure.", voice_to_voice_ms=900.0,
                   first_transcript_ms=310.0, first_reply_text_ms=600.0,
                   server_voice_to_voice_ms=880.0, done=True)],
        errors=[{"type": "error", "code": "rate_limited", "message": "slow down"}],
        timed_out=True)
    sample = loadgen.to_session_sample(result, 1, 12.0)
    assert [t.superseded for t in sample.turns] == [True, False]
    assert sample.errors[0] == "rate_limited: slow down" and len(sample.errors) == 2
    level = loadgen.summarize(1, [sample], 12.0)
    assert level["turns_answered"] == 1 and level["turns_superseded"] == 1
    # steps of a turn come from answered turns only
    assert level["first_transcript_ms"]["p50"] == 310.0
    assert level["gateway_voice_to_voice_ms"]["p50"] == 880.0


def test_client_results_are_read_from_objects_or_dicts():
    class Turn:
        voice_to_voice_ms = 700.0
        first_transcript_ms = 200.0
        first_reply_text_ms = 450.0
        interrupted = False
        transcript, reply = "hello", "Hi there."

    class Result:
        turns = [Turn()]
        errors = []

    sample = loadgen.to_session_sample(Result(), 2, 3.0)
    assert sample.turns[0].voice_to_voice_ms == 700.0 and sample.turns[0].reply == "Hi there."
    sample = loadgen.to_session_sample({"turns": [{"voice_to_voice_ms": 1.0}],
                                        "errors": ["boom"]}, 1, 1.0)
    assert sample.turns[0].voice_to_voice_ms == 1.0 and sample.errors == ["boom"]


def test_table_and_plot(tmp_path):
    levels = [loadgen.summarize(n, synthetic_level(n), wall_s=10.0 * n) for n in (1, 2, 4, 8)]
    levels[-1]["errors"] = 2
    levels[-1]["error_messages"] = ["session timed out after 40s"]
    levels[0]["server"] = {"voice_to_voice_ms": {"p50": 610.0, "p95": 700.0, "p99": 720.0,
                                                 "count": 3},
                           "stages": {"stt": {"processing_ms": {"p50": 150.0, "p95": 200.0,
                                                                "count": 3},
                                              "queue_wait_ms": {"p50": 2.0, "p95": 5.0,
                                                                "count": 3}}}}
    table = loadgen.format_table(levels)
    lines = table.splitlines()
    assert any(line.split()[:1] == ["8"] for line in lines)
    assert "session timed out after 40s" in table and "stt" in table
    png = loadgen.plot(levels, tmp_path / "out" / "bench.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_survives_levels_without_answers(tmp_path):
    levels = [loadgen.summarize(1, [SessionSample(turns_expected=1, errors=["refused"])], 1.0)]
    png = loadgen.plot(levels, tmp_path / "empty.png")
    assert png.stat().st_size > 0


def test_histogram_quantiles_match_prometheus_from_scrape_deltas():
    registry = CollectorRegistry()
    h = Histogram("s2s_voice_to_voice_seconds", "v2v", buckets=LATENCY_BUCKETS,
                  registry=registry)
    stage = Histogram("s2s_stage_processing_seconds", "p", ["stage"], buckets=LATENCY_BUCKETS,
                      registry=registry)
    for v in (0.05, 0.05, 0.05):  # before the level: must not count
        h.observe(v)
    before = generate_latest(registry).decode()
    for v in [0.6] * 50 + [1.2] * 50:
        h.observe(v)
    for v in [0.2] * 10:
        stage.labels("stt").observe(v)
    stage.labels("tts").observe(0.09)
    after = generate_latest(registry).decode()
    out = loadgen.server_breakdown(before, after)
    v2v = out["voice_to_voice_ms"]
    assert v2v["count"] == 100
    # 0.6 lies in (0.5, 0.6]: p50 interpolates to the bucket's upper edge, p95 in (1.0, 1.25]
    assert v2v["p50"] == pytest.approx(600.0)
    assert 1000.0 < v2v["p95"] <= 1250.0
    assert list(out["stages"]) == ["stt", "tts"]
    assert 150.0 < out["stages"]["stt"]["processing_ms"]["p95"] <= 200.0
    assert out["stages"]["tts"]["processing_ms"]["count"] == 1
    assert "first_transcript_ms" not in out  # nothing observed: no row
    assert loadgen.server_breakdown("", "") == {}


def test_hist_quantile_edge_cases():
    assert loadgen.hist_quantile(0.5, {}) is None
    assert loadgen.hist_quantile(0.5, {("", 1.0): 0.0, ("", math.inf): 0.0}) is None
    # everything above the last finite bucket: its bound, like Prometheus
    assert loadgen.hist_quantile(0.9, {("", 1.0): 0.0, ("", math.inf): 5.0}) == 1.0


def test_session_audio_and_metrics_urls():
    utt = [np.ones(16000, np.int16), np.full(8000, 2, np.int16)]
    pcm = loadgen.session_audio(utt, turns=3, offset=1, lead_s=0.5, gap_s=1.0)
    assert len(pcm) == 3 * 8000 + 3 * 16000 + 8000 + 16000 + 8000
    assert pcm[8000] == 2  # offset 1: the second utterance first
    urls = loadgen.metrics_urls("ws://10.0.0.5:8000/ws", ["http://w:9100"], None)
    assert urls == ["http://10.0.0.5:8000/metrics", "http://w:9100/metrics"]
    assert loadgen.metrics_urls("wss://x.example/ws", [], None) == ["https://x.example/metrics"]


def test_bench_command_line():
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    args = parser.parse_args(["--sessions", "1, 2,4", "--turns", "2", "--plot", "b.png",
                              "--json", "--synth", "3"])
    assert args.sessions == [1, 2, 4] and args.turns == 2 and args.json and args.synth == 3
    assert args.url == "ws://127.0.0.1:8000/ws" and args.realtime
    with pytest.raises(SystemExit):
        parser.parse_args(["--sessions", "0,2"])
    assert cli.COMMANDS["bench"][0] == "s2s.bench.loadgen"
    assert loadgen.DEFAULT_WAV.is_file()


def test_whole_run_with_a_fake_client(monkeypatch, tmp_path, capsys):
    """main() end to end (sweep, JSON, plot) with s2s.client.talk replaced by a fake that
    answers every turn after a delay growing with the number of concurrent sessions."""
    import asyncio
    import sys
    import types

    import s2s

    active = {"now": 0}
    calls = []

    async def talk(url, pcm, sample_rate, *, out_rate=None, realtime=True, **kw):
        calls.append((url, len(pcm), sample_rate, realtime))
        active["now"] += 1
        try:
            await asyncio.sleep(0.01)
            v2v = 500.0 + 100.0 * active["now"]
            turn = types.SimpleNamespace(transcript="ask not", reply="Sure.",
                                         voice_to_voice_ms=v2v, first_transcript_ms=v2v / 3,
                                         first_reply_text_ms=v2v / 2, interrupted=False)
            return types.SimpleNamespace(turns=[turn, turn], errors=[], transcript="ask not",
                                         reply="Sure.", voice_to_voice_ms=v2v, audio=b"")
        finally:
            active["now"] -= 1

    fake = types.ModuleType("s2s.client")
    fake.talk = talk
    monkeypatch.setitem(sys.modules, "s2s.client", fake)
    monkeypatch.setattr(s2s, "client", fake, raising=False)
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    png = tmp_path / "bench.png"
    args = parser.parse_args(["--url", "ws://127.0.0.1:9/ws", "--sessions", "1,3", "--turns", "2",
                              "--no-realtime", "--ramp", "0", "--gap", "0.1", "--json",
                              "--plot", str(png)])
    assert loadgen.main(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert [lv["sessions"] for lv in report["levels"]] == [1, 3]
    assert all(lv["turns_answered"] == lv["turns_expected"] for lv in report["levels"])
    assert report["levels"][0]["voice_to_voice_ms"]["p50"] < \
        report["levels"][1]["voice_to_voice_ms"]["p50"]
    assert "sessions" in err and png.stat().st_size > 0
    assert len(calls) == 1 + 1 + 3  # warm-up, then the two levels
    assert all(sr == 16000 and not rt for _, _, sr, rt in calls)
