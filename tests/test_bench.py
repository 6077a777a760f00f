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


# --- voice-to-voice from the known end of speech (bench/sweep.py) ---------------------------
from s2s.bench import sweep  # noqa: E402
from tests.test_e2e import stack  # noqa: E402,F401  (the e2e module's whole stack, reused)

SR = 16000


@pytest.fixture(scope="module")
def silero():
    from s2s.services.vad.worker import SileroVad

    return SileroVad()


@pytest.fixture(scope="module")
def france():
    return sweep.espeak_say(sweep.FRANCE)


def test_speech_end_of_a_synthetic_voice_is_its_last_sound(france, silero):
    """espeak-ng's silence is digital zero, so its last sound is known exactly."""
    end = sweep.speech_end(france, silero)
    last_sound = int(np.flatnonzero(np.abs(france) > 0.01 * 32768)[-1])
    assert 2.5 < len(france) / SR < 4.0  # the "3.1 s"
    assert abs(end - last_sound) <= SR // 50, (end / SR, last_sound / SR)
    assert end < len(france)


def test_speech_end_ignores_noise_and_clicks_after_the_speech(france, silero):
    rng = np.random.default_rng(0)
    hiss = (rng.normal(0, 60, SR)).astype(np.int16)           # -55 dBFS background
    click = np.zeros(SR // 2, np.int16)
    click[4000:4400] = (rng.normal(0, 8000, 400)).astype(np.int16)  # 25 ms, loud, not speech
    padded = np.concatenate([france, hiss, click, np.zeros(SR // 2, np.int16)])
    assert abs(sweep.speech_end(padded, silero) - sweep.speech_end(france, silero)) <= SR // 50


def test_speech_end_of_jfk_is_country_not_the_crowd(silero):
    """jfk.wav: "...for your country." ends near 10.2 s; the crowd follows to 11.0 s (silero
    alone puts the end at 10.6 s and calls a blip at 10.95 s speech)."""
    from s2s.audio import read_audio

    pcm = read_audio(loadgen.DEFAULT_WAV, SR)
    end_s = (sweep.speech_end(pcm, silero) + 1) / SR
    assert 9.9 < end_s < 10.4, end_s


def test_no_speech_is_a_clear_error(silero):
    with pytest.raises(ValueError, match="no speech"):
        sweep.speech_end(np.zeros(SR * 2, np.int16), silero)
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError):
        sweep.speech_end((rng.normal(0, 30, SR * 2)).astype(np.int16), silero)


def test_tracker_knows_when_the_frame_holding_a_sample_was_sent():
    from s2s.client import Tracker

    tr = Tracker()
    for i in range(1, 6):  # five 20 ms frames, sent at walls 100.1 … 100.5
        tr.sent(i * 0.02, 100.0 + i / 10)
    assert tr.sent_at(0.02) == 100.1           # sample 319 ends at 0.02 s: the first frame
    assert tr.sent_at((320 + 1) / SR) == 100.2  # sample 320: the second frame
    assert tr.sent_at(0.1) == 100.5
    assert tr.sent_at(0.1 + 1 / SR) is None     # never sent
    tr.handle({"type": "transcript", "turn": 1, "text": "hi", "start_s": 0.0, "end_s": 0.04})
    tr.handle({"type": "audio_start", "turn": 1, "sample_rate": 22050})
    tr.handle(b"\x00\x00" * 10, now=101.0)
    tr.handle(b"\x00\x00" * 10, now=101.5)
    t = tr.turns[1]
    assert t.first_audio_at == 101.0 and t.voice_to_voice_ms == pytest.approx(800.0)


def _talk_result(turns, **kw):
    from s2s.client import TalkResult, TurnResult

    return TalkResult(turns=[TurnResult(**t) for t in turns], **kw)


def test_judge_takes_the_last_answered_turn():
    result = _talk_result([
        {"turn": 1, "transcript": "what is", "superseded": True},
        {"turn": 2, "transcript": "what is the capital of France", "reply": "It is Paris.",
         "first_audio_at": 50.9, "voice_to_voice_ms": 820.0, "done": True}],
        transcript="what is the capital of France")
    conv = sweep.judge(result, 50.0, "paris")
    assert conv.answered and conv.v2v_ms == pytest.approx(900.0) and conv.v2v_end_s_ms == 820.0
    assert conv.named is True and not conv.early and conv.turns == 2
    assert sweep.judge(result, 50.0, "rome").named is False
    assert sweep.judge(result, 51.0, None).early  # reply audio before the speech ended
    none = sweep.judge(_talk_result([{"turn": 1, "transcript": "hm"}], timed_out=True,
                                    errors=[{"code": "busy", "message": "full"}]), 50.0, "paris")
    assert not none.answered and none.v2v_ms is None and none.named is None
    assert none.errors == ["busy: full", "no reply within the turn timeout"]


def test_speculation_outcomes_from_metrics():
    from prometheus_client import Counter

    registry = CollectorRegistry()
    c = Counter("s2s_speculations", "spec", ["outcome"], registry=registry)
    assert sweep.spec_delta("", generate_latest(registry).decode()) is None  # not exported yet
    c.labels("used").inc(2)
    before = generate_latest(registry).decode()
    c.labels("used").inc(3)
    c.labels("wasted").inc()
    after = generate_latest(registry).decode()
    # two workers: their counts add up
    assert sweep.spec_delta(before + "\n" + before, after + "\n" + after) == \
        {"used": 6, "wasted": 2}
    row = {"speculations": {"used": 6, "wasted": 2}}
    assert sweep._spec(row) == "6 used / 2 wasted" and sweep._spec({"speculations": None}) == "-"


def _rows():
    item = sweep.Input('"What is the capital of France?"', np.zeros(SR * 3, np.int16),
                       SR * 3 - 800, "paris")
    jfk = sweep.Input("jfk.wav", np.zeros(SR * 11, np.int16), int(10.17 * SR), None)
    rows = []
    for it, n in ((item, 1), (jfk, 1), (item, 2)):
        convs = [sweep.Conversation(v2v_ms=900.0 + 100 * i * n, v2v_end_s_ms=800.0 + 100 * i,
                                    answered=True, named=True if it.expect else None,
                                    reply="Paris.") for i in range(5 * n)]
        convs[-1] = sweep.Conversation(errors=["conversation timed out after 60s"])
        rows.append(sweep.summarize_row(it, n, convs, 30.0, {"stages": {"stt": {
            "processing_ms": {"p50": 150.0, "p95": 190.0, "count": 5}}}},
            {"used": 3, "wasted": 1} if n == 2 else None))
    return rows


def test_rows_table_markdown_and_plot(tmp_path):
    rows = _rows()
    r = rows[0]
    assert r["answered"] == 4 and r["conversations"] == 5 and r["named"] == 4
    assert r["median_ms"] == pytest.approx(1050.0) and r["errors"] == 1
    assert r["speech_end_s"] == pytest.approx((SR * 3 - 799) / SR, abs=1e-3)
    assert rows[1]["named"] is None
    table = sweep.format_table(rows)
    assert "4/5" in table and "3 used / 1 wasted" in table and "stt" in table
    assert "conversation timed out after 60s" in table and "jfk.wav 10.17 s of 11.00 s" in table
    md = sweep.markdown(rows).splitlines()
    assert md[0].startswith("| input | sessions | median | p95 | answered |")
    assert len(md) == 2 + 3 and "| 1.05 s |" in md[2] and "| - |" in md[3]
    json.dumps(rows)
    png = sweep.plot(rows, tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_readme_sweep_plan_and_command_line():
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    args = parser.parse_args(["--sweep", "readme", "--conversations", "5", "--markdown",
                              "--out", "s.json"])
    inputs, rows = sweep.plan(args)
    assert [i.name for i in inputs] == [f'"{sweep.FRANCE}"', "jfk.wav"]
    assert inputs[0].expect == "paris" and inputs[1].expect is None
    assert [(inputs[k].name[:5], n) for k, n in rows] == [
        ('"What', 1), ("jfk.w", 1), ('"What', 2), ('"What', 4), ('"What', 8)]
    args = parser.parse_args(["--from-file-end", "--say", "Hello there.", "--expect", "hi",
                              "--sessions", "1,2"])
    inputs, rows = sweep.plan(args)
    assert len(inputs) == 1 and inputs[0].expect == "hi" and rows == [(0, 1), (0, 2)]
    args.conversations = 0
    assert loadgen.main(args) == 2
    # inputs it cannot use: a clear error before any session, exit status 2
    args = parser.parse_args(["--from-file-end", "--wav", "/nonexistent.wav"])
    assert loadgen.main(args) == 2
    args = parser.parse_args(["--from-file-end", "--say", ""])  # espeak-ng says nothing
    assert loadgen.main(args) == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_from_file_end_against_a_real_stack(stack, tmp_path, capsys):
    """A reduced --from-file-end run (the France question, 1 session, 2 conversations) on
    the real stack: the measurement is sane.  Speed is not asserted."""
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    out = tmp_path / "sweep.json"
    args = parser.parse_args(["--url", stack.url, "--redis-url", stack.workers.redis_url,
                              "--from-file-end", "--say", sweep.FRANCE, "--expect", "paris",
                              "--sessions", "1", "--conversations", "2", "--no-warmup",
                              "--markdown", "--out", str(out)])
    assert loadgen.main(args) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "names Paris" in printed and "per stage" in printed
    (row,) = json.loads(out.read_text())["rows"]
    assert 0 < row["speech_end_s"] <= row["input_s"]
    assert row["answered"] == row["conversations"] == 2 and row["errors"] == 0
    assert row["named"] == 2, row["samples"]
    for s in row["samples"]:
        assert s["v2v_ms"] > 0 and s["v2v_end_s_ms"] > 0
        # a clean synthetic voice: the VAD's end and the known end agree within its margins
        assert abs(s["vad_end_s"] - row["speech_end_s"]) < 0.5, s
        assert "capital" in s["transcript"].lower() and "france" in s["transcript"].lower()
    stages = row["server"]["stages"]
    assert {"stt", "llm", "tts"} <= set(stages)  # the breakdown came from every worker
