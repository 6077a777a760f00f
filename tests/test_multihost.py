"""Several hosts for real: network namespaces that the test makes (tests/netns.py).

A Redis host (198.18.x.10), a gateway host (.20) and two worker hosts A (.31) and B
(.32), each worker host running a worker of every stage with its real model, all on
one bridge (.1, the root namespace, where the client runs).  No host has a default
route: every component uses only the addresses made here (and loopback).

Mid-turn, the link of the worker host that owns a VAD session and holds work of
another stage is cut (its veth goes down: packets vanish, TCP hangs, like a pulled
cable).  The other host takes over its entries and its sessions, and the turns are
answered.  When the link comes back, the cut-off workers notice they lost what they
held and rejoin; no reply audio reaches the client twice (the client's audio of each
turn is exactly the (seq, chunk) pieces of its output stream, each once).  Then the
*other* host is cut, and the rejoined host serves a new session on every stage.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import numpy as np
import pytest

from s2s import keys
from s2s.client import talk
from s2s.frames import decode

from tests import netns
from tests.conftest import DATA, load_pcm16
from tests.netns import (API_KEY, SR, STAGES, Cluster, Speaker, out_audio, pending, registry,
                         stage_items_ok, until, wait_ready)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    netns.remove_stale()
    tmp = tmp_path_factory.mktemp("multihost")
    net = netns.Network()
    old_key = os.environ.get("S2S_API_KEY")
    os.environ["S2S_API_KEY"] = API_KEY  # the client in this process (gateway auth)
    try:
        c = Cluster(net, tmp)
        c.start()
        yield c
    finally:
        net.close()
        if old_key is None:
            os.environ.pop("S2S_API_KEY", None)
        else:
            os.environ["S2S_API_KEY"] = old_key


@pytest.fixture(scope="module")
def speech():
    """The JFK sentence and a short question spoken by the bundled Piper voice."""
    from s2s.bench.eval_set import piper_speech

    question = piper_speech([QUESTION], SR)[0]
    return {"jfk": load_pcm16(DATA / "jfk.wav")[int(5.2 * SR):], "question": question}


def _check_not_stolen_back(c: Cluster, survivor: str, sessions: list[bytes]) -> None:
    """The host that took the sessions over must keep them.  It loses one when a command
    the cut-off host sent just as its link went down (kept in its kernel's send queue,
    delivered when the link comes back, long after the client gave up on it) claims the
    session back: the keep-alive's XCLAIM with min-idle 0, sent after an XPENDING that
    still said "mine" (two round trips in s2s/bus_streams.py ``keep_alive``).  The session
    then returns to the old owner, which resumes from its stale position."""
    log = c.log_of(survivor, "vad")
    stolen = [e.decode() for e in sessions if f"entry {e.decode()} was taken over" in log]
    if not stolen:
        return
    raise AssertionError(f"host {survivor} lost the session(s) {stolen} it took over back to "
                         "the cut-off host: a keep-alive XCLAIM delayed by the cut claimed "
                         "them back\n" + c.logs())


# --- the test ---------------------------------------------------------------------------------
async def test_cut_worker_host_mid_turn(cluster: Cluster, speech):
    import redis.asyncio as aioredis

    c = cluster
    r = aioredis.from_url(c.redis_url)
    try:
        await _scenario(c, r, speech)
    finally:
        for host in c.workers.values():
            host.restore()
        await r.aclose()


async def _scenario(c: Cluster, r, speech) -> None:
    # every host reaches only this network's addresses: no default route anywhere
    for host in c.net.hosts.values():
        assert not [x for x in c.net.routes(host) if x.startswith("default")], host.name
    await wait_ready(r, c)

    # --- 1. two sessions; cut the host that owns a session and holds other work ---------
    speakers = [Speaker(c.ws_url, speech["jfk"]), Speaker(c.ws_url, speech["question"])]
    runs = [asyncio.create_task(speakers[0].run(120))]
    await asyncio.sleep(1.0)  # the question starts while the JFK sentence goes on
    runs.append(asyncio.create_task(speakers[1].run(120)))

    async def victim():
        held = await pending(r, c)
        for name, stages in held.items():
            if stages.get("vad") and (stages.get("llm") or stages.get("tts")):
                return name, held[name]
        if all(s.answered() for s in speakers):
            raise AssertionError("both turns were answered before any worker host held "
                                 f"a session and a reply in flight: {held}")
        return None

    name, held = await until(victim, 90, "a host holding a session and a reply", c)
    host = c.workers[name]
    survivor = next(n for n in c.workers if n != name)
    host.cut()
    cut_at = time.time()
    sids = {}
    for eid in held["vad"]:
        entries = await r.xrange(keys.SESSIONS, eid, eid)
        if entries:
            sids[eid] = decode(entries[0][1][b"f"]).sid
    owned = list(sids.values())
    print(f"\ncut host {name} ({host.ip}) holding {held}; its sessions {owned}")

    # --- 2. the turns complete while the link is down --------------------------------------
    async def answered():
        return all(s.answered() for s in speakers)
    await until(answered, 120, "both turns answered with host " + name + " cut off", c, 0.2)
    answered_at = time.time()

    async def moved():  # nothing stays pending for the cut-off host
        held_now = (await pending(r, c))[name]
        return not any(held_now.values())
    await until(moved, 15, f"host {name}'s entries taken over", c, 0.2)
    survivor_vad = c.log_of(survivor, "vad")
    for sid in owned:
        assert re.search(rf"owning session .*sid={sid}", survivor_vad), survivor_vad[-3000:]

    # --- 3. the link comes back: the cut-off workers notice and rejoin ----------------------
    host.restore()
    restored_at = time.time()

    def noticed() -> bool:  # the old VAD owner logged the loss of every session it had
        log = c.log_of(name, "vad")
        return all(f"entry {e.decode()} was taken over by another worker" in log
                   for e in held["vad"])

    async def rejoined():
        live = (await registry(r, c, restored_at)).get(name, {})
        return len(live) == len(STAGES) and noticed()
    try:
        await until(rejoined, 60, f"host {name} rejoining and noticing it lost its session",
                    c, 0.2)
    finally:
        _check_not_stolen_back(c, survivor, held["vad"])
    print(f"turns answered {answered_at - cut_at:.1f}s after the cut; link down "
          f"{restored_at - cut_at:.1f}s; host {name} rejoined {time.time() - restored_at:.1f}s "
          "after the link came back")
    for stage in STAGES:  # what the cut-off workers saw (for the reader of -s output)
        seen = [x for x in c.log_of(name, stage).splitlines() if " WARNING " in x]
        print(f"  {name}-{stage}: " + "\n    ".join(seen[-6:]))
    await asyncio.sleep(2)  # late outputs of the cut-off workers, if any, arrive meanwhile
    for s in speakers:
        s.stop.set()
    await asyncio.gather(*runs)

    # --- 4. every turn answered, no piece of reply audio twice -------------------------------
    for s in speakers:
        turns = s.tracker.turns
        late = [t for t in s.tracker.events if t["t"] + s.tracker.t0 > restored_at
                and t["type"] in ("speech_started", "interrupt")]
        assert not late, (s.sid, late)  # the old VAD owner re-heard nothing
        expected, dupes = await out_audio(r, s.sid)
        done = [t for t in turns.values() if t.done and t.audio]
        assert done, [t.to_dict() for t in turns.values()]
        for t in done:
            assert t.audio == expected.get(t.turn), \
                (s.sid, t.turn, len(t.audio), len(expected.get(t.turn, b"")))
            level = np.abs(np.frombuffer(t.audio, np.int16)).mean()
            assert len(t.audio) / 2 / t.sample_rate > 0.5 and level > 100, t.to_dict()
        print(f"session {s.sid}: {[t.to_dict() for t in done]}; pieces written twice: {dupes}")
    # the old owner said it lost its sessions, and nothing of the cut host is pending
    assert noticed(), c.log_of(name, "vad")[-3000:]
    assert not any((await pending(r, c))[name].values())

    # --- 5. the rejoined host serves new work: now the other one is cut ----------------------
    own = (await registry(r, c, time.time() - 3))[name]
    before = {s: await stage_items_ok([own[s]], host.ip) for s in STAGES}
    c.workers[survivor].cut()
    try:
        result = await talk(c.ws_url, speech["question"], SR, reply_timeout_s=90,
                            tail_silence_s=1.0)
    finally:
        c.workers[survivor].restore()
    assert not result.timed_out and result.reply and result.audio, \
        f"{result.to_dict()}\n{c.logs()}"
    after = {s: await stage_items_ok([own[s]], host.ip) for s in STAGES}
    assert all(after[s] > before[s] for s in STAGES), (before, after)
    print(f"host {name} after rejoining answered {result.transcript!r} -> {result.reply!r}")
