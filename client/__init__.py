"""The client role: a Python client of the gateway's protocol (``protocol``) and the
``s2s talk`` command (``talk_command``).  Installed as ``s2s.client`` (``pip install 's2s[client]'``);
it needs no model engine."""

from .protocol import (FRAME_MS, Connection, ProtocolError, TalkResult, Tracker,  # noqa: F401
                       TurnResult, talk)
