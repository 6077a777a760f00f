"""A whole stack on this machine for the benches (fuzz, soak): Redis, one worker per
stage and the gateway, each its own process as `s2s up` runs them, on free loopback
ports; any stage may be a custom ``module:Class`` (the tests run scripted ones)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from s2s import keys

ROOT = Path(__file__).resolve().parents[1]


def with_private_key(env: dict[str, str]) -> dict[str, str]:
    """The gateway lets nobody in without a key: unless ``env`` names keys (or turns auth
    off), a private one for this run, which this process's clients present too
    (``s2s.client`` reads S2S_API_KEY)."""
    import os
    import secrets

    auth_off = env.get("S2S_AUTH", "on").lower() in ("0", "false", "no", "off")
    if not env.get("S2S_API_KEYS") and not auth_off:
        key = os.environ.setdefault("S2S_API_KEY", secrets.token_urlsafe(24))
        env.update(S2S_API_KEYS=f"bench:{key}", S2S_API_KEY=key)
    return env


class Stack:
    """Redis, one worker per stage and the gateway, as separate processes (as `s2s up`
    runs them), on free loopback ports; ``stages`` maps a stage to a built-in name or a
    ``module:Class``.  ``procs`` (name -> Popen) is what crash checks and soak sample."""

    def __init__(self, stages: dict[str, str], gateway: bool = True,
                 env: dict[str, str] | None = None, logdir: Path | None = None):
        import os
        import tempfile

        from s2s.launcher.redis_server import RedisServer, free_port

        self.redis = RedisServer()
        self.stages = stages
        self.gateway = gateway
        self.port = free_port()
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix="s2s-stack-"))
        self.env = {**os.environ, "S2S_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        with_private_key(self.env)
        self.procs: dict[str, Any] = {}

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws" if self.gateway else ""

    def _spawn(self, name: str, args: list[str]) -> None:
        import subprocess

        log = open(self.logdir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "s2s", *args], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            cwd=ROOT)

    def start(self, timeout: float = 300) -> "Stack":
        import socket

        import redis as syncredis

        self.redis.start()
        self.env["S2S_REDIS_URL"] = self.redis.url
        for stage, spec in self.stages.items():
            self._spawn(stage, ["worker", spec])
        if self.gateway:
            self._spawn("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(self.port)])
        client = syncredis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.dead():
                self.stop()
                raise RuntimeError(f"stack process died at start: {self.dead()}; logs in "
                                   f"{self.logdir}")
            members = client.zrangebyscore(keys.WORKERS, time.time() - 3, "+inf")
            ready = {m.decode().split("|", 1)[0] for m in members}
            listening = not self.gateway
            if self.gateway:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    listening = True
                except OSError:
                    pass
            if listening and all(_stage_name(s, spec) in ready
                                 for s, spec in self.stages.items()):
                client.close()
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"stack not ready in {timeout:.0f} s; logs in {self.logdir}")

    def dead(self) -> list[str]:
        return [f"{name} exited with {p.returncode}" for name, p in self.procs.items()
                if p.poll() is not None]

    def stop(self) -> None:
        from s2s.launcher.proc import stop_processes

        stop_processes(self.procs.values(), grace_s=20)
        self.redis.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stage_name(stage: str, spec: str) -> str:
    """The name a worker heartbeats under: the built-in's, or the custom class's own."""
    if ":" not in spec:
        return spec
    from s2s.cli import load_stage

    return load_stage(spec).name


def parse_stages(items: list[str]) -> dict[str, str]:
    stages = {s: s for s in ("vad", "stt", "llm", "tts")}
    for item in items:
        name, _, spec = item.partition("=")
        stages[name] = spec or name
    return stages
