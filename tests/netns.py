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

from s2s.launcher.proc import die_with_parent

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
