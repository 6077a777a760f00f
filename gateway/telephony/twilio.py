"""Twilio Media Streams (bidirectional, ``<Connect><Stream>``), as Twilio documents them
(https://www.twilio.com/docs/voice/media-streams/websocket-messages).

Twilio sends, as JSON text messages: ``connected`` (protocol "Call"), ``start`` (the
stream's ``streamSid``, ``callSid``, ``accountSid``, ``tracks``, ``mediaFormat``
audio/x-mulaw 8000 Hz mono, and ``customParameters`` from the ``<Parameter>`` nouns),
``media`` (``track``, ``chunk``, ``timestamp``, ``payload``: base64 μ-law, 20 ms a
message), ``dtmf``, ``mark`` (a mark we sent, played or dropped by a ``clear``) and
``stop``.  Every message after ``connected`` carries a ``sequenceNumber`` (a string).
We send ``media`` (base64 μ-law), ``mark`` and ``clear``, each with the ``streamSid``;
anything else, or a binary frame, is a protocol error on Twilio's side (31924, 31950).

Who connects is checked with Twilio's request signature: ``X-Twilio-Signature`` is the
base64 HMAC-SHA1, keyed with the account's auth token, of the URL Twilio requested (then,
for a form POST, each parameter's name and value, sorted by name)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import quoteattr

from .. import g711
from ..auth import AuthError, Principal
from .serializer import (BadMessage, Connected, Dtmf, Event, MarkPlayed, Media, Serializer,
                         Start, Stop)

RATE = 8000
ENCODING = "audio/x-mulaw"
MAX_PAYLOAD = RATE           # one second of μ-law per media message (Twilio sends 20 ms)
MAX_MARK_NAME = 128
OUT_PIECE = RATE // 5        # reply audio goes out in media messages of 200 ms at most


class TwilioSerializer(Serializer):
    name = "twilio"
    sample_rate = RATE

    def __init__(self) -> None:
        self.stream_sid = ""

    # --- Twilio -> s2s ---------------------------------------------------------------------
    def parse(self, text: str | None, data: bytes | None) -> list[Event]:
        if text is None:
            raise BadMessage("binary", "Twilio sends JSON text messages only")
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            raise BadMessage("bad_json", "a message is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise BadMessage("bad_message", 'a JSON object with a string "event" was expected')
        kind = msg["event"]
        if kind == "connected":
            return [Connected()]
        if kind == "start":
            return [self._start(msg)]
        if not self.stream_sid:
            raise BadMessage("before_start", f"{kind[:20]!r} before start")
        if msg.get("streamSid") not in (None, self.stream_sid):
            raise BadMessage("wrong_stream", "a message of another stream")
        if kind == "media":
            return self._media(msg.get("media"))
        if kind == "mark":
            mark = msg.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str) or len(name) > MAX_MARK_NAME:
                raise BadMessage("bad_mark", "mark.name must be a string")
            return [MarkPlayed(name)]
        if kind == "dtmf":
            dtmf = msg.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            return [Dtmf(digit)] if isinstance(digit, str) and len(digit) == 1 else []
        if kind == "stop":
            return [Stop()]
        return []  # an event of a later protocol version: nothing to do

    def _start(self, msg: dict) -> Start:
        if self.stream_sid:
            raise BadMessage("second_start", "start was already received")
        start = msg.get("start")
        if not isinstance(start, dict):
            raise BadMessage("bad_start", "start must be an object")
        sid = start.get("streamSid") or msg.get("streamSid")
        if not isinstance(sid, str) or not 0 < len(sid) <= 64:
            raise BadMessage("bad_start", "start.streamSid must be a string")
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict) or fmt.get("encoding", ENCODING) != ENCODING or \
                fmt.get("sampleRate", RATE) != RATE or fmt.get("channels", 1) != 1:
            raise BadMessage("bad_format", f"mediaFormat must be {ENCODING}, {RATE} Hz, mono")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise BadMessage("bad_start", "start.customParameters must be an object")
        self.stream_sid = sid
        return Start(stream_id=sid, call_id=_text(start.get("callSid")),
                     account_id=_text(start.get("accountSid")),
                     parameters={str(k)[:64]: v for k, v in params.items()
                                 if isinstance(v, str) and len(v) <= 4096})

    def _media(self, media: object) -> list[Event]:
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise BadMessage("bad_media", "media.payload must be base64 μ-law")
        if media.get("track", "inbound") != "inbound":
            return []  # only the caller's track is heard (<Connect><Stream> sends no other)
        if len(media["payload"]) > MAX_PAYLOAD * 4 // 3 + 4:
            raise BadMessage("media_too_large", f"a media message over {MAX_PAYLOAD} bytes")
        try:
            ulaw = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            raise BadMessage("bad_media", "media.payload is not base64") from None
        return [Media(g711.decode(ulaw, "ulaw"))] if ulaw else []

    # --- s2s -> Twilio ---------------------------------------------------------------------
    def audio(self, pcm: bytes) -> list[str | bytes]:
        ulaw = g711.encode(pcm[: len(pcm) // 2 * 2], "ulaw")
        return [json.dumps({"event": "media", "streamSid": self.stream_sid,
                            "media": {"payload": base64.b64encode(ulaw[i:i + OUT_PIECE])
                                      .decode()}})
                for i in range(0, len(ulaw), OUT_PIECE)]

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "streamSid": self.stream_sid,
                           "mark": {"name": name}})

    def clear(self) -> str:
        return json.dumps({"event": "clear", "streamSid": self.stream_sid})


def _text(value: object) -> str:
    return value[:64] if isinstance(value, str) else ""


# --- request signatures --------------------------------------------------------------------
def signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's X-Twilio-Signature of a request to ``url`` (with form ``params``)."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
                            .digest()).decode()


def signature_valid(auth_token: str, given: str, urls: Iterable[str],
                    params: dict[str, str] | None = None) -> bool:
    """Whether ``given`` signs any of ``urls`` (the forms the request's URL may have been
    written in: scheme, with or without the default port), compared in constant time."""
    if not auth_token or not given:
        return False
    ok = False
    for url in urls:
        ok |= hmac.compare_digest(signature(auth_token, url, params).encode(), given.encode())
    return ok


def url_forms(url: str) -> list[str]:
    """``url`` as Twilio may have signed it: a stream URL is written wss://, and reaches
    us as https:// or ws:// behind a proxy; with and without an explicit default port."""
    parts = urlsplit(url)
    schemes = {"wss": ("wss", "https"), "https": ("https", "wss"), "ws": ("ws", "http"),
               "http": ("http", "ws")}.get(parts.scheme, (parts.scheme,))
    out: list[str] = []
    for scheme in schemes:
        default = 443 if scheme in ("wss", "https") else 80
        host = parts.hostname or ""
        for netloc in {parts.netloc, host if parts.port in (None, default) else parts.netloc,
                       f"{host}:{parts.port or default}"}:
            form = urlunsplit((scheme, netloc, parts.path, parts.query, ""))
            if form not in out:
                out.append(form)
    return out


def stream_twiml(stream_url: str, parameters: dict[str, str] | None = None,
                 action: str | None = None) -> str:
    """The TwiML that connects a call to s2s: a bidirectional ``<Connect><Stream>``
    (no query string in the URL: Twilio refuses one; parameters go in ``<Parameter>``);
    ``action``: the TwiML Twilio fetches when the stream ends without the call ending."""
    params = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)} />"
                     for k, v in (parameters or {}).items())
    connect = f"<Connect action={quoteattr(action)}>" if action else "<Connect>"
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Response>'
            f"{connect}<Stream url={quoteattr(stream_url)}>{params}</Stream>"
            "</Connect></Response>")


# --- who connects --------------------------------------------------------------------------
def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def request_urls(scope: dict, public_url: str) -> list[str]:
    """The URL Twilio requested, in the forms it may have signed: on ``public_url`` (the
    gateway's address as Twilio reaches it, through any proxy) when set, else on the
    request's Host."""
    path = scope.get("path", "/")
    query = scope.get("query_string", b"").decode("latin-1")
    if public_url:
        base = urlsplit(public_url)
        url = urlunsplit((base.scheme, base.netloc, base.path.rstrip("/") + path, query, ""))
    else:
        scheme = scope.get("scheme", "ws")
        url = urlunsplit((scheme, _header(scope, b"host") or "", path, query, ""))
    return url_forms(url)


def signed_principal(auth_token: str, account_sid: str, scope: dict,
                     start: Start, public_url: str) -> Principal | None:
    """The principal of a Twilio-signed stream (``twilio:<AccountSid>``); None when the
    upgrade carries no signature or no auth token is configured; AuthError when the
    signature is wrong or the stream is another account's."""
    given = _header(scope, b"x-twilio-signature")
    if given is None or not auth_token:
        return None
    if not signature_valid(auth_token, given, request_urls(scope, public_url)):
        raise AuthError("bad X-Twilio-Signature")
    if account_sid and not hmac.compare_digest(start.account_id, account_sid):
        raise AuthError("a stream of another Twilio account")
    return Principal("twilio:" + (start.account_id or "unknown"))
