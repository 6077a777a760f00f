"""Who may talk: API keys, signed tokens, tickets, the Origin check, and sessions bound to
the principal that opened them.  Every refusal is checked for its documented error
(docs/security.md): ``unauthorized`` / ``unknown_session`` then close 1008."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import secrets
import socket
import time

import httpx
import pytest
import websockets

from s2s import config, keys, metrics
from s2s.frames import SID_PATTERN, SessionEnd
from s2s.gateway.auth import Authenticator, mint_token, origin_allowed, verify_token, AuthError
from tests.conftest import AUTH_SETTINGS, TEST_API_KEY, TEST_TOKEN_SECRET
from tests.test_gateway import (closed_with, is_type, pcm, running_gateway, serve,
                                stream_frames, until)

OTHER_KEY = secrets.token_urlsafe(24)


@pytest.fixture
async def gw(redis_url):
    settings = config.load({"redis_url": redis_url, **AUTH_SETTINGS,
                            "api_keys": f"{AUTH_SETTINGS['api_keys']},other:{OTHER_KEY}"},
                           environ={})
    async with running_gateway(settings) as gateway:
        yield gateway


def bearer(credential: str) -> dict:
    return {"Authorization": f"Bearer {credential}"}


async def connect(gw, headers: dict | None = None, subprotocols: list | None = None,
                  **hello):
    """A connection with exactly these credentials (none by default), after its hello."""
    kwargs: dict = {"additional_headers": headers or {}}
    if subprotocols is not None:
        kwargs["subprotocols"] = subprotocols
    ws = await websockets.connect(gw.ws, **kwargs)
    await ws.send(json.dumps({"type": "hello", **hello}))
    return ws


async def opened(gw, **kw) -> tuple:
    ws = await connect(gw, **kw)
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready["session_id"]


async def refused(ws) -> tuple[str, int | None]:
    got, code = await closed_with(ws)
    assert len(got) == 1 and got[0]["type"] == "error", got
    return got[0]["code"], code


def token(subject="alice", ttl=60.0, secret=TEST_TOKEN_SECRET, **limits) -> str:
    return mint_token(secret, subject, ttl, **limits)


# --- credentials -----------------------------------------------------------------------------
def _expired() -> str:
    return mint_token(TEST_TOKEN_SECRET, "alice", 60, now=time.time() - 120)


def _forged() -> str:  # a valid token's payload with a changed subject, old signature
    head, body, sig = token("alice").split(".")
    other = token("mallory").split(".")[1]
    return ".".join([head, other, sig])


@pytest.mark.parametrize("how", [
    "none", "wrong key", "expired token", "forged token", "other secret", "malformed token",
    "wrong key subprotocol", "unknown ticket", "bearer in hello token", "empty bearer"])
async def test_unauthenticated_refused(gw, how):
    kw: dict = {}
    if how == "wrong key":
        kw["headers"] = bearer("not-a-key")
    elif how == "expired token":
        kw["headers"] = bearer(_expired())
    elif how == "forged token":
        kw["headers"] = bearer(_forged())
    elif how == "other secret":
        kw["headers"] = bearer(token(secret="another-secret"))
    elif how == "malformed token":
        kw["headers"] = bearer("s2s1.!!!.???")
    elif how == "wrong key subprotocol":
        kw["subprotocols"] = ["s2s", "s2s.key.not-a-key"]
    elif how == "unknown ticket":
        kw["subprotocols"] = ["s2s", "s2s.ticket." + secrets.token_urlsafe(24)]
    elif how == "bearer in hello token":
        kw["token"] = _expired()
    elif how == "empty bearer":
        kw["headers"] = {"Authorization": "Bearer "}
    ws = await connect(gw, **kw)
    code, close = await refused(ws)
    assert (code, close) == ("unauthorized", 1008)
    assert await gw.redis.xlen(keys.SESSIONS) == 0  # nothing reached the pipeline


async def test_deeply_nested_token_is_unauthorized_not_a_crash(gw):
    """A token whose payload nests deeper than the JSON parser goes (RecursionError) is a
    malformed credential: unauthorized and 1008, not an internal error (1011)."""
    body = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    ws = await connect(gw, headers=bearer(f"s2s1.{body}.AAAA"))
    assert await refused(ws) == ("unauthorized", 1008)


def test_forged_token_is_refused_before_its_payload_is_read():
    """The signature is checked first: a forged token whose payload is not even JSON is a bad
    signature, so an anonymous caller never gets the JSON parser to run on what it sent."""
    from gateway.auth import AuthError, verify_token
    body = base64.urlsafe_b64encode(b"{" * 100_000).decode().rstrip("=")
    with pytest.raises(AuthError, match="bad token signature"):
        verify_token("secret", f"s2s1.{body}.AAAA")


async def test_expired_token_message(gw):
    ws = await connect(gw, headers=bearer(_expired()))
    got, code = await closed_with(ws)
    assert got[0]["message"] == "token expired" and code == 1008


@pytest.mark.parametrize("how", ["key header", "token header", "key subprotocol",
                                 "token in hello", "ticket subprotocol", "ticket in hello"])
async def test_authenticated_ways(gw, how):
    kw: dict = {}
    if how == "key header":
        kw["headers"] = bearer(TEST_API_KEY)
    elif how == "token header":
        kw["headers"] = bearer(token())
    elif how == "key subprotocol":
        kw["subprotocols"] = ["s2s", "s2s.key." + TEST_API_KEY]
    elif how == "token in hello":
        kw["token"] = token()
    else:
        async with httpx.AsyncClient(base_url=gw.http) as client:
            r = await client.post("/auth/ticket", headers=bearer(TEST_API_KEY))
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        ticket = r.json()["ticket"]
        if how == "ticket subprotocol":
            kw["subprotocols"] = ["s2s", "s2s.ticket." + ticket]
        else:
            kw["ticket"] = ticket
    ws, sid = await opened(gw, **kw)
    if "subprotocol" in how:
        assert ws.subprotocol == "s2s"
    assert re.match(SID_PATTERN, sid)
    await ws.close()


async def test_ticket_is_one_time_and_needs_a_key(gw):
    async with httpx.AsyncClient(base_url=gw.http) as client:
        before = metrics.REJECTED.labels("unauthorized")._value.get()
        r = await client.post("/auth/ticket")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert metrics.REJECTED.labels("unauthorized")._value.get() == before + 1
        r = await client.post("/auth/ticket", headers=bearer("not-a-key"))
        assert r.status_code == 401
        r = await client.post("/auth/ticket", headers=bearer(_expired()))
        assert r.status_code == 401 and r.json()["message"] == "token expired"
        assert (await client.get("/auth/ticket")).status_code == 405
        ticket = (await client.post("/auth/ticket", headers=bearer(TEST_API_KEY))).json()["ticket"]
    # Redis holds only the ticket's hash
    assert not await gw.redis.exists(keys.ticket(ticket))
    ws, _ = await opened(gw, subprotocols=["s2s", "s2s.ticket." + ticket])
    again = await connect(gw, subprotocols=["s2s", "s2s.ticket." + ticket])
    assert await refused(again) == ("unauthorized", 1008)
    await ws.close()


async def test_ticket_expires(gw, redis_url):
    settings = config.load({"redis_url": redis_url, **AUTH_SETTINGS, "ticket_ttl_s": 0.3},
                           environ={})
    server, task, base = await serve(settings)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            ticket = (await client.post("/auth/ticket",
                                        headers=bearer(TEST_API_KEY))).json()["ticket"]
        await asyncio.sleep(0.6)
        ws = await websockets.connect(base.replace("http", "ws") + "/ws",
                                      additional_headers={})
        await ws.send(json.dumps({"type": "hello", "ticket": ticket}))
        assert await refused(ws) == ("unauthorized", 1008)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


# --- sessions belong to their principal ---------------------------------------------------
async def test_server_made_ids(gw):
    ids = set()
    for _ in range(5):
        ws, sid = await opened(gw, headers=bearer(TEST_API_KEY))
        assert re.match(SID_PATTERN, sid) and len(sid) >= 22  # 16 random bytes, base64url
        ids.add(sid)
        assert await gw.redis.get(keys.owner(sid)) == b"key:tests"
        await ws.close()
    assert len(ids) == 5


@pytest.mark.parametrize("chosen", ["my-own-session", "a" * 64, "0123456789abcdef" * 2])
async def test_client_chosen_id_refused(gw, chosen):
    ws = await connect(gw, headers=bearer(TEST_API_KEY), session_id=chosen)
    assert await refused(ws) == ("unknown_session", 1008)
    assert await gw.redis.xlen(keys.SESSIONS) == 0
    assert not await gw.redis.exists(keys.owner(chosen))


async def test_other_principal_can_never_touch_a_session(gw):
    alice, sid = await opened(gw, headers=bearer(TEST_API_KEY))
    await alice.send(pcm(320))
    # another key, a token (another subject), an expired token of the same key: all refused
    for headers in (bearer(OTHER_KEY), bearer(token("mallory")), bearer(_expired())):
        ws = await connect(gw, headers=headers, session_id=sid)
        code, close = await refused(ws)
        assert code in ("unknown_session", "unauthorized") and close == 1008
    # ... and a refused resume did not end, replace or read alice's session
    assert not any(isinstance(f, SessionEnd)
                   for f in await stream_frames(gw.redis, keys.audio(sid)))
    await alice.send(json.dumps({"type": "ping", "t": 1}))
    assert (await until(alice, is_type("pong")))[-1]["t"] == 1
    # the same principal resumes (replacing the old connection)
    again, sid2 = await opened(gw, headers=bearer(TEST_API_KEY), session_id=sid)
    assert sid2 == sid
    _, code = await closed_with(alice)
    assert code == 1000
    await again.close()


async def test_forged_and_unknown_ids_refused(gw):
    for sid in (secrets.token_urlsafe(16), "x", "session-1"):
        ws = await connect(gw, headers=bearer(TEST_API_KEY), session_id=sid)
        assert await refused(ws) == ("unknown_session", 1008)


async def test_token_subject_is_the_principal(gw):
    ws, sid = await opened(gw, headers=bearer(token("alice")))
    await ws.close()
    await asyncio.sleep(0.1)
    # a fresh token for the same subject may resume; the API key (another principal) not
    other = await connect(gw, headers=bearer(TEST_API_KEY), session_id=sid)
    assert await refused(other) == ("unknown_session", 1008)
    # closed sessions wait for their VAD owner to pass SessionEnd: play that owner
    last = await gw.redis.xrevrange(keys.audio(sid), count=1)
    await gw.redis.set(keys.vad_pos(sid), last[0][0])
    ws2, sid2 = await opened(gw, headers=bearer(token("alice", ttl=30)), session_id=sid)
    assert sid2 == sid
    await ws2.close()


# --- Origin -------------------------------------------------------------------------------------
async def test_origin_check(gw, redis_url):
    host = gw.http.removeprefix("http://")
    ws = await websockets.connect(gw.ws, additional_headers=bearer(TEST_API_KEY),
                                  origin=f"http://{host}")  # same origin: fine
    await ws.send(json.dumps({"type": "hello"}))
    assert json.loads(await ws.recv())["type"] == "ready"
    await ws.close()
    before = metrics.REJECTED.labels("forbidden_origin")._value.get()
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(gw.ws, additional_headers=bearer(TEST_API_KEY),
                                 origin="http://evil.example")
    assert e.value.response.status_code == 403
    assert metrics.REJECTED.labels("forbidden_origin")._value.get() == before + 1
    async with httpx.AsyncClient(base_url=gw.http) as client:
        r = await client.post("/auth/ticket", headers={**bearer(TEST_API_KEY),
                                                       "Origin": "http://evil.example"})
        assert r.status_code == 403


def test_origin_rules():
    s = config.load({"allowed_origins": "https://app.example, http://localhost:3000"}, environ={})

    def scope(origin, host="gw.example:8000"):
        headers = [(b"host", host.encode())]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        return {"headers": headers}

    assert origin_allowed(scope(None), s)                      # not a browser
    assert origin_allowed(scope("http://gw.example:8000"), s)  # same origin
    assert origin_allowed(scope("https://app.example"), s)
    assert origin_allowed(scope("http://localhost:3000/"), s)
    assert not origin_allowed(scope("http://gw.example:8001"), s)
    assert not origin_allowed(scope("null"), s)
    assert not origin_allowed(scope("https://app.example.evil.com"), s)
    assert origin_allowed(scope("http://anything"), config.load({"allowed_origins": "*"},
                                                                environ={}))


# --- auth off, configuration -------------------------------------------------------------------
async def test_auth_off(redis_url):
    settings = config.load({"redis_url": redis_url, "auth": False}, environ={})
    server, task, base = await serve(settings)
    try:
        ws = await websockets.connect(base.replace("http", "ws") + "/ws", additional_headers={})
        await ws.send(json.dumps({"type": "hello"}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready"
        assert await websockets_owner(settings, ready["session_id"]) == "anonymous"
        await ws.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def websockets_owner(settings, sid):
    from s2s.bus import Bus
    bus = Bus(settings)
    try:
        return await bus.session_principal(sid)
    finally:
        await bus.close()


def test_gateway_refuses_to_start_without_credentials(tmp_path):
    from s2s.gateway.server import check_auth

    with pytest.raises(SystemExit, match="S2S_API_KEYS"):
        check_auth(config.load({}, environ={}))
    check_auth(config.load({"auth": False}, environ={}))
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nalice:k1\nk2\n\n")
    auth = Authenticator(config.load({"api_keys_file": str(keyfile)}, environ={}))
    assert auth.check("k1").id == "key:alice"
    assert auth.check("k2").id.startswith("key:") and "k2" not in auth.check("k2").id
    with pytest.raises(AuthError):
        auth.check("k3")
    assert config.load(environ={"S2S_AUTH": "off"}).auth is False


def test_token_command(capsys):
    from s2s.gateway import token_command

    parser = argparse.ArgumentParser()
    token_command.add_arguments(parser)
    args = parser.parse_args(["create", "--ttl", "2h", "--max-sessions", "2",
                              "--subject", "bob", "--json"])
    assert token_command.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    principal = verify_token(TEST_TOKEN_SECRET, out["token"])
    assert principal.id == "sub:bob" and principal.max_sessions == 2
    assert 7190 < out["expires"] - time.time() <= 7200
    with pytest.raises(AuthError, match="signature"):
        verify_token("another", out["token"])
    with pytest.raises(SystemExit):
        parser.parse_args(["create", "--ttl", "soon"])


# --- TLS, the admin port, s2s up's key ------------------------------------------------------
def _self_signed(tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_gateway_tls_and_admin_port(redis_url, tmp_path):
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    import uvicorn

    from s2s.gateway.server import admin_config
    from s2s.launcher.redis_server import free_port

    cert, key = _self_signed(tmp_path)
    admin_port = free_port()
    settings = config.load({"redis_url": redis_url, **AUTH_SETTINGS, "ssl_certfile": str(cert),
                            "ssl_keyfile": str(key), "admin_port": admin_port}, environ={})
    server, task, base = await serve(settings)
    admin_app = server.config.app.state.admin_app
    admin = uvicorn.Server(admin_config(settings, admin_app))
    admin.install_signal_handlers = lambda: None
    admin_task = asyncio.create_task(admin.serve())
    try:
        while not admin.started:
            await asyncio.sleep(0.02)
        https = base.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=ctx) as client:
            # the public port: TLS, no /metrics or /healthz there
            assert (await client.get(https + "/metrics")).status_code == 404
            assert (await client.get(https + "/healthz")).status_code == 404
            assert (await client.get(https + "/")).status_code == 200
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{admin_port}/metrics")
            assert r.status_code == 200 and "s2s_active_sessions" in r.text
            assert (await client.get(f"http://127.0.0.1:{admin_port}/healthz")).json()["ok"]
        ws = await websockets.connect(https.replace("https", "wss") + "/ws", ssl=ctx)
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.close()
    finally:
        admin.should_exit = True
        server.should_exit = True
        await asyncio.wait_for(asyncio.gather(task, admin_task), 10)


def test_up_makes_a_key_and_a_login_url(capsys, monkeypatch):
    from s2s.launcher import up

    for name in ("S2S_API_KEYS", "S2S_TOKEN_SECRET", "S2S_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    stack = up.Stack(parser.parse_args(["--port", "8123"]))
    assert stack.key and stack.env["S2S_API_KEYS"] == f"up:{stack.key}"
    auth = Authenticator(config.load(environ={"S2S_API_KEYS": stack.env["S2S_API_KEYS"]}))
    assert auth.check(stack.key).id == "key:up"
    stack._print_ready("http://127.0.0.1:8123")
    out = capsys.readouterr().out
    assert f"ready: http://127.0.0.1:8123/#key={stack.key}" in out
    assert f"s2s talk FILE --url 'http://127.0.0.1:8123/#key={stack.key}'" in out
    # a configured key is used as is, and never printed
    monkeypatch.setenv("S2S_API_KEYS", "mine:secret-key")
    stack = up.Stack(parser.parse_args([]))
    assert not stack.key and stack.env["S2S_API_KEYS"] == "mine:secret-key"
    stack._print_ready("http://127.0.0.1:8000")
    assert "secret-key" not in capsys.readouterr().out
    assert up.redacted("redis://gw:pw@h:1/0") == "redis://gw:***@h:1/0"


async def test_ticket_with_redis_down_is_unavailable_not_a_crash():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"  # bound, never listening
    settings = config.load({"redis_url": dead, **AUTH_SETTINGS}, environ={})
    server, task, base = await serve(settings)
    try:
        ws = await websockets.connect(base.replace("http", "ws") + "/ws", additional_headers={})
        await ws.send(json.dumps({"type": "hello", "ticket": "abc"}))
        got, code = await closed_with(ws)
        assert got[0]["code"] == "unavailable" and code == 1013
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        s.close()


async def test_python_client_sends_its_key(gw, monkeypatch):
    from s2s.client import Connection, ProtocolError

    conn = await Connection.open(gw.ws)                          # $S2S_API_KEY (conftest)
    await conn.close()
    conn = await Connection.open(gw.ws, api_key=token("carol"))  # an explicit token
    assert conn.api_key is not None
    assert await gw.redis.get(keys.owner(conn.session_id)) == b"sub:carol"
    await conn.close()
    with pytest.raises(ProtocolError) as e:
        await Connection.open(gw.ws, api_key="not-a-key")
    assert e.value.code == "unauthorized"
    monkeypatch.delenv("S2S_API_KEY")
    with pytest.raises(ProtocolError) as e:
        await Connection.open(gw.ws)
    assert e.value.code == "unauthorized" and "no credential" in e.value.error["message"]
