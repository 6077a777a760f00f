"""Ordering rules of the gateway (gateway.playback) without Redis or sockets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from s2s.gateway import playback
from s2s.gateway.playback import Playback
from s2s.frames import ReplyAudio, ReplyText, SpeechStarted


def reply(turn: int, pieces: list[int]) -> list[ReplyAudio]:
    """Audio of one reply: seq k has pieces[k] chunks; pcm encodes (seq, chunk)."""
    frames = []
    for seq, n in enumerate(pieces):
        for chunk in range(n):
            last = chunk == n - 1
            frames.append(ReplyAudio(sid="s", turn=turn, seq=seq, chunk=chunk, sr=16000,
                                     pcm=bytes([seq, chunk]), last=last,
                                     final=last and seq == len(pieces) - 1))
    return frames


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5).flatmap(
    lambda pieces: st.tuples(st.just(pieces),
                             st.permutations(list(range(sum(pieces)))),
                             st.lists(st.integers(0, sum(pieces) - 1), max_size=6))))
def test_any_arrival_order_with_duplicates_plays_in_order(case):
    pieces, order, dups = case
    frames = reply(1, pieces)
    arrivals = [frames[i] for i in order] + [frames[i] for i in dups]
    p = Playback(turn=1)
    out = [m for f in arrivals for m in p.feed(f)]
    audio = [m for m in out if isinstance(m, bytes)]
    assert audio == [f.pcm for f in frames]
    events = [m["type"] for m in out if isinstance(m, dict)]
    assert events == ["audio_start", "reply_done"]
    assert out[-1] == {"type": "reply_done", "turn": 1}


def test_empty_pieces_and_empty_reply():
    p = Playback(turn=2)
    out = p.feed(ReplyAudio(sid="s", turn=2, seq=0, pcm=b"", sr=22050, last=True, final=True))
    assert out == [{"type": "reply_done", "turn": 2}]  # no audio_start without audio


def test_text_in_order_once():
    p = Playback(turn=1)
    t = lambda seq, final=False: ReplyText(sid="s", turn=1, seq=seq, text=f"t{seq}",  # noqa
                                           final=final)
    assert p.feed(t(1)) == []
    out = p.feed(t(0)) + p.feed(t(0)) + p.feed(t(2, final=True)) + p.feed(t(3))
    assert [m["text"] for m in out] == ["t0", "t1", "t2"] and out[-1]["final"]


def test_newer_turn_interrupts_only_an_active_reply():
    now = [100.0]
    p = Playback(turn=1, clock=lambda: now[0])
    assert [m["type"] for m in p.feed(SpeechStarted(sid="s", turn=2))] == ["speech_started"]
    frames = reply(2, [2])
    p.feed(frames[0])                                   # reply being sent
    out = p.feed(SpeechStarted(sid="s", turn=3))
    assert [m["type"] for m in out] == ["interrupt", "speech_started"]
    assert p.feed(frames[1]) == []                      # old turn: dropped
    assert p.turn == 3


def test_missing_piece_is_skipped_after_a_while(monkeypatch):
    now = [0.0]
    p = Playback(turn=1, clock=lambda: now[0])
    frames = reply(1, [1, 1, 1])
    assert p.feed(frames[1]) == [] and p.feed(frames[2]) == []
    assert p.check_gaps() == []
    now[0] = playback.GAP_TIMEOUT_S + 1
    out = p.check_gaps()
    assert [m for m in out if isinstance(m, bytes)] == [frames[1].pcm, frames[2].pcm]
    assert out[-1]["type"] == "reply_done"


def test_mixed_rates_are_resampled_to_the_first():
    p = Playback(turn=0)
    a = ReplyAudio(sid="s", seq=0, pcm=b"\x01\x00" * 1600, sr=16000, last=True)
    b = ReplyAudio(sid="s", seq=1, pcm=b"\x01\x00" * 2205, sr=22050, last=True, final=True)
    out = p.feed(a) + p.feed(b)
    audio = [m for m in out if isinstance(m, bytes)]
    assert out[0]["sample_rate"] == 16000 and abs(len(audio[1]) - 3200) <= 4
