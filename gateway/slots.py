"""The per-principal session slots this gateway holds (``S2S_PRINCIPAL_MAX_SESSIONS``).

Admission counts a new session at once (``Admission.admit``), before its client has its
``ready``; the slot is given back the moment the session ends, before its client can see
the close, so a client that reconnects at once is never refused because of itself.  A
session that never became real (its client vanished during the hello or the opening)
gives its slot back as soon as the gateway notices; and when the same principal opens a
new session, the slots of its sessions that are already over here are given back first,
and sessions of it still opening are waited for (briefly), so that what admission counts
is the sessions that are really there.  A real session whose client vanished still ends
as before and stays resumable for its keys' lifetime: a resume takes no new slot.

The admission loop registers this gateway's open sessions every tick; one that ended
while a tick was registering could be counted again for ``LIVE_MAX_AGE_S``, so a slot is
given back a second time a little later."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from s2s.bus import Bus

from .auth import Principal

if TYPE_CHECKING:
    from .admission import Admission, Refusal

log = logging.getLogger("s2s.gateway")

SETTLE_S = 2.0          # how long a new session waits for its principal's opening ones
RELEASE_AGAIN_S = 1.5   # past an admission tick's registration (one tick, one round trip)
RELEASE_TIMEOUT_S = 2.0


@dataclass
class _Slot:
    principal: str
    bus: Bus
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ready sent, or released


class Slots:
    """One per gateway.  ``sessions`` is the gateway's registry (sid -> ClientSession)."""

    def __init__(self, admission: "Admission | None", sessions: dict[str, Any]):
        self.admission = admission
        self.sessions = sessions
        self.held: dict[str, _Slot] = {}
        self.locks: dict[str, list] = {}  # principal -> [its admission lock, users]
        self.later: set[asyncio.Task] = set()

    async def admit(self, principal: Principal, sid: str, bus: Bus) -> "Refusal | None":
        """Admission's decision on a new session, after reclaiming what is over.  New
        sessions of one principal are decided one at a time here, each once the previous
        one is settled: a burst of hellos whose clients vanish cannot fill the slots just
        before the good one is counted."""
        entry = self.locks.setdefault(principal.id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                await self.reclaim(principal.id)
                if self.admission is not None:
                    refusal = await self.admission.admit(principal, sid)
                    if refusal is not None:
                        return refusal
                self.held[sid] = _Slot(principal.id, bus)
                return None
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self.locks[principal.id]

    def hold(self, sid: str, principal: Principal, bus: Bus) -> None:
        """A resumed session: admission's tick counts it from now on, like any open one."""
        self.held.setdefault(sid, _Slot(principal.id, bus)).settled.set()

    def settled(self, sid: str) -> None:
        """The client has its ``ready``: the slot is a real session's."""
        slot = self.held.get(sid)
        if slot is not None:
            slot.settled.set()

    async def release(self, sid: str) -> None:
        """The session is over here (not replaced): no longer counted.  Idempotent."""
        slot = self.held.pop(sid, None)
        if slot is None:
            return
        slot.settled.set()
        await self._unregister(slot, sid)
        task = asyncio.get_running_loop().create_task(self._release_again(slot, sid))
        self.later.add(task)
        task.add_done_callback(self.later.discard)

    def forget(self, sid: str) -> None:
        """The session went on elsewhere (resumed on another gateway): not ours to give
        back; a resume here holds it again."""
        slot = self.held.pop(sid, None)
        if slot is not None:
            slot.settled.set()

    async def reclaim(self, principal_id: str) -> None:
        """Before a new session of ``principal_id`` is counted: give back the slots of its
        sessions that ended here but have not yet done so themselves, and wait for those
        still opening to become real or end."""
        over = [sid for sid, slot in self.held.items() if slot.principal == principal_id
                and _is_over(self.sessions.get(sid))]
        for sid in over:
            await self.release(sid)
        opening = [slot.settled.wait() for slot in self.held.values()
                   if slot.principal == principal_id and not slot.settled.is_set()]
        if opening:
            waiters = [asyncio.ensure_future(w) for w in opening]
            await asyncio.wait(waiters, timeout=SETTLE_S)
            for w in waiters:
                w.cancel()

    async def close(self) -> None:
        for task in list(self.later):
            task.cancel()
        await asyncio.gather(*self.later, return_exceptions=True)

    async def _release_again(self, slot: _Slot, sid: str) -> None:
        await asyncio.sleep(RELEASE_AGAIN_S)
        if sid in self.held:  # resumed here meanwhile: counted again, rightly
            return
        await self._unregister(slot, sid)

    async def _unregister(self, slot: _Slot, sid: str) -> None:
        try:
            await asyncio.wait_for(slot.bus.unregister_session(sid, slot.principal),
                                   RELEASE_TIMEOUT_S)
        except (Exception, asyncio.TimeoutError) as e:  # it ages out of s2s:live (30 s)
            log.warning("could not release the session's slot: %s", e, extra={"sid": sid})


def _is_over(session: Any) -> bool:
    """A session whose connection is gone (and that no newer connection took over)."""
    return session is not None and session.closed and not session.replaced
