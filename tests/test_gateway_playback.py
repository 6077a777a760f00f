"""Ordering rules of the gateway (gateway.playback) without Redis or sockets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from s2s.gateway import playback
from s2s.gateway.playback import Playback
from s2s.frames import ReplyAudio, ReplyText, SpeechStarted, Transcript


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


# --- speculative turns (TurnStatus) ------------------------------------------------------
def _tentative_turn(p: Playback, turn: int, clock: list[float]) -> list:
    """A speculative turn's frames as they arrive before the end of turn is confirmed."""
    from s2s.frames import Transcript, TurnStatus

    out = p.feed(SpeechStarted(sid="s", turn=turn, at_s=1.0))
    out += p.feed(TurnStatus(sid="s", turn=turn, status="tentative"))
    out += p.feed(Transcript(sid="s", turn=turn, text="What is the capital",
                             marks={"speech_end": clock[0] - 0.2}))
    out += p.feed(ReplyText(sid="s", turn=turn, seq=0, text="Paris.", final=True))
    for f in reply(turn, [2]):
        f.marks["speech_end"] = clock[0] - 0.2
        out += p.feed(f)
    return out


def test_a_tentative_turn_is_held_then_flushed_at_once_on_commit():
    from s2s.frames import TurnStatus

    clock = [100.0]
    p = Playback(turn=1, clock=lambda: clock[0])
    out = _tentative_turn(p, 2, clock)
    assert [m["type"] for m in out] == ["speech_started"]  # only the speech event passes
    clock[0] += 0.15  # the min silence confirms the end of turn
    out = p.feed(TurnStatus(sid="s", turn=2, status="committed"))
    assert [m["type"] if isinstance(m, dict) else "pcm" for m in out] == [
        "transcript", "reply_text", "audio_start", "pcm", "pcm", "reply_done"]
    start = next(m for m in out if isinstance(m, dict) and m["type"] == "audio_start")
    # voice-to-voice counts from the end of speech to when the audio is really sent
    assert start["voice_to_voice_ms"] == 350.0
    # a late duplicate "tentative" (at-least-once delivery) does not hold the turn again
    p.feed(TurnStatus(sid="s", turn=2, status="tentative"))
    assert p.feed(ReplyText(sid="s", turn=2, seq=0, text="Paris.", final=True)) == []
    assert p.feed(TurnStatus(sid="s", turn=2, status="committed")) == []


def test_a_superseded_speculation_plays_nothing_and_is_no_barge_in():
    from s2s import metrics

    clock = [100.0]
    p = Playback(turn=1, clock=lambda: clock[0])
    interrupts = metrics.INTERRUPTS._value.get()
    _tentative_turn(p, 2, clock)
    # the user went on: the next frames are of a newer turn (the whole thought)
    from s2s.frames import Transcript

    out = p.feed(Transcript(sid="s", turn=3, text="What is the capital of France?"))
    assert [m["type"] for m in out] == ["transcript"] and out[0]["turn"] == 3
    assert metrics.INTERRUPTS._value.get() == interrupts
    # old turn's frames (held or late) never reach the client
    assert p.feed(ReplyText(sid="s", turn=2, seq=1, text="x", final=True)) == []


def test_held_frames_are_bounded():
    from s2s.frames import TurnStatus

    p = Playback(turn=1)
    p.feed(TurnStatus(sid="s", turn=1, status="tentative"))
    for seq in range(playback.MAX_BUFFERED + 10):
        p.feed(ReplyText(sid="s", turn=1, seq=seq, text="x"))
    assert len(p.t.held_frames) == playback.MAX_BUFFERED and p.dropped == 10


def test_a_resumed_session_replays_a_speculative_turn_once():
    """A client that resumes on another gateway mid-reply of a committed speculative
    turn: the replay (tentative, frames, committed) skips what it already heard."""
    from s2s.frames import TurnStatus

    clock = [100.0]
    first = Playback(turn=1, clock=lambda: clock[0])
    frames = [TurnStatus(sid="s", turn=2, status="tentative"), *reply(2, [2, 1]),
              TurnStatus(sid="s", turn=2, status="committed")]
    heard = [m for f in frames[:1] + frames[-1:] + frames[1:3] for m in first.feed(f)]
    assert [m for m in heard if isinstance(m, bytes)] == [bytes([0, 0]), bytes([0, 1])]
    second = Playback(turn=2, clock=lambda: clock[0])
    assert second.resume({"turn": 2, "transcript": False, "text_next": 0,
                          "audio_next": [1, 0], "sample_rate": 16000})
    out = [m for f in frames for m in second.feed(f)]
    assert [m for m in out if isinstance(m, bytes)] == [bytes([1, 0])]
    assert [m["type"] for m in out if isinstance(m, dict)] == ["reply_done"]


def test_going_on_with_an_answered_thought_stops_the_reply_and_says_turn_resumed():
    clock = [100.0]
    p = Playback(turn=1, clock=lambda: clock[0])
    resumed = playback.RESUMED._value.get()
    frames = reply(1, [2, 1])
    p.feed(ReplyText(sid="s", turn=1, seq=0, text="Noted.", final=True))
    p.feed(frames[0])                                    # the reply to the fragment plays
    out = p.feed(SpeechStarted(sid="s", turn=2, continues=True))
    assert out == [{"type": "interrupt", "turn": 2},
                   {"type": "turn_resumed", "turn": 2, "replaced_turn": 1},
                   {"type": "speech_started", "turn": 2, "at_s": 0.0}]
    assert playback.RESUMED._value.get() == resumed + 1
    assert all(p.feed(f) == [] for f in frames[1:])      # the rest of it never goes out


def test_a_reply_played_out_is_still_replaced_without_an_interrupt():
    clock = [100.0]
    p = Playback(turn=1, clock=lambda: clock[0])
    for f in reply(1, [1]):
        p.feed(f)
    clock[0] += 5.0  # long played out: nothing to stop, but it answered a fragment
    out = p.feed(SpeechStarted(sid="s", turn=2, continues=True))
    assert [m["type"] for m in out] == ["turn_resumed", "speech_started"]


def test_a_new_thought_or_nothing_sent_is_no_resumption():
    clock = [100.0]
    p = Playback(turn=1, clock=lambda: clock[0])
    p.feed(reply(1, [2])[0])
    out = p.feed(SpeechStarted(sid="s", turn=2))          # a new thought: a plain barge-in
    assert [m["type"] for m in out] == ["interrupt", "speech_started"]
    p.feed(Transcript(sid="s", turn=2, text="I need to buy milk"))  # held by the LLM: no reply
    out = p.feed(SpeechStarted(sid="s", turn=3, continues=True))
    assert [m["type"] for m in out] == ["speech_started"]
