"""The Redis capacity bench (bench/redis_capacity.py, docs/scaling.md): its load sends the
control plane's command mix as the real stack does, from a fleet whose Redis connections
do not grow with its sessions.  Numbers of speed are not checked here: they belong to the
bench's table."""

from __future__ import annotations

import json
import subprocess
import sys

from s2s.bench import redis_mix
from s2s.bench.redis_mix import Fleet, Model

from tests.conftest import ROOT


def test_the_model_of_one_session_matches_the_real_stacks_profile():
    """Per command, the model's one session (one process of each kind) sends what the real
    stack's profile counted: within 10 % for every command sent at least once a second,
    within 0.3 a second for the rarer ones; only a session's opening handshakes are left
    out, and in all the model is within 10 % of the profile."""
    one = redis_mix.per_session_beyond_idle(Model())
    for cmd, profiled, modelled, ratio, setup in redis_mix.compare(one):
        if setup:
            assert modelled == 0, cmd
        elif profiled >= 1.0:
            assert 0.9 <= ratio <= 1.1, (cmd, profiled, modelled)
        else:
            assert abs(modelled - profiled) <= 0.3, (cmd, profiled, modelled)
    assert abs(sum(one.values()) / sum(redis_mix.PROFILE.values()) - 1) <= 0.1


def test_shared_reads_and_connections_do_not_grow_per_session():
    """At scale the multiplexed reads and per-process work are shared: the model's XREADs
    and keep-alive scripts per session fall, its per-session writes do not."""
    m = Model()
    small = {k: v / 20 for k, v in redis_mix.rates(m, Fleet(20)).items()}
    large = {k: v / 2000 for k, v in redis_mix.rates(m, Fleet(2000)).items()}
    assert large["xread"] < small["xread"] / 2
    assert large["xclaim"] < small["xclaim"]
    assert abs(large["xadd"] - small["xadd"]) < 0.01
    assert abs(large["eval"] - small["eval"]) < 0.01


def expected_connections(fleet: Fleet, gw_conns: int = 8) -> int:
    """The load's Redis clients: per gateway its pool and one output reader, per VAD
    worker a command connection and one audio reader, per stage worker a command
    connection, a group reader and a subscription; plus the latency probe."""
    return (fleet.gateways * (gw_conns + 1) + fleet.vads * 2 + 3 * fleet.stage_workers * 3
            + 1)


def test_the_c_load_sends_the_modelled_mix_on_shared_connections():
    """A short run of the C load against the bundled Valkey: no command fails, every
    frame is sent on time, Redis counts per command what the model predicts for that
    fleet (within 20 %; 10 % in all), ACK_DEL deleted every entry it acknowledged, every
    turn change reached every subscribed stage worker, the sessions share a fixed set
    of connections (the probe's included), not one or two each, and one audio read
    brings the frames of all of a VAD worker's sessions."""
    sessions, per_vad, per_stage = 60, 25, 30
    out = subprocess.run([sys.executable, "-m", "s2s.bench.redis_capacity",
                          "--sessions", str(sessions), "--duration", "3", "--per-vad",
                          str(per_vad), "--per-stage", str(per_stage), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    row = result["rows"][0]
    assert row["sessions"] == sessions and row["errors"] == 0, row
    assert row["frames_per_s"] >= 0.9 * row["frames_target"], row
    fleet = Fleet(sessions, per_gateway=500, per_vad=per_vad, per_stage=per_stage)
    assert row["clients"] == expected_connections(fleet) < sessions, row
    # the reads' count depends on timing (when output is written, how late a busy machine
    # wakes the reader): they are checked by what each read carries, below
    predicted = {c: r for c, r in redis_mix.rates(Model(), fleet).items() if c != "xread"}
    sent = row["calls_per_s"]
    for cmd, rate in predicted.items():
        if rate / sessions >= 1.0:  # at least once a session-second: enough calls to count
            assert abs(sent.get(cmd, 0) / rate - 1) <= 0.2, (cmd, rate, sent.get(cmd))
    total = sum(v for c, v in sent.items() if c in predicted)
    assert abs(total / sum(predicted.values()) - 1) <= 0.1, (total, predicted)
    assert sent["xdel"] == sent["xack"] > 0, sent
    assert sent["publish"] > 0 and sent["xreadgroup"] > 0 and sent["mget"] > 0, sent
    load = row["load"][0]
    assert load["stage_items"] > 0 and 0 < load["out_reads"] <= load["out_entries"], load
    assert load["audio_entries"] >= per_vad * load["audio_reads"] > 0, load
    # each PUBLISH reaches each of the 3 stage kinds' workers (the run's whole length)
    assert load["pubsub_messages"] >= 3 * fleet.stage_workers * load["turns"] * 0.9, load
