"""``s2s up``: the whole stack on one machine.

Starts a private Redis (unless S2S_REDIS_URL is set), the gateway and one worker
per stage as child processes, shows progress while models load, prints
``ready: http://…`` once every stage has a live worker, restarts a worker that
dies, and on Ctrl-C/SIGTERM stops everything, leaving no process behind.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from s2s import config
from s2s.bus import Bus
from s2s.redis_version import server_problem
from s2s.cli import STAGES, load_stage
from .proc import die_with_parent
from .redis_server import RedisServer

MAX_RESTARTS = 5  # per child and minute; beyond that the stack is considered broken


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default=os.environ.get("S2S_WORKERS", ""),
                        metavar="STAGE=N,…",
                        help="workers per stage, e.g. `stt=2,tts=2` (default one each) "
                             "[env S2S_WORKERS]")
    parser.add_argument("--stages", default=os.environ.get("S2S_STAGES", ",".join(STAGES)),
                        help="stages to run (default all that are installed); an entry may also "
                             "be module:Class for a custom Stage subclass [env S2S_STAGES]")
    parser.add_argument("--no-gateway", action="store_true",
                        help="run only the stage workers (e.g. when a gateway runs elsewhere)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for every stage to load before giving up")
    config.add_flags(parser, ["core", "gateway", "vad", "stt", "llm", "tts"])


@dataclass
class Child:
    name: str
    argv: list[str]
    stage: str = ""  # the Stage's name (what its workers heartbeat as); "" for the gateway
    proc: asyncio.subprocess.Process | None = None
    restarts: list[float] = field(default_factory=list)
    relay: asyncio.Task | None = None


def redacted(url: str) -> str:
    """A Redis URL fit for a log: redis://user:***@host (ACL passwords stay secret)."""
    return config.redacted_url(url)


class Stack:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = config.from_args(args)
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.env = dict(os.environ)
        # flags given on the command line reach the children as S2S_* variables
        for name in config.FIELDS:
            value = getattr(args, name, None)
            if value is not None:
                self.env[config.env_name(name)] = str(value)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        # one-command experience with auth on: a random key for this run unless one is
        # configured; the printed URL carries it in the fragment (never sent to the server)
        self.key = ""
        s = self.settings
        if s.auth and not (s.api_keys or s.api_keys_file or s.token_secret):
            from s2s.gateway.auth import new_api_key

            self.key = new_api_key()
            self.env["S2S_API_KEYS"] = f"up:{self.key}"
            self.settings.api_keys = self.env["S2S_API_KEYS"]

    def say(self, msg: str) -> None:
        print(f"[s2s] {msg}", flush=True)

    def plan(self) -> list[Child]:
        counts = {s.strip(): 1 for s in self.args.stages.split(",") if s.strip()}
        for item in filter(None, (p.strip() for p in self.args.workers.split(","))):
            stage, _, n = item.rpartition("=")
            if (stage not in STAGES and ":" not in stage) or not n.isdigit():
                raise SystemExit(f"--workers: expected STAGE=N with STAGE in {sorted(STAGES)}, "
                                 f"got {item!r}")
            counts[stage] = int(n)
        children = []
        for stage, n in counts.items():
            if stage not in STAGES and ":" not in stage:
                raise SystemExit(f"--stages: unknown stage {stage!r}; known: {sorted(STAGES)} "
                                 f"or module:Class")
            module = STAGES.get(stage, stage).split(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:  # a missing parent package of a dotted custom module
                found = False
            if not found:
                if stage not in STAGES:
                    raise SystemExit(f"--stages: cannot find module {module!r} of {stage!r}")
                self.say(f"stage {stage} is not installed here ({module}); skipping it")
                continue
            # A custom stage heartbeats under its class's `name`, not under its spec, so
            # readiness needs that name (importing the class here is the price of a spec).
            name = stage if stage in STAGES else load_stage(stage).name
            for i in range(n):
                children.append(Child(f"{name}-{i + 1}" if n > 1 else name,
                                      [sys.executable, "-m", "s2s", "worker", stage,
                                       "--metrics-port", "0"], stage=name))
        if not self.args.no_gateway:
            children.append(Child("gateway", [sys.executable, "-m", "s2s", "gateway",
                                              "--host", self.settings.host,
                                              "--port", str(self.settings.port)]))
        return children

    async def start_child(self, child: Child) -> None:
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent)
        child.relay = asyncio.create_task(self.relay(child, child.proc))

    async def relay(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """Prefix each child's log lines with its name."""
        assert proc.stdout
        async for line in proc.stdout:
            sys.stdout.write(f"{child.name:>8} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            if not self.settings.redis_url:
                try:
                    self.redis = RedisServer(binary=self.settings.redis_server).start()
                except RuntimeError as e:  # no binary, or it would not start: say so plainly
                    self.say(f"cannot start a private Redis: {e}")
                    return 1
                self.env["S2S_REDIS_URL"] = self.settings.redis_url = self.redis.url
                self.say(f"started a private Redis at {self.redis.url}")
            else:
                self.say(f"using Redis at {redacted(self.settings.redis_url)}")
            problem = await self.redis_problem()
            if problem:
                self.say(f"cannot use this Redis: {problem}")
                return 1
            self.children = self.plan()
            if not self.children:
                self.say("nothing to run")
                return 1
            for child in self.children:
                await self.start_child(child)
            self.say("starting " + ", ".join(c.name for c in self.children) +
                     " (models load in the background)…")
            if not await self.wait_ready():
                # asked to stop while loading (Ctrl-C/SIGTERM) is a clean stop, not a failure
                return 0 if self.stopping.is_set() else 1
            return await self.supervise()
        finally:
            await self.shutdown()

    async def redis_problem(self) -> str | None:
        """Why the stack cannot run on its Redis (unreachable, or older than 7), checked
        once here so that a user reads one line instead of every worker's retry loop."""
        client = aioredis.from_url(self.settings.redis(), socket_connect_timeout=5)
        try:
            return server_problem(await client.info("server"))
        except RedisError as e:
            return f"{type(e).__name__}: {e}"
        finally:
            await client.aclose()

    def _on_signal(self, sig: int) -> None:
        if self.stopping.is_set():  # a second Ctrl-C: do not wait for the grace period
            self.say(f"second {signal.Signals(sig).name}: killing every child now")
            for child in self.children:
                if child.proc and child.proc.returncode is None:
                    child.proc.kill()
        self.stopping.set()

    def wanted_stages(self) -> set[str]:
        return {c.stage for c in self.children if c.stage}

    async def wait_ready(self) -> bool:
        bus = Bus(self.settings)
        started = time.monotonic()
        last_msg = ""
        s = self.settings
        scheme = "https" if s.ssl_certfile else "http"
        url = f"{scheme}://{s.host}:{s.port}"
        health = f"http://{s.admin_host}:{s.admin_port}" if s.admin_port else url
        try:
            # the local health check trusts the gateway's own (possibly self-signed) cert
            async with httpx.AsyncClient(timeout=1.0, verify=False) as http:
                while not self.stopping.is_set():
                    for child in self.children:
                        if child.proc and child.proc.returncode is not None:
                            if child.relay:  # its last lines (the reason) first
                                await asyncio.wait({child.relay}, timeout=2)
                            self.say(f"{child.name} exited with code {child.proc.returncode} "
                                     f"while starting; stopping (see its log above)")
                            return False
                    try:
                        live = await bus.live_workers()
                    except Exception:
                        live = {}
                    waiting = sorted(s for s in self.wanted_stages() if not live.get(s))
                    if not self.args.no_gateway:
                        try:
                            ok = (await http.get(health + "/healthz")).status_code == 200
                        except httpx.HTTPError:
                            ok = False
                        if not ok:
                            waiting.append("gateway")
                    elapsed = time.monotonic() - started
                    if not waiting:
                        self.say(f"all stages live after {elapsed:.1f}s")
                        self._print_ready(url)
                        return True
                    msg = "loading: " + ", ".join(waiting)
                    if msg != last_msg or int(elapsed) % 10 == 0 and elapsed - int(elapsed) < 0.5:
                        self.say(f"{msg} ({elapsed:.0f}s)")
                        last_msg = msg
                    if elapsed > self.args.ready_timeout:
                        self.say(f"gave up: {', '.join(waiting)} not ready after {elapsed:.0f}s")
                        return False
                    try:
                        await asyncio.wait_for(self.stopping.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await bus.close()
        return False

    def _print_ready(self, url: str) -> None:
        if self.args.no_gateway:
            print(f"ready: {redacted(self.settings.redis_url)}", flush=True)
            return
        ws = url.replace("http", "ws", 1) + "/ws"
        if self.key:  # like Jupyter: this URL logs the browser in (the page drops the key)
            print(f"ready: {url}/#key={self.key}", flush=True)
            print(f"dashboard: {url}/dashboard#key={self.key}", flush=True)  # same login
            self.say(f"open {url}/#key={self.key} in a browser and press Start, or run "
                     f"`s2s talk FILE --url '{url}/#key={self.key}'`; Ctrl-C stops everything")
            return
        print(f"ready: {url}", flush=True)
        print(f"dashboard: {url}/dashboard", flush=True)  # live latency (docs/dashboard.md)
        how = ("" if not self.settings.auth else
               " (log in with a configured key: append #key=KEY to the URL, and give "
               "`s2s talk` --api-key KEY or S2S_API_KEY)")
        self.say(f"open {url} in a browser and press Start, or run "
                 f"`s2s talk FILE --url {ws}`{how}; Ctrl-C stops everything")

    async def supervise(self) -> int:
        """Restart a child that dies (a worker's in-flight entries are claimed by the
        others meanwhile); give up if one keeps dying."""
        while not self.stopping.is_set():
            for child in self.children:
                if child.proc and child.proc.returncode is not None and not self.stopping.is_set():
                    now = time.monotonic()
                    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                    if len(child.restarts) > MAX_RESTARTS:
                        self.say(f"{child.name} keeps dying; stopping the stack")
                        return 1
                    self.say(f"{child.name} exited with code {child.proc.returncode}; restarting")
                    await self.start_child(child)
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        return 0

    async def shutdown(self) -> None:
        running = [c for c in self.children if c.proc and c.proc.returncode is None]
        if running:
            self.say("stopping " + ", ".join(c.name for c in running) + "…")
        for child in running:
            child.proc.send_signal(signal.SIGTERM)
        # one deadline for all (before, each child got the whole grace period in turn)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 5
        for child in running:
            try:
                await asyncio.wait_for(child.proc.wait(),
                                       max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.say(f"{child.name} did not stop in time; killing it")
                child.proc.kill()
                await child.proc.wait()
        # let the relays print the children's last lines (e.g. why one failed at start)
        relays = [c.relay for c in self.children if c.relay and not c.relay.done()]
        if relays:
            await asyncio.wait(relays, timeout=2)
        if self.redis:
            self.redis.stop()
        self.say("stopped")


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(Stack(args).run())
    except KeyboardInterrupt:
        return 130
