"""The client role: a Python client of the gateway's protocol (``protocol``), of its
OpenAI Realtime endpoint (``realtime``), the one parser of gateway URLs (``url``) and the
``s2s talk`` command (``talk_command``).
Installed as ``s2s.client`` (``pip install 's2s[client]'``); it needs no model engine."""

from .protocol import (FRAME_MS, Connection, ProtocolError, TalkResult, Tracker, TurnResult,
                       talk)
from .url import GatewayURL, GatewayURLError, gateway_url

__all__ = ["FRAME_MS", "Connection", "GatewayURL", "GatewayURLError", "ProtocolError",
           "TalkResult", "Tracker", "TurnResult", "gateway_url", "talk"]
