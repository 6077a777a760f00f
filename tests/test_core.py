"""Core runtime against a real redis-server: codec, bus, at-least-once delivery,
stale turns, Redis restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from s2s import cli, config, keys
from s2s.bus import FIELD, Bus, routes
from s2s.frames import (SAMPLE_RATES, Audio, FrameError, Notice, ReplyAudio, ReplyText, SessionEnd,
                        SessionOpen,
                        Transcript, Utterance, decode, encode)
from s2s.launcher.redis_server import RedisServer, free_port

from .conftest import ROOT

ECHO = "tests.stages:EchoStage"
CRASH = "tests.stages:CrashStage"
sids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
pcm = st.binary(max_size=400).map(lambda b: b[: len(b) // 2 * 2])


# --- codec ---------------------------------------------------------------------------
@given(sid=sids, turn=st.integers(0, 2**31), seq=st.integers(0, 10**6), pcm=pcm,
       sr=st.sampled_from(SAMPLE_RATES), text=st.text(max_size=200),
       marks=st.dictionaries(st.text(max_size=10), st.floats(-1e12, 1e12), max_size=4))  # finite
def test_codec_round_trips_every_kind(sid, turn, seq, pcm, sr, text, marks):
    frames = [
        SessionOpen(sid=sid, in_sr=sr, out_sr=sr),
        Audio(sid=sid, pcm=pcm, sr=sr, marks=marks),
        Utterance(sid=sid, turn=turn, pcm=pcm, sr=sr, start_s=0.5, end_s=1.5, marks=marks),
        Transcript(sid=sid, turn=turn, text=text, complete=False),
        ReplyText(sid=sid, turn=turn, seq=seq, text=text, final=True),
        ReplyAudio(sid=sid, turn=turn, seq=seq, chunk=3, pcm=pcm, sr=sr, last=True),
        Notice(sid=sid, event="error", message=text),
    ]
    for frame in frames:
        assert decode(encode(frame)) == frame


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_anything_but_frame_error(data):
    try:
        decode(data)
    except FrameError:
        pass


json_like = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text() |
                         st.binary(), lambda c: st.lists(c, max_size=4) |
                         st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


@given(st.dictionaries(st.sampled_from(["kind", "sid", "v", "turn", "seq", "pcm", "sr", "text",
                                        "marks", "chunk"]), json_like, max_size=8),
       st.sampled_from(["audio", "utt", "transcript", "reply", "reply_audio", "open"]))
def test_wrongly_typed_frames_are_rejected_cleanly(fields, kind):
    fields = {**fields, "kind": kind}
    try:
        frame = decode(msgspec.msgpack.encode(fields))
    except FrameError:
        return
    assert decode(encode(frame)) == frame  # whatever was accepted is a valid frame


@pytest.mark.parametrize("bad, why", [
    (Audio.__name__, "odd"), ("rate", "rate"), ("version", "version"), ("huge", "exceeds")])
def test_specific_bad_frames(bad, why):
    good = msgspec.msgpack.decode(encode(Audio(sid="s", pcm=b"\0\0", sr=16000)))
    if bad == "Audio":
        good["pcm"] = b"\0\0\0"
    elif bad == "rate":
        good["sr"] = 16001
    elif bad == "version":
        good["v"] = 99
    data = msgspec.msgpack.encode(good)
    with pytest.raises(FrameError, match=why if why != "odd" else "even"):
        decode(data, max_bytes=10 if bad == "huge" else 1 << 20)


def test_settings_from_env_and_flags():
    s = config.load({"port": 9000}, environ={"S2S_VAD_THRESHOLD": "0.7", "S2S_LOG_JSON": "yes",
                                             "S2S_PORT": "1"})
    assert (s.vad_threshold, s.log_json, s.port) == (0.7, True, 9000)
    with pytest.raises(SystemExit, match="S2S_PORT"):
        config.load(environ={"S2S_PORT": "eighty"})
    assert "S2S_LLM_BACKEND" in config.markdown_table()


# --- bus -----------------------------------------------------------------------------
async def test_routes_bounds_and_session_ttl(settings):
    bus = Bus(settings)
    try:
        t = Transcript(sid="abc", turn=1, text="hello")
        await bus.emit(t)
        assert routes(t) == ["s2s:llm", "s2s:out:{abc}"]
        entries = await bus.redis.xrange("s2s:llm")
        assert decode(entries[0][1][FIELD]) == t
        assert 0 < await bus.redis.ttl(keys.out("abc")) <= settings.session_ttl_s
        assert await bus.redis.ttl("s2s:llm") == -1  # shared streams are bounded by MAXLEN
        await bus.emit(*[Notice(sid="abc", event="x") for _ in range(3 * settings.session_maxlen)])
        assert await bus.redis.xlen(keys.out("abc")) < 2 * settings.session_maxlen
        await bus.close_session("abc")
        assert 0 < await bus.redis.ttl(keys.out("abc")) <= settings.closed_ttl_s
    finally:
        await bus.close()


async def test_live_audio_sets_its_streams_ttl_once_per_refresh_window(settings):
    """The gateway's 50 audio entries a second do not each send an EXPIRE: the first sets
    the TTL, later ones within a tenth of it don't; a session opened or ended again sets
    it at its next entry, and every other frame still sets it on each write."""
    bus = Bus(settings)
    stream = keys.audio("ttl1")
    pcm = b"\0\0" * 320
    try:
        await bus.emit(SessionOpen(sid="ttl1", in_sr=16000), Audio(sid="ttl1", pcm=pcm, sr=16000))
        assert 0 < await bus.redis.ttl(stream) <= settings.session_ttl_s
        await bus.redis.expire(stream, 50)  # had the next write refreshed it, this would go
        await bus.emit(*[Audio(sid="ttl1", pcm=pcm, sr=16000) for _ in range(5)])
        assert 0 < await bus.redis.ttl(stream) <= 50
        await bus.emit(SessionEnd(sid="ttl1"))  # not live audio: sets the TTL
        assert await bus.redis.ttl(stream) > 50
        await bus.redis.expire(stream, 50)
        await bus.emit(SessionOpen(sid="ttl1", in_sr=16000))  # reopened: the next entry sets it
        await bus.emit(Audio(sid="ttl1", pcm=pcm, sr=16000))
        assert await bus.redis.ttl(stream) > 50
    finally:
        await bus.close()


async def test_consumer_groups_are_created_idempotently(settings):
    bus = Bus(settings)
    try:
        for _ in range(3):
            await bus.ensure_group("s2s:stt", "stt")
        groups = await bus.redis.xinfo_groups("s2s:stt")
        assert [g["name"] for g in groups] == [b"stt"]
        await bus.redis.delete("s2s:stt")  # stream gone: the group is made again
        await bus.ensure_group("s2s:stt", "stt")
        assert len(await bus.redis.xinfo_groups("s2s:stt")) == 1
    finally:
        await bus.close()


# --- the runtime, with real worker processes ----------------------------------------------
def _send(url: str, *frames) -> list[bytes]:
    r = redis.Redis.from_url(url)
    return [r.xadd("s2s:echo", {FIELD: encode(f) if not isinstance(f, bytes) else f})
            for f in frames]


def _wait_out(url: str, sid: str, n: int = 1, timeout: float = 15) -> list:
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = [decode(f[FIELD]) for _, f in r.xrange(keys.out(sid))]
        if len(out) >= n:
            return out
        time.sleep(0.05)
    return [decode(f[FIELD]) for _, f in r.xrange(keys.out(sid))]


def _pending(url: str) -> dict:
    return redis.Redis.from_url(url).xpending("s2s:echo", "echo")


def test_worker_killed_before_ack_is_taken_over(workers, redis_url):
    slow = workers.start(ECHO, env={"S2S_TEST_DELAY_S": "30"})
    workers.wait_ready("echo")
    _send(redis_url, Transcript(sid="s1", turn=0, text="survive me"))
    deadline = time.monotonic() + 10
    while _pending(redis_url)["pending"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pending(redis_url)["pending"] == 1  # read, not acked
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    workers.start(ECHO)
    out = _wait_out(redis_url, "s1", timeout=30)
    assert [(f.event, f.message) for f in out] == [("echo", "survive me")]
    deadline = time.monotonic() + 5
    while _pending(redis_url)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pending(redis_url)["pending"] == 0  # acked by the second worker


def test_poison_entry_is_dead_lettered_after_max_deliveries(workers, redis_url):
    env = {"S2S_MAX_DELIVERIES": "2"}  # claim_idle_s is 1.0 (the fixture)
    proc = workers.start(CRASH, env=env)
    workers.wait_ready("echo")
    crash_id, _ = _send(redis_url, Transcript(sid="x", turn=0, text="crash"),
                        Transcript(sid="x", turn=0, text="fine"))
    r = redis.Redis.from_url(redis_url)
    restarts, deadline = 0, time.monotonic() + 25
    while time.monotonic() < deadline:
        if r.xlen(keys.DEAD) and any(f.message == "fine" for f in _wait_out(redis_url, "x", 0, 0)):
            break
        if proc.poll() is not None and restarts < 5:  # each worker taking "crash" dies
            proc, restarts = workers.start(CRASH, env=env), restarts + 1
        time.sleep(0.1)
    dead = r.xrange(keys.DEAD)
    assert len(dead) == 1, [workers.log(p) for p in workers.procs]
    fields = dead[0][1]
    assert decode(fields[FIELD]).text == "crash"
    assert (fields[b"stream"], fields[b"group"], fields[b"id"]) == (b"s2s:echo", b"echo", crash_id)
    assert int(fields[b"deliveries"]) > 2 and fields[b"reason"]
    assert restarts == 2  # delivered (and died) twice, dead-lettered at the third
    assert proc.poll() is None  # the last worker lives on
    deadline = time.monotonic() + 5
    while _pending(redis_url)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pending(redis_url)["pending"] == 0
    out = _wait_out(redis_url, "x", n=2)
    assert ("echo", "fine") in [(f.event, f.message) for f in out]
    errors = [f.message for f in out if f.event == "error"]
    assert len(errors) == 1 and "dropped after 2 attempts" in errors[0]
    assert crash_id.decode() in workers.log(proc) and "ERROR" in workers.log(proc)


def test_session_that_keeps_killing_its_owners_is_dead_lettered(workers, redis_url):
    env = {"S2S_MAX_DELIVERIES": "2"}
    stage = "tests.stages:CrashSessionStage"
    proc = workers.start(stage, env=env)
    workers.wait_ready("vad")
    r = redis.Redis.from_url(redis_url)
    r.xadd(keys.audio("v"), {FIELD: encode(Audio(sid="v", pcm=b"\xde\xad", sr=16000))})
    session_id = r.xadd(keys.SESSIONS, {FIELD: encode(SessionOpen(sid="v"))})
    restarts, deadline = 0, time.monotonic() + 25
    while not r.xlen(keys.DEAD) and time.monotonic() < deadline:
        if proc.poll() is not None and restarts < 5:
            proc, restarts = workers.start(stage, env=env), restarts + 1
        time.sleep(0.1)
    dead = r.xrange(keys.DEAD)
    assert len(dead) == 1, [workers.log(p) for p in workers.procs]
    fields = dead[0][1]
    assert (fields[b"stream"], fields[b"group"], fields[b"id"]) == (keys.SESSIONS.encode(),
                                                                    b"vad", session_id)
    assert decode(fields[FIELD]) == SessionOpen(sid="v") and int(fields[b"deliveries"]) == 3
    assert restarts == 2 and proc.poll() is None
    assert r.xpending(keys.SESSIONS, "vad")["pending"] == 0
    assert [f.event for f in _wait_out(redis_url, "v")] == ["error"]


def test_malformed_entries_are_rejected_and_the_worker_goes_on(workers, redis_url):
    proc = workers.start(ECHO)
    workers.wait_ready("echo")
    _send(redis_url, b"\xc1garbage", encode(Transcript(sid="ok", text="fine")))
    redis.Redis.from_url(redis_url).xadd("s2s:echo", {b"other": b"field"})
    _send(redis_url, Transcript(sid="ok", text="still fine"))
    out = _wait_out(redis_url, "ok", n=2)
    assert [f.message for f in out] == ["fine", "still fine"]
    assert proc.poll() is None
    time.sleep(0.3)
    assert _pending(redis_url)["pending"] == 0  # bad entries are acked, not retried forever
    assert "rejected malformed frame" in workers.log(proc)


def test_work_of_a_superseded_turn_is_cancelled(workers, redis_url):
    workers.start(ECHO, env={"S2S_TEST_DELAY_S": "3"})
    workers.wait_ready("echo")
    r = redis.Redis.from_url(redis_url)
    r.set(keys.turn("t"), 1)
    _send(redis_url, Transcript(sid="t", turn=0, text="already stale"),
          Transcript(sid="t", turn=1, text="current"))
    time.sleep(0.5)
    r.incr(keys.turn("t"))  # barge-in while "current" is being processed
    t0 = time.monotonic()
    while _pending(redis_url)["pending"] and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert time.monotonic() - t0 < 1.0  # cancelled and acked, not left to finish its 3 s
    time.sleep(3)
    assert _wait_out(redis_url, "t", timeout=0.1) == []


def test_worker_survives_redis_restart(workers, tmp_path):
    port = free_port()
    server = RedisServer(port).start()
    try:
        workers.redis_url = server.url
        proc = workers.start(ECHO)
        workers.wait_ready("echo")
        server.stop()
        time.sleep(2)  # the worker sees Redis gone and retries with backoff
        server = RedisServer(port).start()  # empty again: groups must be recreated
        deadline = time.monotonic() + 20
        out = []
        while not out and time.monotonic() < deadline:
            _send(server.url, Transcript(sid="r", text="after restart"))
            out = _wait_out(server.url, "r", timeout=2)
        assert out and out[0].message == "after restart"
        assert proc.poll() is None
    finally:
        server.stop()


def _wait_pending(url: str, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _pending(url)["pending"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _pending(url)["pending"] >= n


def test_sigterm_lets_in_flight_work_finish_and_ack(workers, redis_url):
    proc = workers.start(ECHO, env={"S2S_TEST_DELAY_S": "1.0"})
    workers.wait_ready("echo")
    _send(redis_url, Transcript(sid="g", text="finish me"))
    _wait_pending(redis_url, 1)  # read, in flight
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, workers.log(proc)
    assert [f.message for f in _wait_out(redis_url, "g", timeout=0.1)] == ["finish me"]
    assert _pending(redis_url)["pending"] == 0  # acked before exiting
    assert "finishing in-flight work" in workers.log(proc)


def test_sigterm_past_the_grace_period_leaves_the_entry_pending(workers, redis_url):
    proc = workers.start(ECHO, env={"S2S_TEST_DELAY_S": "30", "S2S_SHUTDOWN_GRACE_S": "0.5"})
    workers.wait_ready("echo")
    _send(redis_url, Transcript(sid="p", text="too slow"))
    _wait_pending(redis_url, 1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, workers.log(proc)
    assert time.monotonic() - t0 < 5
    assert _pending(redis_url)["pending"] == 1  # not acked: another worker will claim it
    assert _wait_out(redis_url, "p", timeout=0.1) == []


def test_live_long_work_is_kept_alive_and_never_claimed(workers, redis_url):
    a = workers.start(ECHO, env={"S2S_TEST_DELAY_S": "5"})  # > claim_idle_s * 3
    workers.wait_ready("echo")
    b = workers.start(ECHO)
    _send(redis_url, Transcript(sid="k", text="long"))
    _wait_pending(redis_url, 1)  # only A is reading yet
    workers.wait_ready("echo", count=2)
    r = redis.Redis.from_url(redis_url)
    owners, deliveries = set(), set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = r.xpending_range("s2s:echo", "echo", min="-", max="+", count=10)
        if not rows:
            break
        owners |= {row["consumer"] for row in rows}
        deliveries |= {row["times_delivered"] for row in rows}
        time.sleep(0.1)
    assert len(owners) == 1 and deliveries == {1}  # never moved to B, never re-delivered
    time.sleep(1.5)  # B had every chance to claim and re-run it
    assert [f.message for f in _wait_out(redis_url, "k", timeout=0.1)] == ["long"]
    assert "claimed" not in workers.log(b)
    assert a.poll() is None and b.poll() is None


def test_concurrency_limit_bounds_items_in_flight(workers, redis_url):
    workers.start(ECHO, env={"S2S_TEST_DELAY_S": "1", "S2S_CONCURRENCY": "2"})
    workers.wait_ready("echo")
    t0 = time.monotonic()
    _send(redis_url, *[Transcript(sid="c", text=str(i)) for i in range(4)])
    most = 0
    while time.monotonic() - t0 < 15:
        most = max(most, _pending(redis_url)["pending"])
        if len(_wait_out(redis_url, "c", n=4, timeout=0)) == 4:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert sorted(f.message for f in _wait_out(redis_url, "c", n=4)) == ["0", "1", "2", "3"]
    assert most == 2  # two at once, never more
    assert elapsed >= 1.9  # so two rounds of 1 s, not one round of four
    # and the gauge of the work in flight falls back to 0 once the worker is idle
    metrics_url = _metrics_url(redis_url, "echo") + "/metrics"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = _get(metrics_url)[1].decode()
        if 's2s_stage_in_flight{stage="echo"} 0.0' in text:
            break
        time.sleep(0.1)
    assert 's2s_stage_in_flight{stage="echo"} 0.0' in text


def _metrics_url(url: str, stage: str, timeout: float = 5) -> str:
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for member in r.zrange(keys.WORKERS, 0, -1):
            name, _, metrics_url = member.decode().split("|", 2)
            if name == stage:
                return metrics_url
        time.sleep(0.05)
    raise AssertionError(f"no {stage} worker in {keys.WORKERS}")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_worker_serves_healthz_and_metrics(workers, redis_url):
    workers.start(ECHO)
    workers.wait_ready("echo")
    base = _metrics_url(redis_url, "echo")
    status, body = _get(base + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["stage"] == "echo" and health["model_loaded"] and health["redis"]
    _send(redis_url, Transcript(sid="m", text="count me"))
    assert _wait_out(redis_url, "m")

    def items_ok(text: str) -> float | None:  # label order in the text is not fixed
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "s2s_stage_items_total" and \
                        sample.labels == {"stage": "echo", "outcome": "ok"}:
                    return sample.value
        return None

    deadline = time.monotonic() + 5
    while True:  # counted just after the output is written
        status, body = _get(base + "/metrics")
        value = items_ok(body.decode())
        if value or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200 and value == 1.0, body.decode()[-2000:]
    assert _get(base + "/nope")[0] == 404


def _s2s(*args: str, env: dict | None = None) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("S2S_")}
    return subprocess.Popen([sys.executable, "-m", "s2s", *args], cwd=ROOT, env={**clean, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_worker_without_redis_url_exits_with_a_clear_message():
    proc = _s2s("worker", ECHO)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert b"S2S_REDIS_URL is not set" in err, err.decode()[-2000:]


def test_help_of_every_command():
    procs = {"": _s2s("--help")} | {cmd: _s2s(cmd, "--help") for cmd in cli.COMMANDS}
    for cmd, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (cmd, err.decode()[-2000:])
        assert b"usage: s2s" in out, cmd


# --- bus: claiming and keep-alive ---------------------------------------------------------
async def test_claim_scan_moves_past_live_and_trimmed_entries(settings):
    bus = Bus(settings)
    try:
        await bus.ensure_group("s2s:cl", "g")
        ids = [await bus.redis.xadd("s2s:cl", {FIELD: b"x"}) for _ in range(15)]
        await bus.read_group("s2s:cl", "g", "live", 14, 0)  # live worker's, fresh
        await bus.read_group("s2s:cl", "g", "dead", 1, 0)   # the last one: a dead worker's
        await bus.redis.xclaim("s2s:cl", "g", "dead", 0, [ids[-1]], idle=60_000, justid=True)
        await bus.redis.xclaim("s2s:cl", "g", "live", 0, [ids[0]], idle=60_000, justid=True)
        await bus.redis.xdel("s2s:cl", ids[0])  # trimmed away while pending (MAXLEN)
        cursor, got = b"0-0", []
        for _ in range(5):
            cursor, entries = await bus.claim_idle("s2s:cl", "g", "me", 10_000, count=1,
                                                   start_id=cursor)
            got += [eid for eid, _ in entries]
            if ids[-1] in got:
                break
        assert got == [ids[-1]]  # reached, although 14 others come first
    finally:
        await bus.close()


async def test_keep_alive_never_steals_back_a_claimed_entry(settings):
    bus = Bus(settings)
    try:
        await bus.ensure_group("s2s:ka", "g")
        a, b = [await bus.redis.xadd("s2s:ka", {FIELD: b"x"}) for _ in range(2)]
        await bus.read_group("s2s:ka", "g", "A", 2, 0)
        await bus.redis.xclaim("s2s:ka", "g", "B", 0, [b], justid=True)  # B took it over
        await asyncio.sleep(0.05)
        assert await bus.keep_alive("s2s:ka", "g", "A", [a, b]) == [b]
        rows = {r["message_id"]: r for r in
                await bus.redis.xpending_range("s2s:ka", "g", min="-", max="+", count=10)}
        assert rows[a]["consumer"] == b"A" and rows[a]["time_since_delivered"] < 50
        assert rows[b]["consumer"] == b"B"  # still B's
    finally:
        await bus.close()


async def test_delivery_counts_and_their_reset(settings):
    bus = Bus(settings)
    try:
        await bus.ensure_group("s2s:dl", "g")
        a, b = [await bus.redis.xadd("s2s:dl", {FIELD: b"x"}) for _ in range(2)]
        await bus.read_group("s2s:dl", "g", "A", 2, 0)
        await bus.ack("s2s:dl", "g", b)
        await asyncio.sleep(0.02)
        await bus.claim_idle("s2s:dl", "g", "B", 1)  # a takeover counts as a delivery
        await bus.keep_alive("s2s:dl", "g", "B", [a])  # the keep-alive does not
        assert await bus.deliveries("s2s:dl", "g", [a, b]) == {a: 2}  # b is acked
        await bus.keep_alive("s2s:dl", "g", "B", [a], reset_deliveries=True)
        assert await bus.deliveries("s2s:dl", "g", [a]) == {a: 1}
        await bus.dead_letter("s2s:dl", "g", a, b"x", 2, "test")
        assert await bus.deliveries("s2s:dl", "g", [a]) == {}
        (_, fields), = await bus.redis.xrange(keys.DEAD)
        assert fields == {FIELD: b"x", b"stream": b"s2s:dl", b"group": b"g", b"id": a,
                          b"deliveries": b"2", b"reason": b"test"}
    finally:
        await bus.close()


def test_docs_configuration_table_is_current():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in page, \
        "run `s2s config --markdown` and update docs/configuration.md"
