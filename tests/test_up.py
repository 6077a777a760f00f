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

from s2s.redis_server import free_port

from .conftest import ROOT

pytestmark = pytest.mark.slow


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
