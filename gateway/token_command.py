"""``s2s token create``: mint a signed, expiring token for the gateway.

The token is ``s2s1.<payload>.<HMAC-SHA256>`` signed with ``S2S_TOKEN_SECRET`` (the
same secret the gateways are given); a program sends it as ``Authorization: Bearer``.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys

from s2s import config

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h, 2d)")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="print a new signed token")
    create.add_argument("--ttl", type=parse_ttl, default=3600.0,
                        help="lifetime: 90s, 30m, 1h, 2d (default 1h)")
    create.add_argument("--subject", default=None,
                        help="who the token is for: sessions are bound to it (default: random)")
    create.add_argument("--max-sessions", type=int, default=None,
                        help="concurrent sessions this token may hold (default: the gateway's)")
    create.add_argument("--audio-s-per-min", type=float, default=None,
                        help="seconds of audio per minute (default: the gateway's limit)")
    create.add_argument("--token-secret", default=None,
                        help="signing secret [env S2S_TOKEN_SECRET]")
    create.add_argument("--json", action="store_true", help="print JSON with the expiry too")


def main(args: argparse.Namespace) -> int:
    import time

    from .auth import mint_token

    secret = args.token_secret or config.load().token_secret
    if not secret:
        print("s2s token: no signing secret: set S2S_TOKEN_SECRET (the gateways need the "
              "same one)", file=sys.stderr)
        return 2
    subject = args.subject or "token-" + secrets.token_hex(6)
    now = time.time()
    token = mint_token(secret, subject, args.ttl, args.max_sessions, args.audio_s_per_min, now)
    if args.json:
        print(json.dumps({"token": token, "subject": subject, "expires": int(now + args.ttl)}))
    else:
        print(token)
    return 0
