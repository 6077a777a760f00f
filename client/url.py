"""Where a client reaches the gateway: one parser for every URL a user may hand a client.

``s2s up`` prints the web page's address with the API key in its fragment
(``http://127.0.0.1:8000/#key=…``); the protocol lives at ``ws://…/ws`` and the OpenAI
Realtime endpoint at ``ws://…/v1/realtime`` on the same host.  Every client command
(``s2s talk``, ``s2s bench``, the fuzzer) and both connection classes take any of these
and call :func:`gateway_url`, so a user copies whichever URL they have at hand::

    >>> gateway_url("http://127.0.0.1:8000/#key=abc")
    GatewayURL(url='ws://127.0.0.1:8000/ws', key='***')
    >>> gateway_url("ws://127.0.0.1:8000/ws", "realtime").url
    'ws://127.0.0.1:8000/v1/realtime'

The key found in a fragment is for the caller to use when no key was given explicitly;
it never appears in the returned URL, in the repr, or in an error message.
"""

from __future__ import annotations

import urllib.parse
from typing import NamedTuple

from s2s.config import redacted_url

# webrtc: the HTTP endpoint of Realtime WebRTC calls, given here as ws:// like the others
# (client/webrtc.py posts its offer to the http:// of it)
PATHS = {"native": "/ws", "realtime": "/v1/realtime", "webrtc": "/v1/realtime/calls"}
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


class GatewayURLError(ValueError):
    """A URL no client can reach the gateway at; the message names it without secrets."""


class GatewayURL(NamedTuple):
    url: str                # ws:// or wss:// of the wanted protocol, without fragment
    key: str | None = None  # the API key or token of a ``#key=…`` fragment

    @property
    def http(self) -> str:
        """The gateway's own HTTP base (``/metrics``, ``/healthz`` hang off it)."""
        parts = urllib.parse.urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return f"{scheme}://{parts.netloc}"

    def __repr__(self) -> str:  # a repr lands in logs and tracebacks: never the key
        return f"GatewayURL(url={self.url!r}, key={'***' if self.key else None!r})"


def gateway_url(url: str, protocol: str = "native") -> GatewayURL:
    """The WebSocket URL of ``protocol`` (``native``: ``/ws``; ``realtime``:
    ``/v1/realtime``) at the gateway ``url`` names, and the key of its fragment.

    ``url`` is the page ``s2s up`` prints (``http(s)://host:port[/][#key=…]``: like the
    page itself, the protocol is at the host's root), or a WebSocket URL
    (``ws(s)://host:port/ws``, ``…/v1/realtime``, or no path at all).  A WebSocket URL
    of one protocol is turned into the other's when asked; any other path is kept as
    given (a proxy may serve the gateway elsewhere), and so is its query."""
    if protocol not in PATHS:
        raise GatewayURLError(f"unknown protocol {protocol!r}: use {' or '.join(PATHS)}")
    text = url.strip()
    shown = redacted_url(text)
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018  (raises on a port that is not a number in 0..65535)
    except ValueError as e:
        raise GatewayURLError(f"not a URL: {shown} ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in _WS_SCHEME:
        raise GatewayURLError(
            f"cannot reach a gateway at {shown}: the scheme must be http, https, ws or wss "
            "(the URL `s2s up` prints, http://host:port/#key=…, or ws://host:port/ws)")
    if not parts.hostname:
        raise GatewayURLError(f"no host in {shown}: give e.g. http://127.0.0.1:8000/ "
                              "or ws://127.0.0.1:8000/ws")
    key = _fragment_key(parts.fragment)
    want = PATHS[protocol]
    if scheme in ("http", "https"):
        path, query = want, ""
    else:
        path, query = _ws_path(parts.path, want), parts.query
    ws = urllib.parse.urlunsplit((_WS_SCHEME[scheme], parts.netloc, path, query, ""))
    return GatewayURL(ws, key)


def resolve_url_arg(args, prog: str) -> bool:
    """For a command's parsed ``--url`` (and ``--api-key``): the plain ws URL into
    ``args.url`` (so no report or log line carries a key) and the URL's key into
    ``args.api_key`` unless one was given.  False, with the reason on stderr, for a URL
    that names no gateway."""
    import sys

    try:
        target = gateway_url(args.url)
    except GatewayURLError as e:
        print(f"{prog}: --url: {e}", file=sys.stderr)
        return False
    args.url = target.url
    if args.api_key is None:
        args.api_key = target.key
    return True


def _ws_path(path: str, want: str) -> str:
    stripped = path.rstrip("/")
    for known in PATHS.values():
        if stripped.endswith(known):
            return stripped[: -len(known)] + want
    if path == "" or path.endswith("/"):
        return stripped + want
    return path


def _fragment_key(fragment: str) -> str | None:
    """``key`` of a ``#key=…&…`` fragment, decoded as the page decodes it
    (URLSearchParams: ``+`` is a space, %-escapes)."""
    for name, value in urllib.parse.parse_qsl(fragment, keep_blank_values=True):
        if name == "key" and value:
            return value
    return None
