"""Hosts made of Linux network namespaces, for multi-host tests on one machine.

``Network()`` makes a Linux bridge in the root namespace with an address from the
benchmarking range (198.18.0.0/15, RFC 2544: never routed on the internet) and
``add_host(name, last_octet)`` a namespace joined to it by a veth pair.  A host has
loopback and its one bridge address, and no default route: its processes can reach
only the addresses this network made (and its own loopback).  ``host.cut()`` takes
the bridge end of its veth down, like a pulled cable: packets are dropped silently,
TCP connections are not reset and hang until the link comes back (``restore()``).

Needs root, iproute2 and netns support: ``unavailable()`` says why not.  Names
carry the creating process's pid, so a crashed earlier run never blocks a new one,
and ``remove_stale()`` deletes what runs whose process is gone left behind.
Processes started with ``host.popen`` die with their parent (PDEATHSIG) and are
stopped, by their own id, in ``Network.close()``.

The second half puts s2s on such hosts (``Cluster``: Redis, gateway, two worker
hosts with every stage) and gives what tests/test_multihost.py and
bench/chaos_hosts.py look at: who holds which entry (``pending``), who heartbeats
(``registry``), the reply audio of a session's output stream (``out_audio``) and a
client session under the caller's control (``Speaker``).  See docs/multihost.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import asyncio
import socket
import sys

import numpy as np

from s2s import keys
from s2s.client import Connection, Tracker
from s2s.frames import FrameError, ReplyAudio, decode
from s2s.launcher.proc import die_with_parent
from s2s.launcher.redis_server import find_redis_server

ROOT = Path(__file__).resolve().parents[1]
NS_PREFIX = "s2snet-"                     # namespaces: s2snet-<pid>-<host>
NS_RE = re.compile(r"^s2snet-(\d+)-\w+$")
LINK_RE = re.compile(r"^s2s(?:br|v)(\d+)[a-z]?$")  # bridge s2sbr<pid>, veths s2sv<pid><letter>


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "no Linux network namespaces on this system"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CI runs as root)"
    if not shutil.which("ip"):
        return "no `ip` command (Debian package iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    res = ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip() or res.returncode}"
    ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    """Stop the processes still running in a namespace (left by a crashed run)."""
    res = ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete namespaces, bridges and veths of earlier runs whose process is gone."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_RE.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_ns_pids(name)
            ip("netns", "del", name, check=False)
            removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        m = LINK_RE.match(name)
        if m and not _alive(int(m.group(1))):
            ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """198.18.0.0/24, or the next /24 of 198.18.0.0/15 no interface here uses yet
    (another run at the same time has its own bridge and subnet)."""
    used = set()
    for line in ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", line)
        if m:
            used.add(ipaddress.ip_network(m.group(1) + "/24", strict=False))
    for net in ipaddress.ip_network("198.18.0.0/15").subnets(new_prefix=24):
        if net not in used:
            return net
    raise RuntimeError("every /24 of 198.18.0.0/15 is in use")


class Host:
    def __init__(self, network: "Network", name: str, octet: int, letter: str):
        self.network = network
        self.name = name
        self.ns = f"{NS_PREFIX}{network.pid}-{name}"
        self.veth = f"s2sv{network.pid}{letter}"   # the bridge end, in the root namespace
        self.ip = str(network.subnet.network_address + octet)
        self.procs: list[subprocess.Popen] = []

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True,
                              text=True, check=check, timeout=20)

    def popen(self, args: list[str], env: dict, log: Path, cwd: str | Path | None = None
              ) -> subprocess.Popen:
        """Start a process inside this host (``ip netns exec`` execs it: the Popen's pid
        is the process's own).  Its output goes to ``log``."""
        out = open(log, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], env=env, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        out.close()
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        """Pull the cable: the bridge end of the host's veth goes down."""
        ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        ip("link", "set", self.veth, "up")

    def stop(self, timeout: float = 10) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Network:
    """A bridge and the hosts on it; ``close()`` (or ``with``) removes everything."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.bridge = f"s2sbr{self.pid}"
        self.hosts: dict[str, Host] = {}
        self.subnet = _free_subnet()
        self.gateway_ip = str(self.subnet.network_address + 1)
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway_ip}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str, octet: int) -> Host:
        host = Host(self, name, octet, "abcdefghijklmnopqrstuvwxyz"[len(self.hosts)])
        self.hosts[name] = host
        ip("netns", "add", host.ns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        return host

    def routes(self, host: Host) -> list[str]:
        return [r for r in host.run("ip", "-4", "route", "show", "table", "all").stdout
                .splitlines() if r.strip()]

    def close(self) -> None:
        # the last made first: clients stop before the servers they use
        for host in reversed(list(self.hosts.values())):
            host.stop()
        for host in self.hosts.values():
            _kill_ns_pids(host.ns)
            ip("link", "del", host.veth, check=False)  # its peer goes with it
            ip("netns", "del", host.ns, check=False)
        ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- an s2s deployment on such hosts -------------------------------------------------------------
SR = 16000
REDIS_PORT, GATEWAY_PORT = 6379, 8000
STAGES = ("vad", "stt", "llm", "tts")
API_KEY = "multihost-test-key"   # the gateway's S2S_API_KEYS / the client's S2S_API_KEY


def _logs(paths, tail: int = 2500) -> str:
    return "\n".join(f"--- {Path(p).name}\n{Path(p).read_text(errors='replace')[-tail:]}"
                     for p in paths if Path(p).exists())


class Cluster:
    """A Redis host (.10), a gateway host (.20) and worker hosts A (.31) and B (.32),
    each worker host running one worker of every stage; every component binds only
    its host's address.  ``start()`` starts them all (models load in the background:
    ``wait_ready``)."""

    def __init__(self, net: Network, tmp: Path):
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
            [find_redis_server(), "--bind", self.redis_host.ip, "--port", str(REDIS_PORT),
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
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready (dead: {dead}, live: {live})\n{c.logs()}")
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
    """Poll the coroutine function ``pred`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while not (result := await pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}\n{c.logs()}")
        await asyncio.sleep(poll)
    return result
