"""`s2s up` brings the whole stack up, reports ready, and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from s2s.launcher.redis_server import free_port

from .conftest import ROOT

ECHO = "tests.stages:EchoStage"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_up_reports_ready_serves_healthz_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2S_")}
    log = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "s2s", "up", "--port", str(port)], cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            text = Path(log.name).read_text()
            if f"ready: http://127.0.0.1:{port}" in text:
                break
            assert proc.poll() is None, text
            time.sleep(0.5)
        else:
            pytest.fail("no ready line:\n" + Path(log.name).read_text()[-3000:])
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200
        workers = health.json()["workers"]
        assert {"vad", "stt", "llm", "tts"} <= set(workers), workers
        assert all(len(workers[s]) == 1 for s in ("vad", "stt", "llm", "tts"))
        family = descendants(proc.pid)
        assert len(family) >= 6  # redis, gateway, four workers
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert proc.wait(60) == 0
        time.sleep(0.5)
        assert [p for p in family if alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


# --- quick ones: a model-free custom stage (module:Class) instead of the real models --------
def _up(tmp_path, *args: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2S_")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "s2s", "up", "--no-gateway",
                                 "--shutdown-grace-s", "2", *args], cwd=ROOT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 25) -> None:
    deadline = time.monotonic() + timeout
    while "ready: redis://" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no ready line:\n" + log.read_text()[-3000:]
        time.sleep(0.1)


def _all_gone(pids: set[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_everything_on_sigterm_and_sigint(tmp_path, sig):
    proc, log = _up(tmp_path, "--stages", ECHO)
    try:
        _wait_ready(proc, log)
        family = descendants(proc.pid)
        assert len(family) >= 2  # redis and the echo worker
        proc.send_signal(sig)
        assert proc.wait(20) == 0, log.read_text()
        assert _all_gone(family) == []
        assert "echo worker stopped" in log.read_text()  # stopped gracefully, not killed
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_killed_leaves_no_orphans(tmp_path):
    proc, log = _up(tmp_path, "--stages", ECHO)
    try:
        _wait_ready(proc, log)
        family = descendants(proc.pid)
        assert len(family) >= 2
        proc.kill()  # SIGKILL: no chance to clean up; PDEATHSIG must stop the children
        proc.wait()
        assert _all_gone(family) == [], log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_stops_with_a_clear_message_when_a_child_fails_at_start(tmp_path):
    proc, log = _up(tmp_path, "--stages", f"{ECHO},tests.stages:FailingStage")
    try:
        assert proc.wait(25) != 0
        text = log.read_text()
        assert "failing exited with code" in text and "while starting" in text, text
        assert "fails on purpose" in text  # the child's own reason is shown too
        assert "ready:" not in text
        assert "stopped" in text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_up_rejects_an_unknown_stage(tmp_path):
    proc, log = _up(tmp_path, "--stages", "nosuchstage")
    assert proc.wait(20) != 0
    assert "unknown stage 'nosuchstage'" in log.read_text()
