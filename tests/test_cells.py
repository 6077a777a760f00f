"""Cells (s2s/cells.py): one gateway over two independent Redis instances, each with
its own worker of every stage (real models); sessions placed in both and answered; a
resumed session lands in its cell on any gateway; one cell's Redis killed leaves the
other cell's sessions answered."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from s2s import config, keys
from s2s.cells import Cells, parse
from s2s.client import Connection, ProtocolError, talk
from s2s.gateway.auth import ticket_key

from tests.conftest import AUTH_SETTINGS, DATA, TEST_API_KEY, Workers, load_pcm16
from tests.test_gateway import serve

SR = 16000
STAGES = ("vad", "stt", "llm", "tts")


# --- placement, without Redis ---------------------------------------------------------------
def cells_of(spec: str) -> Cells:
    return Cells(config.load({"redis_cells": spec}, environ={}))


def test_parse_names_and_refuses_bad_specs():
    assert parse("a=redis://h1:6379, b=redis://h2:6379/1") == [
        ("a", "redis://h1:6379"), ("b", "redis://h2:6379/1")]
    assert parse("redis://h1:6379,redis://h2:6379") == [("0", "redis://h1:6379"),
                                                       ("1", "redis://h2:6379")]
    for bad in ("A.b=redis://h", "a=http://h", "a=redis://h,a=redis://g", " , "):
        with pytest.raises(SystemExit):
            parse(bad)


def test_session_ids_name_their_cell():
    cells = cells_of("a=redis://h1:1,b=redis://h2:2")
    a, b = cells.cells
    sid = cells.name(b, "Xy_-z")
    assert sid == "b.Xy_-z" and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", sid)
    assert cells.of(sid) is b and cells.of(cells.name(a, "q")) is a
    # ids from before cells (no prefix), unknown prefixes: the home cell
    assert cells.of("Xy_-z") is a and cells.of("zz.q") is a and cells.of(None) is a
    # one cell: ids unchanged
    single = Cells(config.load({"redis_url": "redis://h:1"}, environ={}))
    assert single.name(single.home, "tok") == "tok" and not single.prefixed


def test_adding_a_cell_moves_no_session_and_few_budgets():
    two = cells_of("a=redis://h1:1,b=redis://h2:2")
    three = cells_of("a=redis://h1:1,b=redis://h2:2,c=redis://h3:3")
    for sid in ("a.x", "b.y"):
        assert two.of(sid).name == three.of(sid).name  # placement lives in the id
    moved = 0
    for i in range(300):
        before, after = two.principal_cell(f"p{i}").name, three.principal_cell(f"p{i}").name
        assert after in (before, "c")  # rendezvous: a principal moves only to the new cell
        moved += after != before
    assert 50 < moved < 150  # about a third


def test_choose_prefers_room_and_skips_down_cells():
    cells = cells_of("a=redis://h1:1,b=redis://h2:2")
    a, b = cells.cells
    a.info, b.info = {"capacity": 64, "live": 10}, {"capacity": 64, "live": 30}
    assert cells.choose() is a
    a.up = False
    assert cells.choose() is b
    a.up, b.info = True, {"capacity": 128, "live": 30}  # a 84 % free, b 77 %
    assert cells.choose() is a
    b.info = {"capacity": 640, "live": 30}
    assert cells.choose() is b
    # no capacity known: fewer sessions first, counting placements not yet registered
    a.info, b.info = {"live": 0}, {"live": 0}
    assert cells.choose() is a and cells.choose({"a": 1}) is b


# --- two real Redis, no models: counters and tickets across cells ---------------------------
@pytest.fixture
def two_redis():
    from s2s.launcher.redis_server import RedisServer

    servers = [RedisServer().start(), RedisServer().start()]
    yield servers
    for s in servers:
        s.stop()


async def test_limits_and_tickets_across_cells(two_redis):
    """A principal's session limit counts its sessions in every cell; tickets name their
    cell and are redeemed there; the audio budget is counted in the principal's home cell
    only. No workers: a session opens without them."""
    import websockets

    ra, rb = two_redis
    settings = config.load({"redis_cells": f"a={ra.url},b={rb.url}", "principal_max_sessions": 2,
                            "principal_audio_s_per_min": 600.0, **AUTH_SETTINGS}, environ={})
    server, task, http = await serve(settings)
    ws_url = http.replace("http", "ws", 1) + "/ws"
    redis = {"a": aioredis.from_url(ra.url), "b": aioredis.from_url(rb.url)}
    try:
        first = await Connection.open(ws_url)
        second = await Connection.open(ws_url)
        placed = sorted(c.session_id.split(".")[0] for c in (first, second))
        assert placed == ["a", "b"], placed  # one per cell: the emptier one first
        with pytest.raises(ProtocolError) as refused:  # 2 sessions, in two cells: the limit
            await Connection.open(ws_url)
        assert refused.value.code == "session_limit", refused.value
        for conn in (first, second):  # audio: counted in the principal's home cell only
            await conn.send_audio(np.zeros(SR // 10, np.int16))
        home = Cells(settings).principal_cell("key:tests").name
        other = "b" if home == "a" else "a"
        for _ in range(50):
            if await redis[home].keys("s2s:paudio:*"):
                break
            await asyncio.sleep(0.05)
        assert await redis[home].keys("s2s:paudio:key:tests:*")
        assert not await redis[other].keys("s2s:paudio:*")
        await first.close()
        await second.close()

        async with httpx.AsyncClient(base_url=http, timeout=5) as client:
            tickets = [(await client.post("/auth/ticket", headers={
                "Authorization": f"Bearer {TEST_API_KEY}"})).json()["ticket"] for _ in range(2)]
        assert {t.split(".")[0] for t in tickets} <= {"a", "b"}
        for ticket in tickets:
            cell = ticket.split(".")[0]
            assert await redis[cell].exists(keys.ticket(ticket_key(ticket)))  # in its cell
            async with websockets.connect(ws_url, additional_headers={},
                                          subprotocols=["s2s", "s2s.ticket." + ticket]) as ws:
                await ws.send('{"type": "hello"}')
                ready = json.loads(await ws.recv())
                assert ready["type"] == "ready", ready
                await ws.send('{"type": "bye"}')
        for ticket in tickets:  # one-time, in its cell
            cell = ticket.split(".")[0]
            assert not await redis[cell].keys("s2s:ticket:*")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        for client in redis.values():
            await client.aclose()


# --- two real cells -------------------------------------------------------------------------
def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


@pytest.fixture
def two_cells(tmp_path):
    from s2s.launcher.redis_server import RedisServer

    servers = [RedisServer().start(), RedisServer().start()]
    crews = [Workers(s.url, tmp_path / name) for s, name in zip(servers, "ab")]
    try:
        for crew in crews:
            crew.tmp.mkdir()
            for stage in STAGES:
                crew.start(stage, env={"OMP_NUM_THREADS": "1"})
        for crew in crews:
            for stage in STAGES:
                crew.wait_ready(stage, timeout=300)
        yield servers, crews
    finally:
        for crew in crews:
            crew.stop_all()
        for s in servers:
            s.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_two_cells_place_resume_and_fail_apart(two_cells):
    (ra, rb), crews = two_cells
    settings = config.load({"redis_cells": f"a={ra.url},b={rb.url}", "closed_ttl_s": 600,
                            "metrics_port": 0, **AUTH_SETTINGS}, environ={})
    gateways = [await serve(settings), await serve(settings)]
    (_, _, http1), (_, _, http2) = gateways
    ws1, ws2 = (h.replace("http", "ws", 1) + "/ws" for h in (http1, http2))
    redis = {"a": aioredis.from_url(ra.url), "b": aioredis.from_url(rb.url)}
    jfk = load_pcm16(DATA / "jfk.wav")
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            health = (await http.get(f"{http1}/healthz")).json()
            assert health["ok"] and {n: c["missing"] for n, c in health["cells"].items()} == \
                {"a": [], "b": []}, health
            sd = (await http.get(f"{http1}/sd")).json()
            cells_seen = {(g["labels"]["cell"], g["labels"]["role"]) for g in sd
                          if "cell" in g["labels"]}
            assert cells_seen == {(c, s) for c in "ab" for s in STAGES}, sd

        # two sessions at once: one per cell (placement: the cell with the most room)
        first = await asyncio.gather(*(talk(ws1, jfk, SR, realtime=False, reply_timeout_s=120)
                                       for _ in range(2)))
        sids = {r.session_id.split(".")[0]: r.session_id for r in first}
        assert set(sids) == {"a", "b"}, [r.session_id for r in first]
        for r in first:
            assert not r.timed_out and "ask not what your country" in words(r.transcript), \
                r.to_dict()
            assert r.reply.strip() and r.audio, r.to_dict()
        for name, sid in sids.items():  # the session's keys are in its cell's Redis only
            other = "b" if name == "a" else "a"
            assert await redis[name].exists(keys.owner(sid), keys.ctx(sid)) == 2
            assert await redis[other].exists(keys.owner(sid), keys.audio(sid)) == 0

        # resumed on the OTHER gateway by its id: it lands in its cell, with its context
        conn = await Connection.open(ws2, session_id=sids["b"])
        assert conn.session_id == sids["b"]
        await conn.close()
        assert await redis["a"].exists(keys.audio(sids["b"])) == 0

        # cell a's Redis dies while a session of cell b speaks: b's session is answered
        # two turns: a pause past the continuation window (a shorter one goes on the thought)
        gap = int(SR * (settings.vad_continue_ms / 1000 + 0.5))
        two_turns = np.concatenate([jfk, np.zeros(gap, np.int16), jfk])
        speaking = asyncio.create_task(talk(ws2, two_turns, SR, realtime=False,
                                            session_id=sids["b"], reply_timeout_s=150))
        await asyncio.sleep(1.0)
        ra.stop()
        got = await speaking
        assert not got.timed_out and got.session_id == sids["b"], got.to_dict()
        assert words(got.transcript).count("ask not what your country") >= 2, got.transcript
        assert got.reply.strip() and got.audio, got.to_dict()

        # cell a's session cannot open now; new sessions go to cell b
        with pytest.raises(ProtocolError) as refused:
            await Connection.open(ws1, session_id=sids["a"])
        assert refused.value.code == "unavailable", refused.value
        for _ in range(3):
            conn = await Connection.open(ws1)
            assert conn.session_id.startswith("b."), conn.session_id
            await conn.close()
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(f"{http1}/healthz")
            health = r.json()
            assert r.status_code == 200 and health["ok"], health
            assert health["cells"]["a"]["redis"] is False and health["cells"]["b"]["ok"], health
            metrics_text = (await http.get(f"{http1}/metrics")).text
            assert 's2s_gateway_cell_up{cell="a"} 0.0' in metrics_text
            assert 's2s_gateway_cell_up{cell="b"} 1.0' in metrics_text
            for _ in range(3):  # tickets, too, only in the cell that is up
                r = await http.post(f"{http1}/auth/ticket",
                                    headers={"Authorization": f"Bearer {TEST_API_KEY}"})
                assert r.status_code == 200 and r.json()["ticket"].startswith("b."), r.text
    finally:
        for server, task, _ in gateways:
            server.should_exit = True
            await asyncio.wait_for(task, 15)
        for client in redis.values():
            await client.aclose()


def test_compose_cells_overlay_is_consistent():
    """deploy/compose.cells.yml: the gateway's cells parse, each names a Redis service of the
    stack, and every cell has a worker of every stage pointed at its own Redis only."""
    import yaml

    from tests.conftest import ROOT

    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    overlay = yaml.safe_load((ROOT / "deploy" / "compose.cells.yml").read_text())["services"]
    services = {**base, **overlay}
    cells = parse(overlay["gateway"]["environment"]["S2S_REDIS_CELLS"])
    assert [name for name, _ in cells] == ["a", "b"]
    for name, url in cells:
        host = url.split("://", 1)[1].split(":", 1)[0]
        assert "redis-server" in " ".join(services[host]["command"]), host
        stages = {svc["command"][-1] for svc in services.values()
                  if svc.get("command", [])[:2] == ["s2s", "worker"]
                  and svc.get("environment", {}).get("S2S_REDIS_URL") == url}
        assert stages == set(STAGES), (name, stages)


def test_k8s_cell_overlay_is_a_whole_stack_on_its_own_redis():
    """deploy/k8s-cells/b builds (kubectl kustomize, when kubectl is here) into the whole
    stack in namespace s2s-b, every scaler reading that namespace's Redis."""
    import shutil
    import subprocess

    import yaml

    from tests.conftest import ROOT

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("no kubectl: the overlay cannot be built here")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy" / "k8s-cells" / "b")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert namespaces == {"s2s-b"}
    assert all(d["metadata"].get("namespace") == "s2s-b" for d in docs if d["kind"] != "Namespace")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "s2s-config")
    assert config["data"]["REDIS_ADDRESS"] == "redis.s2s-b.svc.cluster.local:6379"
    assert config["data"]["S2S_REDIS_URL"] == "redis://redis:6379/0"  # its own namespace's
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert {"redis", *STAGES} <= deployments, deployments
