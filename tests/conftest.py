"""Shared fixtures: a real redis-server started by the tests, settings pointing at
it, worker processes, and the real speech in tests/data."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import websockets

from s2s import config
from s2s.audio import read_audio as load_pcm16  # noqa: F401 (the tests import it from here)
from s2s.launcher.redis_server import RedisServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The whole test run is one authenticated principal, transparently: every gateway a test
# starts (in-process from these settings, or as a process inheriting os.environ) accepts
# TEST_API_KEY, and every client (s2s.client, `s2s talk`, `s2s bench`) sends it from
# S2S_API_KEY.  Tests of authentication itself pass their own credentials.
TEST_API_KEY = secrets.token_urlsafe(24)
TEST_TOKEN_SECRET = secrets.token_urlsafe(24)
os.environ["S2S_API_KEYS"] = f"tests:{TEST_API_KEY}"
os.environ["S2S_API_KEY"] = TEST_API_KEY
os.environ["S2S_TOKEN_SECRET"] = TEST_TOKEN_SECRET
os.environ.pop("S2S_AUTH", None)
os.environ.pop("S2S_API_KEYS_FILE", None)
AUTH_SETTINGS = {"api_keys": f"tests:{TEST_API_KEY}", "token_secret": TEST_TOKEN_SECRET}

_ws_connect = websockets.connect


def _authenticated_connect(uri, *args, **kwargs):
    """websockets.connect for tests: raw connections (tests of the protocol) carry the
    test key unless the test sets its own headers or subprotocols (tests of auth do:
    ``additional_headers={}`` means "no credential")."""
    if "additional_headers" not in kwargs and "subprotocols" not in kwargs:
        kwargs["additional_headers"] = {"Authorization": f"Bearer {TEST_API_KEY}"}
    return _ws_connect(uri, *args, **kwargs)


websockets.connect = _authenticated_connect

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")


@pytest.fixture(scope="session")
def redis_server():
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """A clean database on the shared test server."""
    client = redis.Redis.from_url(redis_server.url)
    client.execute_command("FLUSHALL", "SYNC")  # Valkey 8 would free the old keys lazily
    client.close()
    return redis_server.url


@pytest.fixture
def settings(redis_url):
    return config.load({"redis_url": redis_url, "claim_idle_s": 1.0, "block_ms": 200,
                        "metrics_port": 0, **AUTH_SETTINGS}, environ={})


class Workers:
    """Worker processes started as `python -m s2s worker STAGE`, stopped at teardown."""

    def __init__(self, redis_url: str, tmp: Path):
        self.redis_url = redis_url
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, stage: str, *flags: str, env: dict | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "S2S_REDIS_URL": self.redis_url, "S2S_METRICS_PORT": "0",
                    "S2S_CLAIM_IDLE_S": "1.0", "PYTHONUNBUFFERED": "1", **(env or {})}
        logfile = open(self.tmp / f"{stage}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "s2s", "worker", stage, *flags],
                                env=full_env, stdout=logfile, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        proc.logfile = logfile.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.logfile).read_text(errors="replace")  # type: ignore[attr-defined]

    def wait_ready(self, stage: str, count: int = 1, timeout: float = 120) -> None:
        """Until `count` workers of `stage` heartbeat (their model is loaded)."""
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            members = client.zrangebyscore("s2s:workers", time.time() - 3, "+inf")
            if sum(m.decode().startswith(stage + "|") for m in members) >= count:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"worker exited with {p.returncode}:\n{self.log(p)}")
            time.sleep(0.2)
        raise TimeoutError(f"{stage} worker not ready in {timeout}s")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def workers(redis_url, tmp_path):
    w = Workers(redis_url, tmp_path)
    yield w
    w.stop_all()


GATEWAY_START_S = 180.0


@contextlib.contextmanager
def gateway_process(redis_url: str, tmp: Path, env: dict | None = None):
    """`python -m s2s gateway` on a free port; yields (http URL, process) once it listens.
    The port is checked to be the gateway's own: a free port picked here can be taken by
    another process (a worker's metrics server on port 0) before the gateway binds it, and
    then a connect would reach that process instead; the gateway is started again on
    another port."""
    import psutil

    from s2s.launcher.redis_server import free_port

    env = {**os.environ, "S2S_REDIS_URL": redis_url, "S2S_METRICS_PORT": "0",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    log = open(tmp / "gateway.log", "wb")
    proc = None
    try:
        for attempt in range(3):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "s2s", "gateway", "--host",
                                     "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
            # a wait, not a timed check: next to four workers loading their models on 2
            # cores, a gateway (aiortc, av and the rest to import) took over 60 s in CI
            deadline = time.monotonic() + GATEWAY_START_S
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error):
                    if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                           for c in psutil.Process(proc.pid).net_connections("tcp")):
                        break
                time.sleep(0.2)
            else:
                text = (tmp / "gateway.log").read_text(errors="replace")
                if proc.poll() is not None and "address already in use" in text and attempt < 2:
                    continue
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited {proc.returncode}:\n{text}")
                raise TimeoutError(f"gateway did not listen in {GATEWAY_START_S:g} s")
            break
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


# --- a skip is a failure unless tests/allowed_skips.txt names it with its reason ----------
# A test that skips because something is missing hides a missing install step as well as a
# green run would: CI must fail instead.  S2S_ALLOWED_SKIPS_EXTRA names one more list, for
# a place that lacks something on purpose (scripts/fresh_machine.sh: no Docker engine in
# its clean root file system).
ALLOWED_SKIPS = ROOT / "tests" / "allowed_skips.txt"
_skipped: dict[str, str] = {}


def _allowed_skips() -> list[tuple[str, str]]:
    files = [ALLOWED_SKIPS]
    if os.environ.get("S2S_ALLOWED_SKIPS_EXTRA"):
        files.append(Path(os.environ["S2S_ALLOWED_SKIPS_EXTRA"]))
    allowed = []
    for file in files:
        for line in file.read_text().splitlines():
            pattern, sep, reason = line.partition("|")
            if line.strip() and not line.lstrip().startswith("#"):
                if not sep or not reason.strip():
                    raise pytest.UsageError(f"{file}: '{line}' has no reason after '|'")
                allowed.append((pattern.strip(), reason.strip()))
    return allowed


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped[report.nodeid] = reason


def pytest_sessionfinish(session, exitstatus):
    import fnmatch

    allowed = _allowed_skips()
    unexpected = {node: why for node, why in _skipped.items()
                  if not any(fnmatch.fnmatchcase(node, pattern) for pattern, _ in allowed)}
    if not unexpected:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line("")
        reporter.write_line(f"{len(unexpected)} test(s) skipped without an entry in "
                            f"{ALLOWED_SKIPS.relative_to(ROOT)}: each is a failure", red=True)
        for node, why in sorted(unexpected.items()):
            reporter.write_line(f"  {node}: {why}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
