"""Who is talking: API keys, signed expiring tokens, one-time tickets and the Origin check.

Every route authenticates with ``Authenticator.authenticate(scope)`` (HTTP or WebSocket
scope): a credential comes as ``Authorization: Bearer <credential>`` (programs) or as a
WebSocket subprotocol ``s2s.key.<credential>`` / ``s2s.ticket.<ticket>`` (browsers, which
cannot set headers on a WebSocket).  A credential is a static API key or a token minted
by ``s2s token create``: ``s2s1.<base64url(JSON payload)>.<base64url(HMAC-SHA256)>`` with
``sub``, ``exp`` and optional per-token limits.  A ticket is a short-lived, one-time
random string from ``POST /auth/ticket``, kept in Redis so any gateway can redeem it.
Credentials never travel in URLs (which proxies and servers log).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from s2s.config import Settings

log = logging.getLogger("s2s.gateway.auth")

TOKEN_PREFIX = "s2s1"
SUBPROTOCOL = "s2s"                 # the protocol name the server selects
KEY_SUBPROTOCOL = "s2s.key."        # + an API key or a signed token
TICKET_SUBPROTOCOL = "s2s.ticket."  # + a ticket from POST /auth/ticket


class AuthError(Exception):
    """A credential was presented and refused; the message says why (never the secret)."""


@dataclass(frozen=True)
class Principal:
    """Who opened a session: ``id`` is what sessions are bound to (``key:NAME`` for an API
    key, ``sub:SUBJECT`` for a token); limits of a token override the gateway's."""
    id: str
    max_sessions: int | None = None
    audio_s_per_min: float | None = None
    expires: float | None = None    # token expiry (epoch s); sessions outlive it only until then

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Principal":
        return cls(**json.loads(raw))


ANONYMOUS = Principal("anonymous")


# --- signed tokens ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(secret: str, subject: str, ttl_s: float, max_sessions: int | None = None,
               audio_s_per_min: float | None = None, now: float | None = None) -> str:
    if not secret:
        raise ValueError("no token secret: set S2S_TOKEN_SECRET")
    now = time.time() if now is None else now
    payload: dict = {"sub": subject, "iat": int(now), "exp": int(now + ttl_s)}
    if max_sessions is not None:
        payload["max_sessions"] = int(max_sessions)
    if audio_s_per_min is not None:
        payload["audio_s_per_min"] = float(audio_s_per_min)
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{TOKEN_PREFIX}.{body}".encode(), hashlib.sha256).digest()
    return f"{TOKEN_PREFIX}.{body}.{_b64(sig)}"


def verify_token(secret: str, token: str, now: float | None = None) -> Principal:
    """The token's principal; AuthError when forged, malformed or expired."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthError("malformed token")
    if not secret:
        raise AuthError("signed tokens are not accepted here (no token secret)")
    want = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    # The signature is checked before the payload is parsed: a forged token costs one HMAC,
    # never a JSON parse of whatever an anonymous caller sent.
    try:
        sig = _unb64(parts[2])
    except ValueError:
        raise AuthError("malformed token") from None
    if not hmac.compare_digest(sig, want):
        raise AuthError("bad token signature")
    try:
        payload = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AuthError("malformed token") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("sub"), str) \
            or not isinstance(payload.get("exp"), (int, float)):
        raise AuthError("malformed token")
    if payload["exp"] <= (time.time() if now is None else now):
        raise AuthError("token expired")
    max_sessions = payload.get("max_sessions")
    rate = payload.get("audio_s_per_min")
    return Principal("sub:" + payload["sub"][:128],
                     int(max_sessions) if isinstance(max_sessions, int) else None,
                     float(rate) if isinstance(rate, (int, float)) else None,
                     float(payload["exp"]))


# --- keys --------------------------------------------------------------------------------------
def parse_keys(entries: list[str]) -> dict[str, str]:
    """sha256(key) -> principal name, from ``KEY`` or ``NAME:KEY`` entries."""
    out: dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.rpartition(":")
        if not sep:
            key = entry
        digest = hashlib.sha256(key.encode()).hexdigest()
        out[digest] = name or digest[:12]
    return out


def load_keys(settings: Settings) -> dict[str, str]:
    entries = settings.api_keys.split(",") if settings.api_keys else []
    if settings.api_keys_file:
        try:
            entries += Path(settings.api_keys_file).read_text().splitlines()
        except OSError as e:
            raise SystemExit(f"cannot read S2S_API_KEYS_FILE {settings.api_keys_file!r}: {e}")
    return parse_keys(entries)


def ticket_key(ticket: str) -> str:
    """Redis holds a ticket's hash, so a dump of Redis gives no usable ticket."""
    return hashlib.sha256(ticket.encode()).hexdigest()


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class Authenticator:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.enabled = settings.auth
        self.keys = load_keys(settings) if self.enabled else {}
        self.secret = settings.token_secret
        if self.enabled and not self.keys and not self.secret:
            log.error("authentication is on but no API key or token secret is configured: "
                      "every session is refused (set S2S_API_KEYS, or S2S_AUTH=off)")

    @property
    def configured(self) -> bool:
        return not self.enabled or bool(self.keys or self.secret)

    def check(self, credential: str) -> Principal:
        """An API key or a signed token -> its principal; AuthError otherwise."""
        if not self.enabled:
            return ANONYMOUS
        if not credential:
            raise AuthError("no credential")
        if credential.startswith(TOKEN_PREFIX + "."):
            return verify_token(self.secret, credential)
        name = self.keys.get(hashlib.sha256(credential.encode()).hexdigest())
        if name is None:
            raise AuthError("unknown API key")
        return Principal("key:" + name)

    def credentials(self, scope: dict) -> tuple[str | None, str | None, str | None]:
        """(bearer credential, ticket, subprotocol to select) carried by a request."""
        cred = ticket = None
        auth = _header(scope, b"authorization")
        if auth and auth[:7].lower() == "bearer ":
            cred = auth[7:].strip()
        offered = list(scope.get("subprotocols") or [])
        for proto in offered:
            if proto.startswith(KEY_SUBPROTOCOL) and cred is None:
                cred = proto[len(KEY_SUBPROTOCOL):]
            elif proto.startswith(TICKET_SUBPROTOCOL):
                ticket = proto[len(TICKET_SUBPROTOCOL):]
        # a browser that offers subprotocols must get one of them back: it offers "s2s" too
        chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None
        return cred, ticket, chosen

    def authenticate(self, scope: dict) -> Principal | None:
        """The principal of a request's header/subprotocol credential, None when it has
        none (or auth is off: ANONYMOUS).  AuthError when one is given and refused."""
        if not self.enabled:
            return ANONYMOUS
        cred, _, _ = self.credentials(scope)
        return self.check(cred) if cred else None


def new_ticket() -> str:
    return secrets.token_urlsafe(24)


def new_api_key() -> str:
    return secrets.token_urlsafe(24)


def origin_allowed(scope: dict, settings: Settings) -> bool:
    """Browsers send Origin; programs usually do not (and are then not a CSRF vector).
    Same origin (Origin's host:port = Host) unless allowed_origins says more."""
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    allowed = [o.strip().rstrip("/") for o in settings.allowed_origins.split(",") if o.strip()]
    if "*" in allowed or origin.rstrip("/") in allowed:
        return True
    host = _header(scope, b"host")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(host) and netloc.lower() == host.lower()
