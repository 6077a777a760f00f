"""Who a call is: settled when its stream starts, from what the provider can carry.

A phone provider cannot send ``Authorization`` on its own, so a call proves itself with,
in this order:

1. the provider's request signature, when the provider has a check (Twilio: the
   ``X-Twilio-Signature`` of the WebSocket upgrade, keyed with the account's auth token,
   ``S2S_TWILIO_AUTH_TOKEN``).  A signature that is present and wrong is refused outright.
   The principal is the provider's account (``twilio:AC…``);
2. a credential (API key or ``s2s token``) in the stream's ``token`` parameter
   (``<Parameter name="token" value="…"/>``, arriving in ``start``);
3. ``Authorization: Bearer`` on the upgrade, as on ``/ws`` (programs, tests).

``CallAuthenticator`` stands in for the gateway's ``Authenticator`` in the call's session:
the session's handshake asks it as it asks the real one, and gets the principal settled
here (or the reason it was refused: ``unauthorized``, close 1008)."""

from __future__ import annotations

from typing import Callable

from ..auth import ANONYMOUS, AuthError, Authenticator, Principal
from .serializer import Start

TOKEN_PARAMETER = "token"
CALL_CREDENTIAL = "s2s.call"   # what ``credentials`` names: the principal settled at start

# (upgrade request scope, start) -> the provider-signed principal, None when the request
# carries no provider signature (or none is configured); AuthError when it is wrong
ProviderCheck = Callable[[dict, Start], "Principal | None"]


class CallAuthenticator:
    def __init__(self, base: Authenticator, scope: dict, provider_check: ProviderCheck | None):
        self.base = base
        self.scope = scope
        self.provider_check = provider_check
        self.enabled = base.enabled
        self.principal: Principal | None = None
        self.refusal = "no credential: the stream did not start"

    def establish(self, start: Start) -> None:
        try:
            self.principal = self._who(start)
        except AuthError as e:
            self.principal, self.refusal = None, str(e)
        except RecursionError:  # a token's JSON nested deeper than the parser goes
            self.principal, self.refusal = None, "malformed token"

    def _who(self, start: Start) -> Principal:
        if not self.base.enabled:
            return ANONYMOUS
        if self.provider_check is not None:
            signed = self.provider_check(self.scope, start)
            if signed is not None:
                return signed
        token = start.parameters.get(TOKEN_PARAMETER)
        if token:
            return self.base.check(token)
        bearer, _, _ = self.base.credentials(self.scope)
        if bearer:
            return self.base.check(bearer)
        raise AuthError("no credential: a provider-signed request, a token parameter "
                        '(<Parameter name="token" value="…"/>) or Authorization: Bearer')

    # --- what the session's handshake asks of an Authenticator -----------------------------
    def credentials(self, scope: dict) -> tuple[str | None, str | None, str | None]:
        return CALL_CREDENTIAL, None, None

    def check(self, credential: str) -> Principal:
        if self.principal is None:
            raise AuthError(self.refusal)
        return self.principal
