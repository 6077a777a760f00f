"""A reduced chaos run (bench/chaos.py): the real stack, two workers per stage, one
session speaking real speech, four workers SIGKILLed mid-turn and started again.  The
issue's bar: ≥ 99% of the hit turns complete with their reply heard exactly once (with
four faults: all of them).  Latency is reported by `s2s chaos`, not asserted here."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from s2s.bench import chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_audio_faults_counts_duplicates_and_gaps():
    assert chaos.audio_faults([(0, 0, False), (0, 1, True), (1, 0, True)]) == (0, 0)
    assert chaos.audio_faults([(0, 0, True), (0, 0, True), (1, 0, True)]) == (1, 0)
    assert chaos.audio_faults([(0, 0, False), (1, 0, True)]) == (0, 1)
    assert chaos.audio_faults([(0, 0, True), (2, 0, True), (1, 0, True)]) == (0, 2)


def test_hits_and_summary():
    a = [chaos.Attempt(0, 0, started=10, ended=20, completed=True, v2v_ms=900),
         chaos.Attempt(0, 1, started=30, ended=40, completed=True, v2v_ms=1000),
         chaos.Attempt(0, 2, started=50, ended=60, completed=False)]
    faults = [{"kind": "stt", "at": 15}, {"kind": "llm", "at": 55}, {"kind": "tts", "at": 45}]
    chaos.mark_hits(a, faults)
    assert [x.hit_by for x in a] == [["stt"], [], ["llm"]]
    rows = chaos.summarize(a, faults)
    assert rows["stt"]["completed"] == 1 and rows["stt"]["added_p50_ms"] == -100
    assert rows["llm"]["no_reply"] == 1 and rows["tts"]["turns"] == 0
    assert rows["all hit"]["turns"] == 2 and rows["unhit"]["turns"] == 1
    assert "stt" in chaos.format_table(rows)
    assert chaos.whole("and so my fellow americans ask not", "And so my fellow Americans, ask not!")
    assert chaos.whole("fellow americans", chaos.JFK) is False
    assert chaos.whole("anything", None) is None


def test_reduced_chaos_run(tmp_path):
    parser = argparse.ArgumentParser()
    chaos.add_arguments(parser)
    # Short speech (jfk.wav and three spoken questions, not the lecture, whose pauses make
    # superseded turns) and no untouched turn after each fault: the unhit turns are the
    # latency baseline of `s2s chaos`, which CI does not assert; the hit turns are what the
    # bar is about, and a turn between faults still lands in the unhit row.
    args = parser.parse_args(["--kills", "4", "--sessions", "1", "--synth", "3",
                              "--wav", str(chaos.ROOT / "tests" / "data" / "jfk.wav"),
                              "--unhit", "0", "--duration", "420",
                              "--logdir", str(tmp_path / "logs"),
                              "--json-out", "", "--plot", ""])
    report = asyncio.run(chaos.run(args))
    rows, hit = report["rows"], report["rows"]["all hit"]
    print(f"\n{chaos.format_table(rows)}\nwall {report['wall_s']} s")
    assert report["kills"] == 4, report["faults"]
    assert hit["turns"] >= 1
    # every reply that came was heard exactly once, whole (the gateway's part: replay,
    # ordering, duplicates), hit or not
    for name, row in rows.items():
        assert row["heard_once"] == row["completed"], (name, row, report["logs"])
    assert rows["unhit"]["completed"] == rows["unhit"]["turns"], (rows, report["logs"])
    # the bar: with four faults, every hit turn is answered (liveness-based
    # claims, the VAD's replay of the utterance in progress, fenced session writes)
    assert hit["completed"] >= 0.99 * hit["turns"], (rows, report["logs"])
