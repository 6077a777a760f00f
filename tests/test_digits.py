"""Digits and spelled things heard exactly: dictations synthesized by Piper and espeak-ng,
spoken in groups with pauses, streamed through the real VAD and the real STT (tiny.en,
incremental), come out as the digits and letters said; the rules that read and write
them."""

from __future__ import annotations

import numpy as np
import pytest

from s2s import config
from s2s.bench.eval_digits import DIGIT_DICTATIONS, digit_error_rate
from s2s.bench.eval_set import SR, espeak, piper_speech, trim_silence
from s2s.bench.telephony import transcribe
from s2s.bench.wer import wer
from s2s.services.stt.spoken_numbers import spoken_symbols, write_digits
from s2s.services.stt.worker import SttStage
from tests.conftest import DATA, JFK_TEXT, load_pcm16

DICTATIONS = {d[0]: d for d in DIGIT_DICTATIONS}


def test_symbols_are_read_as_a_listener_takes_them_down():
    assert "".join(spoken_symbols("1,0001 9,0002,10 0,1, 8,0003")) == "1000190002100180003"
    assert "".join(spoken_symbols("nine oh two one, double four")) == "902144"
    assert "".join(spoken_symbols("S-M-I-T-H. B7K, twenty one")) == "SMITHB7K21"
    assert "".join(spoken_symbols("The code is, well, three hundred")) == "300"
    said = "one zero zero zero one nine oh two one zero zero one eight zero three"
    assert digit_error_rate(said, "10001, 9021, 0018, 03.") == 0
    # the issue's transcript: zeros added -> 4 edits of the 15 digits said
    assert digit_error_rate(said, "1,0001 9,0002,10 0,1, 8,0003") == pytest.approx(4 / 15)


def test_dictated_digit_words_are_written_as_digits():
    cases = {
        "One zero zero zero one, nine oh two one, zero zero one eight, zero three.":
            "10001, 9021, 0018, 03.",
        "My card number is four four five. Two one eight.": "My card number is 445. 218.",
        "oh two oh seven nine four six": "0207946",
        "Nine-oh-two-one, double four": "9021, 44",
        "zero zero zero, seven.": "000, 7.",
        "B seven K, four nine, Q two": "B7K, 49, Q2",
    }
    for said, written in cases.items():
        assert write_digits(said) == written, said


def test_ordinary_words_stay_words():
    for text in ("I have one dog and two cats.", "Oh, one more thing.", "one, two, three",
                 "Call me at five. Two more.", "Plan B, two options.", "S M I T H",
                 "twenty two Baker Street", "What is two plus two?", JFK_TEXT):
        assert write_digits(text) == text


# --- real speech through the real VAD and STT -----------------------------------------
@pytest.fixture(scope="module")
def stt():
    stage = SttStage(config.load({}, environ={}))
    stage.setup()
    return stage


def spoken(pieces: list[str], pauses: list[float], say) -> np.ndarray:
    parts = []
    for i, pcm in enumerate(say(pieces)):
        parts.append(trim_silence(pcm))
        if i < len(pauses):
            parts.append(np.zeros(int(pauses[i] * SR), np.int16))
    return np.concatenate(parts)


def espeak_voice(voice: str):
    return lambda pieces: [espeak(voice, p) for p in pieces]


def heard(stt, did: str, say) -> tuple[str, str]:
    _, pieces, pauses = DICTATIONS[did]
    stt.local.clear()
    return " ".join(pieces), transcribe(stt, spoken(pieces, pauses, say), SR)


@pytest.mark.slow
def test_the_issues_phone_number_is_heard_exactly(stt):
    """The issue's dictation: incremental decoding wrote "1,0001 9,0002,10 0,1, 8,0003"."""
    said, text = heard(stt, "phone-issue", piper_speech)
    assert digit_error_rate(said, text) == 0, text
    assert "10001" in text and "9021" in text, text  # digits, as said, for the LLM


@pytest.mark.slow
@pytest.mark.parametrize("did", ["phone-uk", "pin", "account"])
def test_piper_dictations_are_heard_exactly(stt, did):
    said, text = heard(stt, did, piper_speech)
    assert digit_error_rate(said, text) == 0, text


@pytest.mark.slow
@pytest.mark.parametrize("did,voice", [
    ("account", "en-us"), ("confirmation", "en-us"), ("phone-us", "en-gb"),
    ("account", "en-gb")])
def test_dictations_in_espeak_voices_are_heard_exactly(stt, did, voice):
    """"confirmation": letters among the digits ("B seven K, four nine, Q two")."""
    said, text = heard(stt, did, espeak_voice(voice))
    assert digit_error_rate(said, text) == 0, text


@pytest.mark.slow
def test_ordinary_speech_is_unchanged(stt):
    """jfk.wav with its pauses, through the VAD and the incremental STT: as accurate as
    with whisper's own numerals, and nothing in it is taken for digits."""
    stt.local.clear()
    text = transcribe(stt, load_pcm16(DATA / "jfk.wav"), SR)
    assert wer(JFK_TEXT, text) <= 0.05, text
    assert not any(c.isdigit() for c in text), text
