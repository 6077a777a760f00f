"""The stack under the Redis ACLs of deploy/redis/users.acl: a real redis-server started
with that file (rendered with random passwords), every worker and the gateway as its own
ACL user, one real spoken session end to end; and each role is refused what it does not
need (NOPERM), a client without credentials everything."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import secrets
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis

from s2s.client import talk
from s2s.launcher.redis_server import find_redis_server, free_port
from tests.conftest import DATA, ROOT, Workers, gateway_process, load_pcm16

ACL = ROOT / "deploy" / "redis" / "users.acl"
ROLES = ("gateway", "vad", "stt", "llm", "tts", "admin")


def _render():
    spec = importlib.util.spec_from_file_location("render_acl", ACL.with_name("render_acl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.render


@contextlib.contextmanager
def acl_redis(tls: tuple[Path, Path] | None = None):
    """redis-server with the rendered ACL file; yields {role: URL} (and "none").
    ``tls`` (cert, key): TLS only, rediss:// URLs trusting that certificate."""
    passwords = {r: secrets.token_hex(16) for r in ROLES}
    env = {f"S2S_REDIS_PASSWORD_{r.upper()}": p for r, p in passwords.items()}
    with tempfile.TemporaryDirectory() as tmp:
        aclfile = Path(tmp) / "users.acl"
        aclfile.write_text(_render()(ACL.read_text(), env))
        port = server_port = free_port()
        scheme, query = "redis", ""
        terminator = None
        if tls:  # the bundled Valkey has no TLS built in: TLS ends in front of it, as at a
            # managed Redis behind stunnel or a proxy; the client side is what is tested
            server_port = free_port()
            terminator = TlsTerminator(port, server_port, *tls).start()
            scheme, query = "rediss", f"?ssl_ca_certs={tls[0]}"
        proc = subprocess.Popen([find_redis_server(), "--port", str(server_port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", tmp,
                                 "--aclfile", str(aclfile), "--loglevel", "warning"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        urls = {r: f"{scheme}://{r}:{p}@127.0.0.1:{port}/0{query}" for r, p in passwords.items()}
        urls["none"] = f"{scheme}://127.0.0.1:{port}/0{query}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(urls["admin"]).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server with the ACL file did not start:\n"
                                           + proc.stdout.read().decode(errors="replace"))
                    time.sleep(0.05)
            yield urls
        finally:
            proc.terminate()
            proc.wait(10)
            if terminator:
                terminator.stop()


class TlsTerminator:
    """TLS on ``port`` (this certificate), plain TCP to ``target`` on loopback."""

    def __init__(self, port: int, target: int, cert: Path, key: Path):
        self.port, self.target = port, target
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> "TlsTerminator":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                 ssl=self.context)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_render_refuses_unset_passwords():
    with pytest.raises(KeyError, match="S2S_REDIS_PASSWORD_GATEWAY"):
        _render()(ACL.read_text(), {})
    text = _render()(ACL.read_text(), {f"S2S_REDIS_PASSWORD_{r.upper()}": "x" for r in ROLES})
    assert "${" not in text and "#" not in text.replace("&*", "")


def test_each_role_is_refused_what_it_does_not_need():
    with acl_redis() as urls:
        def client(role):
            return redis.Redis.from_url(urls[role])

        with pytest.raises(redis.AuthenticationError):
            client("none").get("s2s:turn:{x}")
        with pytest.raises((redis.AuthenticationError, redis.exceptions.ResponseError)):
            redis.Redis.from_url(urls["gateway"].replace("gateway:", "gateway:x")).ping()
        refused = {
            "gateway": [lambda c: c.xreadgroup("stt", "w", {"s2s:stt": ">"}),  # a worker's job
                        lambda c: c.xadd("s2s:stt", {"f": b"x"}),
                        lambda c: c.flushall(), lambda c: c.keys("*"),
                        lambda c: c.config_get("*")],
            "vad": [lambda c: c.xadd("s2s:audio:{x}", {"f": b"x"}),  # only the gateway writes it
                    lambda c: c.get("s2s:owner:{x}"), lambda c: c.get("s2s:ctx:{x}"),
                    lambda c: c.xadd("s2s:llm", {"f": b"x"})],
            "stt": [lambda c: c.xread({"s2s:audio:{x}": "0"}), lambda c: c.set("s2s:turn:{x}", 1),
                    lambda c: c.xadd("s2s:tts", {"f": b"x"}), lambda c: c.get("s2s:ticket:x")],
            "llm": [lambda c: c.xread({"s2s:audio:{x}": "0"}),
                    lambda c: c.xadd("s2s:stt", {"f": b"x"}), lambda c: c.get("s2s:owner:{x}")],
            "tts": [lambda c: c.get("s2s:ctx:{x}"), lambda c: c.xadd("s2s:llm", {"f": b"x"}),
                    lambda c: c.flushall()],
        }
        for role, calls in refused.items():
            c = client(role)
            for call in calls:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    call(c)
        client("admin").flushall()  # operators may


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stack_runs_under_the_acls(tmp_path):
    """Every stage worker and the gateway, each as its own ACL user, answer a real spoken
    question; no process hits a NOPERM."""
    with acl_redis() as urls:
        workers = Workers(urls["admin"], tmp_path)   # the fixture checks heartbeats as admin
        try:
            for stage in ("vad", "stt", "llm", "tts"):
                workers.start(stage, env={"S2S_REDIS_URL": urls[stage]})
            with gateway_process(urls["gateway"], tmp_path) as (http, _):
                for stage in ("vad", "stt", "llm", "tts"):
                    workers.wait_ready(stage, timeout=240)
                result = asyncio.run(talk(http.replace("http", "ws", 1) + "/ws",
                                          load_pcm16(DATA / "jfk.wav"), 16000,
                                          realtime=False, reply_timeout_s=120))
                gateway_log = (tmp_path / "gateway.log").read_text(errors="replace")
            logs = "\n".join(workers.log(p) for p in workers.procs) + gateway_log
            for line in logs.splitlines():  # what a refused command looks like, for the reader
                if "NOPERM" in line or "no permissions" in line:
                    print(line)
            assert "ask not what your country" in result.transcript.lower(), (result, logs)
            assert result.reply and result.audio, (result.to_dict(), logs)
            assert "NOPERM" not in logs and "WRONGPASS" not in logs, logs
            # the password never shows up in a log
            assert not any(urls[r].split(":")[2].split("@")[0] in logs for r in ROLES)
        finally:
            workers.stop_all()


async def test_gateway_over_tls_with_its_acl_user(tmp_path):
    """rediss:// with an ACL user, straight from S2S_REDIS_URL: the gateway opens a session
    and writes its audio over TLS; a plain-text client gets nowhere."""
    import json
    import shutil

    import websockets

    from s2s import config, keys
    from tests.conftest import AUTH_SETTINGS
    from tests.test_gateway import pcm, serve

    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with acl_redis(tls=(cert, key)) as urls:
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(urls["admin"].replace("rediss://", "redis://")
                                 .split("?")[0], socket_timeout=2).ping()
        settings = config.load({"redis_url": urls["gateway"], **AUTH_SETTINGS}, environ={})
        server, task, base = await serve(settings)
        try:
            ws = await websockets.connect(base.replace("http", "ws") + "/ws")
            await ws.send(json.dumps({"type": "hello"}))
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready", ready
            await ws.send(pcm(320))
            admin = redis.Redis.from_url(urls["admin"])
            for _ in range(50):
                if admin.xlen(keys.audio(ready["session_id"])) == 1:
                    break
                await asyncio.sleep(0.05)
            assert admin.xlen(keys.audio(ready["session_id"])) == 1
            assert admin.get(keys.owner(ready["session_id"])) == b"key:tests"
            await ws.close()
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
