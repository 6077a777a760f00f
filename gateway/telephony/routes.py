"""The telephony routes of the gateway: ``/telephony/twilio`` (the Media Streams WebSocket
a TwiML ``<Connect><Stream>`` points at) and ``/telephony/twilio/twiml`` (the TwiML a
Twilio number's "A call comes in" webhook fetches: that stream, on this gateway).
docs/telephony.md says how to wire a number to them."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from s2s import metrics
from s2s.config import Settings

from ..auth import Principal, origin_allowed
from ..context import GatewayContext
from ..session import ClientSession
from .auth import CallAuthenticator
from .serializer import Start
from .socket import TelephonySocket
from .twilio import (TwilioSerializer, request_urls, signature_valid, signed_principal,
                     stream_twiml)

log = logging.getLogger("s2s.gateway.telephony")

TWILIO_STREAM = "/telephony/twilio"
TWILIO_TWIML = "/telephony/twilio/twiml"
MAX_WEBHOOK_BYTES = 64 * 1024
MAX_RECONNECTS = 2     # a stream that dropped is connected again at most this often


def telephony_routes(settings: Settings, context: Callable[[], GatewayContext]) -> list:
    """``context``: the app's GatewayContext, made once the app has started."""

    def twilio_check(scope: dict, start: Start) -> Principal | None:
        return signed_principal(settings.twilio_auth_token, settings.twilio_account_sid,
                                scope, start, settings.telephony_public_url)

    async def twilio_stream(ws: WebSocket) -> None:
        if not origin_allowed(ws.scope, settings):  # a foreign web page: no session
            metrics.REJECTED.labels("forbidden_origin").inc()
            await ws.close(code=1008)
            return
        ctx = context()
        auth = CallAuthenticator(ctx.auth, ws.scope, twilio_check)
        call = TelephonySocket(ws, TwilioSerializer(), settings, auth, bus=ctx.bus)
        await ClientSession(call, dataclasses.replace(ctx, auth=auth)).run()

    async def twilio_twiml(request: Request) -> Response:
        """Twilio's voice webhook (form POST, signed): the TwiML that streams the call
        here.  ``<Connect action>`` brings a stream that dropped (its gateway died) back
        through this route, to whichever gateway answers, where the call's session
        resumes; ``reconnect`` counts those, so a call refused for good is hung up."""
        if not settings.twilio_auth_token:
            return _refused("unauthorized", "set S2S_TWILIO_AUTH_TOKEN: the TwiML webhook "
                            "answers Twilio-signed requests only", 403)
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            return _refused("message_too_large", "webhook body too large", 413)
        params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        given = request.headers.get("x-twilio-signature", "")
        if not signature_valid(settings.twilio_auth_token, given,
                               request_urls(request.scope, settings.telephony_public_url),
                               params):
            return _refused("unauthorized", "bad X-Twilio-Signature", 403)
        if settings.twilio_account_sid and params.get("AccountSid") != settings.twilio_account_sid:
            return _refused("unauthorized", "a call of another Twilio account", 403)
        try:
            reconnect = int(request.query_params.get("reconnect", "0"))
        except ValueError:
            reconnect = MAX_RECONNECTS
        if reconnect >= MAX_RECONNECTS:
            return _xml('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Hangup/></Response>')
        base = _public_base(request, settings)
        stream = urlunsplit(("wss" if base.scheme in ("https", "wss") else "ws", base.netloc,
                             base.path.rstrip("/") + TWILIO_STREAM, "", ""))
        action = urlunsplit((base.scheme if base.scheme in ("http", "https") else "https",
                             base.netloc, base.path.rstrip("/") + TWILIO_TWIML,
                             f"reconnect={reconnect + 1}", ""))
        return _xml(stream_twiml(stream, action=action))

    return [WebSocketRoute(TWILIO_STREAM, twilio_stream),
            Route(TWILIO_TWIML, twilio_twiml, methods=["POST"])]


def _public_base(request: Request, settings: Settings):
    if settings.telephony_public_url:
        return urlsplit(settings.telephony_public_url)
    return urlsplit(f"{request.url.scheme}://{request.headers.get('host', '')}")


def _xml(text: str) -> Response:
    return Response(text, media_type="text/xml", headers={"Cache-Control": "no-store"})


def _refused(code: str, message: str, status: int) -> Response:
    metrics.REJECTED.labels(code).inc()
    log.warning("refused %s: %s %s", TWILIO_TWIML, code, message)
    return JSONResponse({"error": code, "message": message}, status_code=status)
