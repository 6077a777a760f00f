"""Writes of a session owner are fenced by ownership, against a real redis-server.

A VAD worker cut off from Redis keeps the commands it sent in its kernel's send queue;
they arrive when its link comes back, after another worker took its session over
(tests/test_multihost.py cuts a real link).  Here the late commands are played by
hand: the old owner's writes, checked where they land, must change nothing."""

from __future__ import annotations

from s2s import keys
from s2s.bus import Bus, Owner
from s2s.frames import SessionOpen, SpeechStarted, decode, encode


async def _session_entry(bus: Bus, sid: str) -> bytes:
    await bus.ensure_group(keys.SESSIONS, "vad")
    entry_id = await bus.redis.xadd(keys.SESSIONS, {b"f": encode(SessionOpen(sid=sid))})
    got = await bus.read_group(keys.SESSIONS, "vad", "old", 1, 0)
    assert [eid for eid, _ in got] == [entry_id]
    return entry_id


async def test_a_taken_over_owner_writes_nothing(settings):
    bus = Bus(settings)
    sid = "fenced-session"
    try:
        entry_id = await _session_entry(bus, sid)
        old = Owner(keys.SESSIONS, "vad", "old", entry_id)
        new = Owner(keys.SESSIONS, "vad", "new", entry_id)

        # while it owns the session, its event and its resume point go through
        ids = await bus.emit_owned(old, SpeechStarted(sid=sid, turn=1, at_s=0.5))
        assert ids and len(ids) == 1
        assert await bus.save_session_state(old, sid, b"5-0", '{"turn": 1}')
        assert await bus.session_resume(sid) == (b"5-0", b'{"turn": 1}')
        # the new owner (none yet) is refused
        assert await bus.emit_owned(new, SpeechStarted(sid=sid, turn=1)) is None

        # another worker takes the session over ...
        assert await bus.claim(keys.SESSIONS, "vad", "new", [entry_id], 0)
        assert await bus.save_session_state(new, sid, b"9-0", '{"turn": 2}')
        before = await bus.out_tail(sid, 10)

        # ... and the old owner's late commands arrive: refused, nothing changed
        assert await bus.emit_owned(old, SpeechStarted(sid=sid, turn=3, at_s=2.9)) is None
        assert not await bus.save_session_state(old, sid, b"5-0", '{"turn": 1}')
        assert not await bus.save_session_state(old, sid, b"5-0", None)
        assert await bus.out_tail(sid, 10) == before
        assert await bus.session_resume(sid) == (b"9-0", b'{"turn": 2}')

        # the new owner's writes go on; the out stream keeps its TTL
        ids = await bus.emit_owned(new, SpeechStarted(sid=sid, turn=3, at_s=2.9))
        newest = (await bus.out_tail(sid, 1))[0]
        assert newest[0] == ids[0] and decode(newest[1]).turn == 3
        assert 0 < await bus.redis.ttl(keys.out(sid)) <= settings.session_ttl_s

    finally:
        await bus.close()


async def test_an_owner_that_survived_an_empty_redis_goes_on(settings):
    """Redis restarted empty (no persistence): the session entry is pending to nobody,
    the stream and group are gone.  The owner still reading the session's audio is its
    only owner: its writes go through (tests/test_failover.py restarts a real server)."""
    bus = Bus(settings)
    sid = "survivor-session"
    try:
        entry_id = await _session_entry(bus, sid)
        owner = Owner(keys.SESSIONS, "vad", "old", entry_id)
        await bus.redis.flushdb()
        assert await bus.emit_owned(owner, SpeechStarted(sid=sid, turn=1, at_s=0.5))
        assert await bus.save_session_state(owner, sid, b"7-0", '{"turn": 1}')
        assert await bus.advance_turn(sid, owner) == 1
        await bus.ensure_group(keys.SESSIONS, "vad")  # recreated, the entry not in it
        assert await bus.emit_owned(owner, SpeechStarted(sid=sid, turn=2, at_s=1.5))
        assert await bus.advance_turn(sid, owner) == 2
    finally:
        await bus.close()


async def test_the_end_of_a_session_drops_its_state(settings):
    bus = Bus(settings)
    sid = "ending-session"
    try:
        entry_id = await _session_entry(bus, sid)
        owner = Owner(keys.SESSIONS, "vad", "old", entry_id)
        assert await bus.save_session_state(owner, sid, b"3-0", '{"turn": 1}')
        assert await bus.save_session_state(owner, sid, b"4-0", None)
        assert await bus.session_resume(sid) == (b"4-0", None)
    finally:
        await bus.close()


async def test_a_taken_over_owner_cannot_change_the_turn(settings):
    import pytest

    from s2s.bus import OwnershipLost

    bus = Bus(settings)
    sid = "turn-fenced"
    try:
        entry_id = await _session_entry(bus, sid)
        old = Owner(keys.SESSIONS, "vad", "old", entry_id)
        assert await bus.advance_turn(sid, old) == 1
        await bus.claim(keys.SESSIONS, "vad", "new", [entry_id], 0)
        with pytest.raises(OwnershipLost):
            await bus.advance_turn(sid, old)
        assert await bus.current_turn(sid) == 1
        assert await bus.advance_turn(sid, Owner(keys.SESSIONS, "vad", "new", entry_id)) == 2
        assert 0 < await bus.redis.ttl(keys.turn(sid)) <= settings.session_ttl_s
    finally:
        await bus.close()
