"""Staying up, against a real redis-server: acknowledged entries free their memory,
Redis errors other than "down" (OOM, READONLY, BUSY, LOADING, NOGROUP) are waited
out, dead workers are found from their missed leases and their work is taken at once,
the keep-alive never leaves an entry with two owners, and a VAD takeover mid-utterance
keeps the utterance whole."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import numpy as np
import pytest
import redis
from redis.exceptions import BusyLoadingError, ResponseError

from s2s import config, keys
from s2s.bus import FIELD, Bus, redis_error_kind
from s2s.frames import (Audio, ReplyAudio, ReplyText, SessionOpen, Transcript, Utterance, decode,
                        encode)
from s2s.launcher.redis_server import RedisServer, free_port

from .conftest import DATA, JFK_TEXT, load_pcm16

ECHO = "tests.stages:EchoStage"
NO_IDLE_CLAIM = {"S2S_CLAIM_IDLE_S": "120"}  # only a lease takeover can claim in time


def metric(client: redis.Redis, stage: str, name: str, **labels) -> float:
    """A counter summed over the live workers of ``stage``, read from their /metrics."""
    total = 0.0
    for member in client.zrangebyscore(keys.WORKERS, time.time() - 5, "+inf"):
        kind, _, url = member.decode().split("|", 2)
        if kind == stage:
            total += metric_at(url, name, **labels)
    return total


def metric_at(url: str, name: str, **labels) -> float:
    """A counter of one worker (its /metrics at ``url``), summed over matching labels."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and want in line)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"not within {timeout}s: {what}")


def out_frames(client: redis.Redis, sid: str) -> list:
    return [decode(f[FIELD]) for _, f in client.xrange(keys.out(sid))]


def owner_pid(client: redis.Redis, stream: str, group: str) -> int | None:
    """The pid of the worker an entry is pending on (consumer names are host-pid-rand)."""
    rows = client.xpending_range(stream, group, "-", "+", 1)
    return int(rows[0]["consumer"].decode().split("-")[-2]) if rows else None


# --- classification --------------------------------------------------------------------
async def test_redis_error_kinds_from_a_real_server(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url)
    replica = RedisServer().start()
    try:
        with pytest.raises(ResponseError) as e:
            await client.xreadgroup("nogroup", "c", {"s2s:none": ">"})
        assert redis_error_kind(e.value) == "nogroup"
        with pytest.raises(ResponseError) as e:
            await client.execute_command("NOSUCHCOMMAND")
        assert redis_error_kind(e.value) == "other"
        await client.config_set("maxmemory", 1)
        try:
            with pytest.raises(ResponseError) as e:
                await client.xadd("s2s:x", {FIELD: b"x"})
            assert redis_error_kind(e.value) == "oom"
        finally:
            await client.config_set("maxmemory", 0)
        replica_client = redis.asyncio.Redis.from_url(replica.url)
        await replica_client.replicaof("127.0.0.1", redis_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(ResponseError) as e:
            await replica_client.set("k", "v")
        assert redis_error_kind(e.value) == "readonly"
        await replica_client.aclose()
        await client.config_set("busy-reply-threshold", 50)
        busy = asyncio.create_task(redis.asyncio.Redis.from_url(redis_url).eval(
            "local t = tonumber(redis.call('TIME')[1]) "
            "while tonumber(redis.call('TIME')[1]) < t + 2 do end return 1", 0))
        await asyncio.sleep(0.3)
        with pytest.raises(ResponseError) as e:
            await client.get("k")
        assert redis_error_kind(e.value) == "busy"
        await busy
        with pytest.raises(redis.exceptions.ConnectionError) as e:
            await redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1).ping()
        assert redis_error_kind(e.value) == "down"
        # LOADING is raised by redis-py as BusyLoadingError, a ConnectionError subclass
        assert redis_error_kind(BusyLoadingError("Redis is loading the dataset")) == "loading"
        assert redis_error_kind(ValueError("x")) == "none"
    finally:
        await client.config_set("busy-reply-threshold", 5000)
        await client.aclose()
        replica.stop()


def test_redis_error_kind_reads_only_the_errors_own_words():
    wrapped = "Command # 2 (XADD s2s:out:{{a}} * f {}) of pipeline caused error: ({!r},)"
    assert redis_error_kind(ResponseError(wrapped.format("x", "BUSY Redis is busy"))) == "busy"
    # a payload that happens to say BUSY or OOM does not make a WRONGTYPE passing trouble
    assert redis_error_kind(ResponseError(
        wrapped.format("I am BUSY OOM", "WRONGTYPE Operation against a key"))) == "other"
    assert redis_error_kind(ResponseError("UNBLOCKED force unblock from blocking operation, "
                                          "instance state changed (master -> replica?)")) \
        == "readonly"


# --- bounded by bytes: an acknowledged entry is deleted ---------------------------------
async def test_ack_deletes_the_payload_and_only_what_it_acked(settings):
    bus = Bus(settings)
    try:
        await bus.ensure_group("s2s:stt", "stt")
        ids = [await bus.redis.xadd("s2s:stt", {FIELD: b"x" * 1000}) for _ in range(3)]
        await bus.read_group("s2s:stt", "stt", "A", 3, 0)
        assert await bus.ack("s2s:stt", "stt", ids[0], ids[1]) == 2
        assert [eid for eid, _ in await bus.redis.xrange("s2s:stt")] == [ids[2]]
        assert await bus.ack("s2s:stt", "stt", ids[0]) == 0  # twice: nothing more happens
        assert (await bus.redis.xpending("s2s:stt", "stt"))["pending"] == 1
    finally:
        await bus.close()


def test_worker_leaves_no_payload_behind(workers, redis_url):
    workers.start(ECHO)
    workers.wait_ready("echo")
    r = redis.Redis.from_url(redis_url)
    for i in range(20):
        r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="b", turn=0, text=f"n{i}"))})
    wait_for(lambda: len(out_frames(r, "b")) == 20, 20, "20 echoes")
    wait_for(lambda: r.xlen("s2s:echo") == 0, 5, "the stage stream emptied by the acks")
    assert r.xpending("s2s:echo", "echo")["pending"] == 0


def test_entries_another_group_reads_are_kept(workers, redis_url):
    """An operator's second group on a stage stream (a tap) still gets every entry."""
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create("s2s:echo", "tap", id="0", mkstream=True)
    workers.start(ECHO)
    workers.wait_ready("echo")
    r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="t", turn=0, text="tapped"))})
    wait_for(lambda: out_frames(r, "t"), 10, "the echo")
    wait_for(lambda: r.xpending("s2s:echo", "echo")["pending"] == 0, 5, "acked")
    assert r.xlen("s2s:echo") == 1
    (_, entries), = r.xreadgroup("tap", "me", {"s2s:echo": ">"})
    assert decode(entries[0][1][FIELD]).text == "tapped"


# --- OOM and other passing trouble ----------------------------------------------------
def test_output_refused_for_oom_is_not_acked_and_goes_out_once_memory_is_back(workers,
                                                                              redis_url):
    proc = workers.start(ECHO)
    workers.wait_ready("echo")
    r = redis.Redis.from_url(redis_url)
    r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="m", turn=0, text="warm"))})
    wait_for(lambda: out_frames(r, "m"), 10, "a first echo")
    r.config_set("maxmemory", 1)  # noeviction (the default): every XADD is refused now
    try:
        r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="m", turn=0, text="under oom"))})
    except redis.exceptions.OutOfMemoryError:
        r.config_set("maxmemory", 0)
        r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="m", turn=0, text="under oom"))})
        r.config_set("maxmemory", 1)
    try:
        wait_for(lambda: metric(r, "echo", "s2s_redis_faults_total", reason="oom") >= 3, 15,
                 "OOM seen and retried")
        assert r.xpending("s2s:echo", "echo")["pending"] == 1  # read, not acknowledged
        assert len(out_frames(r, "m")) == 1 and proc.poll() is None
        # the heartbeat still runs (a few bytes, allowed when out of memory)
        time.sleep(1.5)
        assert r.zrangebyscore(keys.WORKERS, time.time() - 1, "+inf")
    finally:
        r.config_set("maxmemory", 0)
    wait_for(lambda: len(out_frames(r, "m")) == 2, 10, "the echo once memory is back")
    wait_for(lambda: r.xpending("s2s:echo", "echo")["pending"] == 0, 5, "acked")
    time.sleep(0.5)
    assert [f.message for f in out_frames(r, "m")] == ["warm", "under oom"]  # once
    assert r.xlen("s2s:echo") == 0
    log = workers.log(proc)
    assert log.count("Redis oom (") == 1, log  # once per burst, not once per retry
    wait_for(lambda: "oom trouble over" in workers.log(proc), 5, "the end of the trouble logged")


def xadd_despite_oom(r: redis.Redis, stream: str, frame) -> None:
    """What a client of a full Redis cannot do: write (a script flagged allow-oom)."""
    r.eval("#!lua flags=allow-oom\nreturn redis.call('XADD', KEYS[1], '*', 'f', ARGV[1])", 1,
           stream, encode(frame))


def test_session_owner_waits_out_oom_and_loses_no_output(workers, redis_url):
    proc = workers.start("tests.stages:CrashSessionStage")
    workers.wait_ready("vad")
    r = redis.Redis.from_url(redis_url)
    r.xadd(keys.SESSIONS, {FIELD: encode(SessionOpen(sid="o"))})
    r.xadd(keys.audio("o"), {FIELD: encode(Audio(sid="o", pcm=b"\0" * 2, sr=16000))})
    wait_for(lambda: out_frames(r, "o"), 10, "the first notice")
    r.config_set("maxmemory", 1)
    try:
        for n in (4, 6):
            xadd_despite_oom(r, keys.audio("o"), Audio(sid="o", pcm=b"\0" * n, sr=16000))
        wait_for(lambda: metric(r, "vad", "s2s_redis_faults_total", reason="oom") >= 3, 15,
                 "OOM seen and retried")
        assert len(out_frames(r, "o")) == 1 and proc.poll() is None
    finally:
        r.config_set("maxmemory", 0)
    wait_for(lambda: len(out_frames(r, "o")) == 3, 10, "the notices once memory is back")
    time.sleep(0.5)
    assert [f.message for f in out_frames(r, "o")] == ["2", "4", "6"]  # each once, in order
    assert r.xpending(keys.SESSIONS, "vad")["pending"] == 1  # still owned


def test_busy_script_and_lost_group_do_not_crash_a_worker(workers, redis_url):
    proc = workers.start(ECHO)
    workers.wait_ready("echo")
    r = redis.Redis.from_url(redis_url)
    r.config_set("busy-reply-threshold", 50)
    try:
        r.eval("local t = tonumber(redis.call('TIME')[1]) "
               "while tonumber(redis.call('TIME')[1]) < t + 2 do end return 1", 0)
    finally:
        r.config_set("busy-reply-threshold", 5000)
    r.delete("s2s:echo")  # the stream and its group are gone (as after a restart)
    r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="g", turn=0, text="after"))})
    wait_for(lambda: out_frames(r, "g"), 15, "an echo after BUSY and NOGROUP")
    assert proc.poll() is None
    assert metric(r, "echo", "s2s_redis_faults_total", reason="busy") >= 1
    assert metric(r, "echo", "s2s_redis_faults_total", reason="nogroup") >= 1


def test_worker_rides_out_its_redis_turned_replica_and_back(workers, tmp_path):
    """A failover seen from a worker: its Redis becomes a read-only replica (of an empty
    master: the data and the group are gone), then a primary again."""
    with RedisServer() as mine, RedisServer() as other:
        w = type(workers)(mine.url, tmp_path)
        try:
            proc = w.start(ECHO)
            w.wait_ready("echo")
            r = redis.Redis.from_url(mine.url)
            r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="f", turn=0, text="before"))})
            wait_for(lambda: out_frames(r, "f"), 10, "an echo before")
            url = w.log(proc).split("metrics=", 1)[1].split()[0]
            r.replicaof("127.0.0.1", other.port)
            wait_for(lambda: r.info("replication").get("master_link_status") == "up", 15,
                     "the replica in sync (with the empty master: flushed)")
            wait_for(lambda: metric_at(url, "s2s_redis_faults_total", reason="readonly") >= 1,
                     15, "READONLY seen")
            assert proc.poll() is None and not r.exists("s2s:echo")
            r.replicaof("NO", "ONE")
            r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="f", turn=0, text="after"))})
            wait_for(lambda: out_frames(r, "f"), 15, "an echo after")
            assert [f.message for f in out_frames(r, "f")] == ["after"]
            assert proc.poll() is None
        finally:
            w.stop_all()


# --- liveness leases ---------------------------------------------------------------------
def test_dead_worker_is_found_by_its_lease_and_its_entry_taken_at_once(workers, redis_url):
    env = {**NO_IDLE_CLAIM, "S2S_TEST_DELAY_S": "3"}
    procs = [workers.start(ECHO, env=env), workers.start(ECHO, env=env)]
    workers.wait_ready("echo", count=2)
    r = redis.Redis.from_url(redis_url)
    r.xadd("s2s:echo", {FIELD: encode(Transcript(sid="l", turn=0, text="lease"))})
    pid = wait_for(lambda: owner_pid(r, "s2s:echo", "echo"), 10, "the entry taken")
    victim = next(p for p in procs if p.pid == pid)
    consumer = r.xpending_range("s2s:echo", "echo", "-", "+", 1)[0]["consumer"]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # claim_idle_s is 120: only the lease (1 s) can hand the entry over within 15 s
    wait_for(lambda: owner_pid(r, "s2s:echo", "echo") not in (pid,), 15, "the lease takeover")
    wait_for(lambda: out_frames(r, "l"), 15, "the echo from the survivor")
    wait_for(lambda: consumer not in [c["name"] for c in r.xinfo_consumers("s2s:echo", "echo")],
             5, "the dead consumer deleted")
    assert not [m for m in r.zrange(keys.WORKERS, 0, -1) if consumer in m]
    assert [f.message for f in out_frames(r, "l")] == ["lease"]
    assert metric(r, "echo", "s2s_stage_leases_expired_total") == 1


async def test_a_live_worker_is_never_robbed_by_a_lease_takeover(settings):
    """A member whose lease ran out but whose entries are kept fresh (it stalled, then
    came back) keeps them: the claim needs them idle for the lease too."""
    bus = Bus(settings)
    try:
        await bus.ensure_group("s2s:lv", "g")
        ids = [await bus.redis.xadd("s2s:lv", {FIELD: b"x"}) for _ in range(3)]
        await bus.read_group("s2s:lv", "g", "stalled", 3, 0)
        await bus.redis.zadd(keys.WORKERS, {"lv|stalled|http://x": time.time() - 5})
        assert [w for _, w, _ in await bus.expired_workers("lv", 1.0)] == ["stalled"]
        await bus.keep_alive("s2s:lv", "g", "stalled", ids[:2])  # two are fresh
        await bus.redis.xclaim("s2s:lv", "g", "stalled", 0, [ids[2]], idle=5000, justid=True)
        idle, total = await bus.pending_of("s2s:lv", "g", "stalled", 1000, 10)
        assert idle == [ids[2]] and total == 3
        got = await bus.claim("s2s:lv", "g", "me", ids, 1000)
        assert [eid for eid, _ in got] == [ids[2]]
        assert not await bus.drop_consumer("s2s:lv", "g", "stalled", "lv|stalled|http://x", 0)
        assert await bus.redis.zscore(keys.WORKERS, "lv|stalled|http://x")  # still there
    finally:
        await bus.close()


# --- no double ownership ---------------------------------------------------------------------
async def test_keep_alive_raced_against_xautoclaim_never_leaves_two_owners(settings):
    a, b = Bus(settings), Bus(settings)
    try:
        await a.ensure_group("s2s:race", "g")
        both = 0
        for _ in range(300):
            ids = [await a.redis.xadd("s2s:race", {FIELD: b"x"}) for _ in range(8)]
            await a.read_group("s2s:race", "g", "A", 8, 0)
            # all of A's entries look stale (A stalled): B's XAUTOCLAIM may take them
            await a.redis.xclaim("s2s:race", "g", "A", 0, ids, idle=10_000, justid=True)
            lost, (_, claimed) = await asyncio.gather(
                a.keep_alive("s2s:race", "g", "A", ids),
                b.claim_idle("s2s:race", "g", "B", 5_000, count=8))
            a_owns = set(ids) - set(lost)
            b_owns = {eid for eid, _ in claimed}
            both += len(a_owns & b_owns)
            rows = await a.redis.xpending_range("s2s:race", "g", "-", "+", 20)
            owner = {r["message_id"]: r["consumer"] for r in rows}
            assert all(owner[e] == b"A" for e in a_owns) and all(owner[e] == b"B" for e in b_owns)
            await a.ack("s2s:race", "g", *ids)
        assert both == 0
    finally:
        await a.close()
        await b.close()


# --- a whole VAD takeover mid-utterance ---------------------------------------------------
@pytest.mark.slow
async def test_vad_killed_mid_utterance_the_utterance_comes_out_whole(workers, settings):
    from s2s.services.stt.worker import SttStage
    from tests.test_stt import wer

    client = redis.Redis.from_url(settings.redis_url)
    procs = [workers.start("vad", env=NO_IDLE_CLAIM), workers.start("vad", env=NO_IDLE_CLAIM)]
    workers.wait_ready("vad", count=2)
    stt = SttStage(config.load({}, environ={}))
    stt_ready = asyncio.create_task(asyncio.to_thread(stt.setup))
    bus = Bus(settings)
    pcm = load_pcm16(DATA / "jfk.wav")
    pcm = np.concatenate([pcm, np.zeros(16000 * 2, np.int16)])  # silence after the speech
    try:
        await bus.emit(SessionOpen(sid="w"))
        step, t0 = 320, time.monotonic()
        killed = False
        for i in range(0, len(pcm), 5 * step):
            await bus.emit(*[Audio(sid="w", pcm=pcm[j:j + step].tobytes(), sr=16000,
                                   marks={"recv": time.time()})
                             for j in range(i, min(i + 5 * step, len(pcm)), step)])
            if not killed and i >= int(6.5 * 16000):  # mid "ask not what your country"
                pid = owner_pid(client, keys.SESSIONS, "vad")
                os.kill(pid, signal.SIGKILL)
                next(p for p in procs if p.pid == pid).wait()
                killed = True
            await asyncio.sleep(max(0.0, t0 + (i + 5 * step) / 16000 - time.monotonic()))
        utts = await asyncio.to_thread(wait_for, lambda: [
            u for _, f in client.xrange(keys.STAGE_STREAMS["stt"])
            if isinstance(u := decode(f[FIELD]), Utterance) and u.end_s > 10.5], 20,
            "the utterance that ends the speech")
        await stt_ready
        every = [decode(f[FIELD]) for _, f in client.xrange(keys.STAGE_STREAMS["stt"])]
        last = every[-1]
        assert last is utts[-1] or last == utts[-1]
        text = " ".join([t.text async for t in stt.process(last)])
        assert wer(JFK_TEXT, text) <= 0.15, text
        assert last.start_s < 0.6, (last.start_s, last.end_s)  # from the thought's start
        # no piece of audio went into two utterances of one turn: each turn has one
        turns = [u.turn for u in every]
        assert len(turns) == len(set(turns)) and turns == sorted(turns), turns
    finally:
        stt_ready.cancel()
        await bus.close()
        client.close()


# --- a worker of each model stage killed mid-turn (issue item 9) -------------------------
def _jfk_utterance(sid: str) -> Utterance:
    return Utterance(sid=sid, turn=0, pcm=load_pcm16(DATA / "jfk.wav").tobytes(), sr=16000,
                     start_s=0.3, end_s=11.0, out_sr=16000, marks={"speech_end": time.time()})


STAGE_INPUTS = {
    "stt": lambda sid: _jfk_utterance(sid),
    "llm": lambda sid: Transcript(sid=sid, turn=0, text="What is the capital of France?",
                                  complete=True, out_sr=16000,
                                  marks={"speech_end": time.time()}),
    "tts": lambda sid: ReplyText(sid=sid, turn=0, seq=0, final=True, out_sr=16000,
                                 text="The capital of France is Paris, a city on the Seine."),
}


def _complete(stage: str, frames: list) -> bool:
    """Is the output of the one input all there (by its keys; copies allowed)?"""
    if stage == "stt":
        return any(isinstance(f, Transcript) for f in frames)
    if stage == "llm":
        replies = [f for f in frames if isinstance(f, ReplyText)]
        return any(r.final for r in replies)
    audio = [f for f in frames if isinstance(f, ReplyAudio)]
    return any(a.last for a in audio)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stt", "llm", "tts"])
def test_model_worker_killed_mid_turn_the_turn_completes_once(stage, workers, redis_url):
    from tests.test_stt import wer

    procs = [workers.start(stage, env=NO_IDLE_CLAIM), workers.start(stage, env=NO_IDLE_CLAIM)]
    workers.wait_ready(stage, count=2, timeout=240)
    r = redis.Redis.from_url(redis_url)
    stream, sid = keys.STAGE_STREAMS[stage], f"kill-{stage}"
    r.xadd(stream, {FIELD: encode(STAGE_INPUTS[stage](sid))})
    # the worker that took it: XPENDING's consumer -> its pid (consumer names are
    # host-pid-rand); killed at once, so mid-processing (every model takes longer)
    pid = wait_for(lambda: owner_pid(r, stream, stage), 30, "the input taken")
    os.kill(pid, signal.SIGKILL)
    victim = next(p for p in procs if p.pid == pid)
    victim.wait()
    wait_for(lambda: _complete(stage, out_frames(r, sid)), 120, f"the {stage} output")
    wait_for(lambda: r.xpending(stream, stage)["pending"] == 0, 30, "acknowledged")
    time.sleep(0.5)
    frames = out_frames(r, sid)
    survivor = next(p for p in procs if p is not victim)
    assert survivor.poll() is None
    assert r.xlen(stream) == 0  # acknowledged and deleted
    if stage == "stt":
        said = [f for f in frames if isinstance(f, Transcript)]
        assert {t.turn for t in said} == {0} and len({t.text for t in said}) == 1, said
        assert wer(JFK_TEXT, said[0].text) <= 0.15, said[0].text
    elif stage == "llm":
        replies = [f for f in frames if isinstance(f, ReplyText)]
        by_seq = {}
        for reply in replies:  # a copy (the dead worker's, re-sent) must be the same
            assert by_seq.setdefault(reply.seq, reply.text) == reply.text, replies
        assert sorted(by_seq) == list(range(len(by_seq))), replies  # no gap
        assert [x.seq for x in replies if x.final] == [max(by_seq)] * len(
            [x for x in replies if x.final])
        assert "paris" in " ".join(by_seq.values()).lower(), by_seq
    else:
        audio = [f for f in frames if isinstance(f, ReplyAudio)]
        chunks: dict[tuple, int] = {}
        for a in audio:  # distinct (turn, seq, chunk) keys, each with one content
            assert chunks.setdefault((a.turn, a.seq, a.chunk), len(a.pcm)) == len(a.pcm)
        got = sorted(chunks)
        assert got == [(0, 0, i) for i in range(len(got))], got  # complete, no gap
        assert [a.chunk for a in audio if a.last] and max(a.chunk for a in audio if a.last) \
            == got[-1][2]
        seconds = sum(chunks.values()) / 2 / 16000
        assert 1.5 < seconds < 10, seconds  # the sentence, once (not twice end to end)
