"""The opening of a native session: the client's ``hello`` (its fields checked) and who
is talking (a credential in the upgrade request, or a ticket or token in the hello)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from s2s.bus import REDIS_DOWN, Bus

from . import messages
from .auth import ANONYMOUS, AuthError, Authenticator, Principal, ticket_key
from .errors import POLICY, TRY_LATER, UNSUPPORTED, Reject

log = logging.getLogger("s2s.gateway")

HELLO_TIMEOUT_S = 10.0
DEFAULT_OUT_SR = 22050      # the default voice's own rate


@dataclass
class Hello:
    principal: Principal
    in_sr: int = 16000
    out_sr: int = DEFAULT_OUT_SR
    requested: str | None = None   # the session a resume names
    ticket: str | None = None      # the ticket it came with (names the ticket's cell)
    fields: dict = field(default_factory=dict)  # the hello as sent: audio_marks, heard

    @property
    def audio_marks(self) -> bool:
        return self.fields.get("audio_marks") is True


class Handshake:
    """Reads one hello; ``bus_for(key)`` is the bus of the cell a ticket names."""

    def __init__(self, auth: Authenticator, scope: dict, bus_for: Callable[[str], Bus],
                 max_message_bytes: int):
        self.auth, self.scope, self.bus_for = auth, scope, bus_for
        self.max_message_bytes = max_message_bytes

    async def hello(self, msg: dict) -> Hello:
        """The first message, checked and authenticated; Reject when it is refused."""
        if msg.get("text") is None:
            raise Reject("audio_before_hello", 'the first message must be a text '
                         '{"type": "hello", ...}', UNSUPPORTED)
        hello = messages.parse_text(msg["text"], self.max_message_bytes)
        if hello["type"] != "hello":
            raise Reject("bad_hello", 'the first message must be {"type": "hello", ...}', POLICY)
        principal, ticket = await self._authenticate(hello)
        return Hello(principal=principal, in_sr=messages.rate(hello, "sample_rate", 16000),
                     out_sr=messages.rate(hello, "output_sample_rate", DEFAULT_OUT_SR),
                     requested=messages.requested_session(hello), ticket=ticket, fields=hello)

    async def _authenticate(self, hello: dict) -> tuple[Principal, str | None]:
        """The header/subprotocol credential, else a ticket or token in the hello."""
        cred, ticket, _ = self.auth.credentials(self.scope)
        try:
            if not self.auth.enabled:
                return ANONYMOUS, None
            if cred:
                return self.auth.check(cred), None
            if ticket is None and isinstance(hello.get("ticket"), str):
                ticket = hello["ticket"]
            if ticket:
                raw = await self.bus_for(ticket).take_ticket(ticket_key(ticket[:200]))
                if raw is None:
                    raise AuthError("unknown, used or expired ticket")
                return Principal.from_json(raw), ticket
            if isinstance(hello.get("token"), str):
                return self.auth.check(hello["token"]), None
            raise AuthError("no credential: send Authorization: Bearer KEY, a ticket or a token")
        except AuthError as e:
            raise Reject("unauthorized", str(e), POLICY) from None
        except RecursionError:  # a token's JSON nested deeper than the parser goes
            raise Reject("unauthorized", "malformed token", POLICY) from None
        except REDIS_DOWN as e:  # a ticket lives in Redis
            log.warning("Redis unavailable at authentication: %s", e)
            raise Reject("unavailable", "the service is unavailable; try again later",
                         TRY_LATER) from None
