"""Core runtime against a real redis-server: codec, bus, at-least-once delivery,
stale turns, Redis restarts."""

from __future__ import annotations

import asyncio
import signal
import time

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from s2s import config, keys
from s2s.bus import FIELD, Bus, routes
from s2s.frames import (SAMPLE_RATES, Audio, FrameError, Notice, ReplyAudio, ReplyText, SessionOpen,
                        Transcript, Utterance, decode, encode)
from s2s.redis_server import RedisServer, free_port

from .conftest import ROOT

ECHO = "tests.stages:EchoStage"
sids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
pcm = st.binary(max_size=400).map(lambda b: b[: len(b) // 2 * 2])


# --- codec ---------------------------------------------------------------------------
@given(sid=sids, turn=st.integers(0, 2**31), seq=st.integers(0, 10**6), pcm=pcm,
       sr=st.sampled_from(SAMPLE_RATES), text=st.text(max_size=200),
       marks=st.dictionaries(st.text(max_size=10), st.floats(allow_nan=False), max_size=4))
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


def test_readme_configuration_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert config.markdown_table() in readme, "run `s2s config --markdown` and update README.md"
