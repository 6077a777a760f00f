"""One URL (issue 18): every client takes the URL `s2s up` prints (http://host:port/#key=…)
as well as the gateway's WebSocket URLs; the key of the fragment authenticates, and no
message ever shows it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest
import redis

from s2s import keys
from s2s.bench import loadgen
from s2s.client.url import GatewayURL, GatewayURLError, gateway_url

from .conftest import ROOT, TEST_API_KEY, gateway_process

KEY = "k3y-" + secrets.token_urlsafe(12)  # what `s2s up` prints: URL-safe


@pytest.mark.parametrize("url", [
    f"http://127.0.0.1:8000/#key={KEY}",
    f"http://127.0.0.1:8000#key={KEY}",
    f"HTTP://127.0.0.1:8000/?page=1#key={KEY}",    # the page's own query is the page's
    f"http://127.0.0.1:8000/index.html#key={KEY}",  # the page connects to the host's /ws
    f"http://127.0.0.1:8000/#other=1&key={KEY}",
    f"ws://127.0.0.1:8000/ws#key={KEY}",
])
def test_the_printed_page_url_gives_the_websocket_and_its_key(url):
    assert gateway_url(url) == ("ws://127.0.0.1:8000/ws", KEY)
    assert gateway_url(url, "realtime") == ("ws://127.0.0.1:8000/v1/realtime", KEY)


def test_https_gives_wss_and_the_key_is_decoded_like_the_page_does():
    assert gateway_url("https://voice.example/#key=a%2Fb") == ("wss://voice.example/ws", "a/b")
    assert gateway_url("https://[::1]:8443/#key=a+b").url == "wss://[::1]:8443/ws"
    assert gateway_url("https://[::1]:8443/#key=a+b").key == "a b"  # URLSearchParams' +
    assert gateway_url("https://voice.example/").key is None
    assert gateway_url("https://voice.example/#key=").key is None


@pytest.mark.parametrize("url, native, realtime", [
    ("ws://127.0.0.1:8000/ws", "ws://127.0.0.1:8000/ws", "ws://127.0.0.1:8000/v1/realtime"),
    ("wss://voice.example/ws", "wss://voice.example/ws", "wss://voice.example/v1/realtime"),
    ("ws://h:8000", "ws://h:8000/ws", "ws://h:8000/v1/realtime"),
    ("ws://h:8000/", "ws://h:8000/ws", "ws://h:8000/v1/realtime"),
    ("ws://h:8000/ws/", "ws://h:8000/ws", "ws://h:8000/v1/realtime"),
    ("ws://h:8000/v1/realtime", "ws://h:8000/ws", "ws://h:8000/v1/realtime"),
    # behind a proxy: the prefix stays, a path of its own is taken as given
    ("wss://p.example/voice/ws", "wss://p.example/voice/ws",
     "wss://p.example/voice/v1/realtime"),
    ("wss://p.example/custom", "wss://p.example/custom", "wss://p.example/custom"),
    ("ws://h/ws?x=1", "ws://h/ws?x=1", "ws://h/v1/realtime?x=1"),
])
def test_websocket_urls_of_either_protocol(url, native, realtime):
    assert gateway_url(url) == (native, None)
    assert gateway_url(url, "realtime") == (realtime, None)
    for want, protocol in ((native, "native"), (realtime, "realtime")):  # idempotent
        assert gateway_url(want, protocol).url == want


@pytest.mark.parametrize("url, why", [
    (f"ftp://127.0.0.1:8000/#key={KEY}", "scheme must be http, https, ws or wss"),
    (f"127.0.0.1:8000/#key={KEY}", "scheme must be"),
    (f"localhost:8000#key={KEY}", "scheme must be"),
    (f"http:///#key={KEY}", "no host"),
    (f"ws://:8000/ws#key={KEY}", "no host"),
    (f"http://127.0.0.1:99999/#key={KEY}", "not a URL"),
    (f"http://[::1/#key={KEY}", "not a URL"),
    (f"ftp://user:{KEY}@h/", "scheme must be"),
])
def test_anything_else_is_a_clear_error_that_hides_the_key(url, why):
    with pytest.raises(GatewayURLError) as e:
        gateway_url(url)
    assert why in str(e.value)
    assert KEY not in str(e.value) and "***" in str(e.value)


def test_unknown_protocol_and_the_repr_of_a_result():
    with pytest.raises(GatewayURLError, match="unknown protocol"):
        gateway_url("ws://h/ws", "sip")  # (webrtc is one now: client/webrtc.py)
    found = gateway_url(f"http://h:1/#key={KEY}")
    assert KEY not in repr(found) and KEY not in str(found) and "***" in repr(found)
    assert repr(GatewayURL("ws://h/ws")) == "GatewayURL(url='ws://h/ws', key=None)"
    assert found.http == "http://h:1"
    assert gateway_url("wss://h.example:8443/x/ws").http == "https://h.example:8443"


def test_the_bench_takes_the_page_url_too():
    page = f"http://10.0.0.5:8000/#key={KEY}"
    assert loadgen.endpoint(page, "native") == "ws://10.0.0.5:8000/ws"
    assert loadgen.endpoint(page, "realtime") == "ws://10.0.0.5:8000/v1/realtime"
    assert loadgen.endpoint("ws://h:1/ws", "realtime") == "ws://h:1/v1/realtime"
    assert loadgen.metrics_urls(page, [], None) == ["http://10.0.0.5:8000/metrics"]
    assert loadgen.metrics_urls("https://x.example/#key=k", [], None) == \
        ["https://x.example/metrics"]


def test_bench_refuses_a_bad_url_without_showing_the_key(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    assert loadgen.main(parser.parse_args(["--url", f"ftp://h:1/#key={KEY}"])) == 2
    err = capsys.readouterr().err
    assert "bench: --url:" in err and "scheme" in err and KEY not in err


# --- against a real gateway ------------------------------------------------------------------
async def test_both_connections_open_at_the_page_url_with_its_key(redis_url, monkeypatch):
    """Connection (native) and RealtimeConnection reach the gateway from the page URL and
    authenticate with its key; $S2S_API_KEY (here a wrong one) is only the fallback."""
    from s2s import config
    from s2s.client import Connection, ProtocolError
    from s2s.client.realtime import RealtimeConnection

    from .conftest import AUTH_SETTINGS
    from .test_gateway import running_gateway

    settings = config.load({"redis_url": redis_url, **AUTH_SETTINGS,
                            "api_keys": f"fromurl:{KEY}"}, environ={})
    monkeypatch.setenv("S2S_API_KEY", "not-the-key")
    async with running_gateway(settings) as gw:
        page = f"{gw.http}/#key={KEY}"
        conn = await Connection.open(page)
        assert await gw.redis.get(keys.owner(conn.session_id)) == b"key:fromurl"
        await conn.close()
        rt = await RealtimeConnection.open(page)
        assert rt.session_id and await gw.redis.get(keys.owner(rt.session_id)) == \
            b"key:fromurl"
        await rt.close()
        with pytest.raises(ProtocolError) as e:
            await Connection.open(gw.http)  # no fragment: $S2S_API_KEY, a wrong key
        assert e.value.code == "unauthorized"


def _talk(url: str, wav, *extra: str) -> subprocess.CompletedProcess:
    # $S2S_API_KEY holds the test run's own key: the session's principal then says
    # which of the two credentials `s2s talk` presented
    env = {**os.environ, "S2S_API_KEY": TEST_API_KEY, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "s2s", "talk", str(wav), "--url", url, "--json", "--fast",
         "--tail", "0.2", "--timeout", "0.5", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_talk_uses_the_key_of_the_printed_url(redis_url, tmp_path):
    import soundfile as sf

    wav = tmp_path / "quiet.wav"
    sf.write(wav, np.zeros(8000, np.int16), 16000, subtype="PCM_16")
    wrong = "wrong-" + secrets.token_urlsafe(12)
    env = {"S2S_API_KEYS": f"tests:{TEST_API_KEY},fromurl:{KEY}"}
    owners = redis.Redis.from_url(redis_url)
    try:
        with gateway_process(redis_url, tmp_path, env) as (base, _):
            port = base.rsplit(":", 1)[1]
            # what `s2s up` prints, the key in the fragment: that key is the principal
            run = _talk(f"http://127.0.0.1:{port}/#key={KEY}", wav)
            assert KEY not in run.stdout + run.stderr
            sid = json.loads(run.stdout)["session_id"]
            assert sid and owners.get(keys.owner(sid)) == b"key:fromurl", run.stderr

            # a key the gateway does not know, in the fragment: refused, and not shown
            run = _talk(f"http://127.0.0.1:{port}#key={wrong}", wav)
            assert run.returncode == 1 and "unauthorized" in run.stderr, run.stderr
            assert wrong not in run.stdout + run.stderr

            # an explicit --api-key wins over the fragment
            run = _talk(f"http://127.0.0.1:{port}/#key={wrong}", wav, "--api-key", KEY)
            sid = json.loads(run.stdout)["session_id"]
            assert owners.get(keys.owner(sid)) == b"key:fromurl", run.stderr

            # no fragment: $S2S_API_KEY, as before
            run = _talk(f"ws://127.0.0.1:{port}/ws", wav)
            sid = json.loads(run.stdout)["session_id"]
            assert owners.get(keys.owner(sid)) == b"key:tests", run.stderr

            run = _talk(f"ftp://127.0.0.1:{port}/#key={KEY}", wav)
            assert run.returncode == 2 and "s2s talk: --url:" in run.stderr
            assert KEY not in run.stderr
    finally:
        owners.close()
