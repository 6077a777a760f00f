"""The turn-taking groups of the evaluation set (issue 19): what the user says, where
they pause, and what they say over the assistant's reply.

- ``statements``: finished statements, no pause inside: real recordings (jfk.wav whole,
  cuts of lecture.wav) and synthetic ones in several voices.  Judged on v2v latency.
- ``sentence-first``: dictations whose first piece is a whole sentence, then a pause
  (0.6-1.2 s), then more: a reply heard before the last piece is an early answer.
- ``resumed``: a thought with a pause long enough to be answered (1.5-2.5 s), then more
  while the reply may be playing: the reply must stop quickly and the whole thought
  get one answer.
- ``backchannel``: a question with a long answer; while its audio is heard the user says
  "mm-hmm" (must not stop it) or "wait", "stop", "no", a sentence (must stop it).
- ``digits``: the digits bench's dictations (bench/eval_digits.py), each in two voices,
  every voice speaking several (digit error rate).
- ``long``: sessions of 6+ turns, ours and the replies bench's (bench/eval_replies.py):
  echo and repeat rates of the replies.
"""

from __future__ import annotations

from dataclasses import replace

from .eval_set import Conversation, Turn

P, E1, E2, E3 = "piper", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3"
E4, E5 = "espeak:en-gb-scotland", "espeak:en-029"
VOICES = [P, E1, E2, E3, E4, E5]  # every voice the set speaks with

# (start, end) s of lecture.wav where one stretch of speech sits between pauses of 0.5 s
# or more (an energy cut of the file; tests/data/README.md): a real speaker's statement
LECTURE_CUTS = [(0.0, 1.95), (9.25, 15.8), (39.85, 43.2), (51.05, 54.1), (54.5, 59.3)]

STATEMENTS = [
    (P, "The horizon seems extremely distant today."),
    (P, "I finally finished painting the kitchen yesterday."),
    (E1, "My sister moved to a small town near the sea."),
    (E1, "The train was late again this morning."),
    (E2, "I have been learning to play the piano."),
    (E2, "Our garden is full of tomatoes this summer."),
    (E3, "I think I left my umbrella at the office."),
    (E4, "The new bakery on the corner sells great bread."),
    (E5, "We are planning a trip to the mountains next month."),
]

SENTENCE_FIRST = [  # (voice, pieces, pauses): the first piece ends a sentence
    (P, ["I need a taxi to the airport.", "Tomorrow at six in the morning."], [0.9]),
    (E1, ["Please write down my address.", "It is twelve Oak Road", "in Leeds."], [1.0, 0.7]),
    (E2, ["I want to order a pizza.", "A large one with mushrooms and olives."], [1.1]),
    (E3, ["Set a reminder for me.", "Call the dentist on Monday."], [0.8]),
    (P, ["My flight was cancelled.", "Can you find me another one for tonight?"], [1.2]),
    (E4, ["I am making a shopping list.", "Apples, rice and two bottles of milk."], [0.9]),
    (E5, ["Let me tell you about my day.", "I went to the market and bought fish."], [1.0]),
]

RESUMED = [  # (voice, first thought, pause, what follows while a reply may play)
    (P, "I would like to book a table for two.", 2.0, "at the Italian place on Friday night"),
    (E1, "Tell me a fact about the moon.", 2.2, "something most people do not know"),
    (E2, "I am looking for a good book.", 1.8, "ideally a mystery set in London"),
    (E3, "What should I cook tonight?", 2.5, "I have chicken, rice and some spinach"),
    (P, "Recommend a film for me.", 1.5, "one that my kids would enjoy too"),
    (E4, "I want to learn a new language.", 2.0, "which one is the easiest for English speakers"),
]

LONG_QUESTIONS = [  # asked with a long reply in mind: the cue is said over that reply
    "Tell me about the history of the Roman Empire.",
    "Explain how airplanes are able to fly.",
    "Describe what a typical day of a farmer looks like.",
    "Tell me how to plan a trip to Japan.",
    "Explain why the seasons change during the year.",
    "Tell me about the life of Albert Einstein.",
]
# "mm-hmm" spelled so that espeak-ng and Piper say it ("mm-hmm" they read as "em em hum")
BACKCHANNELS = ["hmm-hmm", "yeah", "okay", "right", "uh-huh"]
INTERRUPTIONS = ["wait", "stop", "no", "Sorry, can you tell me about Greece instead?"]

LONG_SESSIONS = [  # 6+ turns each: later replies must neither echo nor repeat earlier ones
    [("Hi, my name is Sam.",), ("I live in a small flat in Manchester.",),
     ("What is a good hobby for a rainy day?",), ("I do not like reading very much.",),
     ("Do you know any board games?",), ("What was my name again?",)],
    [("I am planning a birthday party.",), ("It is for my daughter, she turns seven.",),
     ("What food should I make?",), ("She does not like cake.",),
     ("How many children should I invite?",), ("Thank you, that helps a lot.",)],
    [("The horizon seems extremely distant.",), ("I am sitting on a beach right now.",),
     ("Why is the sea salty?",), ("Is it safe to swim after eating?",),
     ("What is the biggest fish in the ocean?",), ("Tell me something funny about fish.",),
     ("Okay, I should go home now.",)],
]


def conversations() -> list[Conversation]:
    out: list[Conversation] = []
    out.append(Conversation("statement-jfk", "statements", "recording",
                            [Turn(["jfk"], recording="jfk.wav", reference=JFK,
                                  # its pauses (~1 s) are mid-thought: early audio counts
                                  starts=[0.3, 3.3, 5.4, 8.2])], "jfk"))
    for i, span in enumerate(LECTURE_CUTS):
        out.append(Conversation(f"statement-lecture-{i}", "statements", "recording",
                                [Turn(["lecture"], recording="lecture.wav", span=span)],
                                "recorded"))
    for i, (voice, text) in enumerate(STATEMENTS):
        out.append(Conversation(f"statement-{i}", "statements", voice, [Turn([text])],
                                "synthetic"))
    for i, (voice, pieces, pauses) in enumerate(SENTENCE_FIRST):
        out.append(Conversation(f"sentence-first-{i}", "sentence-first", voice,
                                [Turn(pieces, pauses)]))
    for i, (voice, first, pause, rest) in enumerate(RESUMED):
        out.append(Conversation(f"resumed-{i}", "resumed", voice,
                                [Turn([first, rest], [pause])]))
    cues = [(c, "backchannel") for c in BACKCHANNELS] + [(c, "interruption")
                                                         for c in INTERRUPTIONS]
    for i, (cue, kind) in enumerate(cues):
        voice = VOICES[i % len(VOICES)]
        out.append(Conversation(f"{kind}-{i}", "backchannel", voice, [Turn(
            [LONG_QUESTIONS[i % len(LONG_QUESTIONS)]], cue=cue, cue_kind=kind,
            cue_voice=VOICES[(i + 1) % len(VOICES)])], kind))
    for i, (name, pieces, pauses) in enumerate(digit_dictations()):
        for voice in (VOICES[i % len(VOICES)], VOICES[(i + 3) % len(VOICES)]):  # every voice
            out.append(Conversation(f"digits-{name}-{voice.replace(':', '-')}", "digits",
                                    voice, [Turn(pieces, pauses)]))
    for i, session in enumerate(LONG_SESSIONS):
        voice = VOICES[i % len(VOICES)]
        out.append(Conversation(f"long-{i}", "long", voice, [Turn([t[0]]) for t in session]))
    return out


JFK = ("And so my fellow Americans, ask not what your country can do for you, "
       "ask what you can do for your country.")


def digit_dictations() -> list[tuple[str, list[str], list[float]]]:
    """The digits bench's dictations (bench/eval_digits.py): numbers, codes, spelled names."""
    from .eval_digits import DIGIT_DICTATIONS

    return DIGIT_DICTATIONS


def reply_sessions() -> list[Conversation]:
    """The replies bench's sessions of 6+ turns (bench/eval_replies.py), spoken: imported
    when the ``long`` group is run (that module loads the LLM stage's code)."""
    from .eval_replies import REPLY_SESSIONS

    return [replace(c, id=f"long-{c.id}", group="long") for c in REPLY_SESSIONS
            if len(c.turns) >= 6]
