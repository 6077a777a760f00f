"""Resuming a session (docs/protocol.md, "Resuming"): who may, what happens to a
connection the session is still open on, whether the session needs a new VAD owner, and
from where its output stream is replayed."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from s2s.bus import Bus, entry_order
from s2s.frames import FrameError, SessionEnd, decode

from .errors import POLICY, Reject

log = logging.getLogger("s2s.gateway")

RESUME_WAIT_S = 5.0         # how long a resume waits for the old VAD owner to let go
REPLACE_WAIT_S = 3.0        # how long it waits for the connection it replaces to end
REPLAY_SCAN = 500           # output entries a resume looks back for the current turn


async def check_owner(bus: Bus, sid: str, principal_id: str) -> None:
    """Only the principal that opened a session may resume it.  Unknown, expired,
    client-made and another principal's ids get one answer, so ids cannot be probed."""
    owner = await bus.session_principal(sid)
    if owner is None or not secrets.compare_digest(owner, principal_id):
        raise Reject("unknown_session", "no session with this id for these credentials; "
                     "omit session_id to open a new one", POLICY)


async def replace_open(old: Any) -> None:
    """The session is open on this gateway on another connection (the same client, whose
    old socket has not noticed it is dead): that connection ends, the session does not."""
    if old is not None and old.task is not None:
        old.replaced = True
        old.task.cancel()
        await asyncio.wait({old.task}, timeout=REPLACE_WAIT_S)


async def needs_vad_owner(bus: Bus, sid: str) -> bool:
    """Audio stream absent -> open it; its last entry a SessionEnd (the session was
    closed) -> wait until the old VAD owner has read it, then open anew; otherwise a VAD
    owner still reads it (the old gateway died): no second open."""
    last = await bus.last_audio(sid)
    if not last:
        return True
    end_id, data = last
    try:
        ended = isinstance(decode(data), SessionEnd)
    except FrameError:
        ended = False
    if not ended:
        return False
    open_id = await bus.session_open_id(sid)
    deadline = time.monotonic() + RESUME_WAIT_S
    while time.monotonic() < deadline:
        pos = await bus.vad_position(sid)
        if pos is not None and entry_order(pos) >= entry_order(end_id):
            break
        state = await bus.session_entry_state(open_id) if open_id else "gone"
        if state != "owned":  # no VAD worker holds the session: nobody to wait for
            log.info("no VAD owner to release the ended session (its entry is %s)", state,
                     extra={"sid": sid})
            await bus.force_vad_release(sid, end_id)
            break
        await asyncio.sleep(0.05)
    else:
        log.warning("old VAD owner did not release the session in time", extra={"sid": sid})
        await bus.force_vad_release(sid, end_id)
    return True


async def replay_from(bus: Bus, sid: str, turn: int) -> bytes:
    """Where to start reading the output stream: after the last frame of an older turn,
    so a resumed session gets the current turn (a reply in flight) again from its start
    and nothing older."""
    entries = await bus.out_tail(sid, REPLAY_SCAN)
    for entry_id, data in entries:
        try:
            if decode(data).turn < turn:
                return entry_id
        except FrameError:
            continue
    if len(entries) < REPLAY_SCAN:
        return b"0-0"  # the whole stream is of the current turn
    return entries[-1][0]
