"""Do replies answer?  A fast text-level bench of the LLM stage's replies (issue 19):
long sessions (6-8 turns of questions, statements, requests and small talk) run
through the stage's own reply path in-process (history.py builds the prompt, the
backend generates, replies.SpokenText hears the text as the worker speaks it), with
the real model and no Redis, no audio.

    python -m s2s.bench.eval_replies                      # the current settings
    python -m s2s.bench.eval_replies --variant before:llm_avoid_reply_ngram=0 \\
        --variant "fewer:llm_history_turns=2;llm_avoid_reply_ngram=0" --variant after: \\
        --show --out /tmp/replies.json                    # compare settings

Scores (bench/reply_metrics.py): echo rate (the reply's first sentence repeats most of
what the user said), repeat rate (a reply nearly the same as an earlier one of the
session), keyword accuracy of the sessions' factual turns, and of the eval set's
factual and multi-turn conversations (bench/eval_set.py) as text.  Sessions run
side by side (``--parallel``), as a worker's sessions do: their tokens are batched.

``REPLY_SESSIONS`` are eval_set Conversations (group ``sessions``), so the spoken
eval (bench/eval.py) can run them too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace

from s2s import config
from s2s.services.llm import history
from s2s.services.llm.backends import create
from s2s.services.llm.replies import SpokenText
from s2s.services.llm.tools import ToolRegistry, ToolSet
from s2s.services.llm.tools.turns import ToolTurns

from .eval import has_keywords
from .eval_set import CONVERSATIONS, JFK_TEXT, Conversation, Turn
from .reply_metrics import echoes, repeats_earlier, session_rates

P, E1, E2, E3 = "piper", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3"
JFK = Turn([JFK_TEXT], recording="jfk.wav", starts=[0.3, 3.3, 5.4, 8.2])


def _s(id: str, voice: str, *turns: str | tuple | Turn) -> Conversation:
    """A session: each turn a text, a (text, keyword group, ...) tuple, or a Turn."""
    out = []
    for t in turns:
        if isinstance(t, Turn):
            out.append(t)
        elif isinstance(t, tuple):
            out.append(Turn([t[0]], keywords=list(t[1:])))
        else:
            out.append(Turn([t]))
    return Conversation(id, "sessions", voice, out)


REPLY_SESSIONS: list[Conversation] = [
    # the run: a dinner answer copied to the speech, the spider and the tea
    _s("dinner-copy", P, "Hello there.", "What should I cook for dinner tonight?", JFK,
       ("How many legs does a spider have?", ("eight", "8")), "How do I make a cup of tea?",
       "Thanks, that helps.", ("What is the capital of France?", ("paris",))),
    _s("horizon", E1, "The horizon seems extremely distant.", "I like watching the sea.",
       ("What color is the sea?", ("blue",)), "My favorite season is summer.",
       ("Which season do I like?", ("summer",)), "Goodbye for now."),
    _s("shopping", E2, "I need to buy milk.", "I also need some bread.",
       "What can I make with eggs?", ("How many eggs are in a dozen?", ("twelve", "12")),
       "The shop closes at six.", ("When does the shop close?", ("six", "6"))),
    _s("weekend", E3, "Good morning!", "I went hiking last weekend.",
       "The mountains were beautiful.",
       ("What is the tallest mountain in the world?", ("everest",)),
       "I am a little tired today.", "Can you suggest something relaxing?", "Thank you."),
    _s("pets", P, "I have a cat named Luna.", "She is three years old.",
       ("What is my cat called?", ("luna",)), ("How many legs does a cat have?", ("four", "4")),
       "Cats sleep a lot.", "Tell me a fun fact about dogs.",
       ("How old is my cat?", ("three", "3"))),
    _s("work", E1, "I work as a teacher.", "My students are very young.",
       "Today was a long day.", ("What is my job?", ("teacher",)),
       ("What is five plus three?", ("eight", "8")), "I should go to bed early.", "Good night."),
    _s("travel", E2, "I am planning a trip to Italy.",
       ("What is the capital of Italy?", ("rome",)), "I love Italian food.",
       ("What is a famous Italian dish?", ("pizza", "pasta", "spaghetti", "lasagna", "risotto")),
       "The flight is very long.", ("Which country am I visiting?", ("italy",)),
       "Thanks for the help."),
    _s("weather", E3, "It is raining outside.", "I forgot my umbrella.",
       "What makes rain fall?", "The weather is cold today.",
       ("At what temperature does water freeze in Celsius?", ("zero", "0")),
       "I will stay inside and read.", ("What color is snow?", ("white",))),
    _s("sleep", P, "I have a headache.", "I drank too much coffee.",
       ("How many hours should an adult sleep?", ("seven", "eight", "7", "8")),
       "I usually sleep six hours.", "Can you give me a tip for better sleep?",
       ("How many days are in a week?", ("seven", "7"))),
    _s("guitar", E1, "I play the guitar.", "I practice every evening.",
       ("How many strings does a guitar have?", ("six", "6")),
       "My favorite band is the Beatles.", ("Which band do I like?", ("beatles",)),
       "Tell me something about music.", "That is interesting."),
    _s("space", E2, ("What is the largest planet in our solar system?", ("jupiter",)),
       "The stars look bright tonight.",
       ("Which planet is called the red planet?", ("mars",)),
       "I would like to visit the moon one day.",
       ("How many moons does Earth have?", ("one", "1")), "Space is fascinating.",
       ("What is the closest star to Earth?", ("sun",))),
    _s("baking", E3, "I am baking a cake.", "The oven is already hot.",
       ("How many minutes are in an hour?", ("sixty", "60")), "I added too much sugar.",
       "What should I do now?", "The cake smells great.", "Thank you for the advice."),
    _s("family", P, "My sister lives in London.", "She has two children.",
       ("Which city does my sister live in?", ("london",)),
       ("How many children does she have?", ("two", "2")), "We visit her every summer.",
       ("What is the capital of England?", ("london",))),
    _s("football", E1, "I like playing football.", "My team won yesterday.",
       ("How many players are on a football team?", ("eleven", "11")),
       "The match was exciting.", "I scored a goal.", "Tell me a fun fact about sports."),
    _s("small-talk", E2, "Hi, how are you?", "I am fine, thanks.",
       "The horizon seems extremely distant.", "What is your name?", "Nice to meet you.",
       ("What color is grass?", ("green",)), "See you later."),
    _s("spanish", E3, "I am learning Spanish.", "It is a difficult language.",
       ("How do you say hello in Spanish?", ("hola",)), "I study every morning.",
       ("What is the capital of Spain?", ("madrid",)),
       ("Which language am I learning?", ("spanish",))),
    _s("garden", P, "I planted tomatoes today.", "The soil is very dry.",
       "How often should I water tomatoes?", ("What color are ripe tomatoes?", ("red",)),
       "My garden gets a lot of sun.", "What do plants need to grow?", "Thanks."),
    _s("car", E1, "My car is making a strange noise.", "It started this morning.",
       "What should I do?", ("How many wheels does a car have?", ("four", "4")),
       "I will take it to a mechanic.", "The repair might be expensive."),
    _s("books", E2, "I am reading a book about history.",
       ("Who wrote Romeo and Juliet?", ("shakespeare",)), "I read before bed every night.",
       "Can you recommend a good book?", "The library is near my house.",
       ("How many letters are in the English alphabet?", ("26", "twenty-six", "twenty six"))),
    _s("quiz", E3, ("What is two plus two?", ("four", "4")),
       ("What is ten minus three?", ("seven", "7")),
       ("How many days are in a week?", ("seven", "7")),
       ("How many months are in a year?", ("twelve", "12")),
       ("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
       ("How many legs does a spider have?", ("eight", "8")),
       ("What is the capital of Germany?", ("berlin",))),
    _s("errands", P, "I have to go to the bank.", "Then I need to pick up my son from school.",
       "Remind me to call my mother.", ("What is my son doing today?", ("school",)),
       "I am running late.", "The traffic is terrible.", "How can I stay calm?"),
]


class ReplyPath:
    """The LLM stage's text path for one turn, without Redis: the history and prompt of
    services/llm/history.py, the backend's generation (through the tool turns, no tools
    offered, as the worker with none configured), the text heard as replies.SpokenText
    hears it."""

    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.backend = create(settings)
        self.tools = ToolTurns(settings, self.backend, ToolRegistry(settings))

    def setup(self) -> None:
        self.backend.setup()

    def close(self) -> None:
        self.backend.close()

    async def turn(self, ctx, sid: str, turn: int, text: str) -> tuple[dict, str]:
        """(the context with this turn and its reply recorded, the reply as spoken)."""
        s = self.settings
        ctx = history.start_turn(ctx, turn, text, s.llm_history_turns)
        messages = history.messages(history.unsaid(ctx, turn), s.llm_system_prompt)
        pieces = self.tools.pieces(messages, ToolSet(), sid, turn, decide=False)
        heard, said = SpokenText(), []
        try:
            async for piece in pieces:
                said += heard.feed(piece)
                if heard.cut:
                    break
        finally:
            await pieces.aclose()
        tail = heard.end(spoken_before=bool(said))
        reply = " ".join(said + ([tail] if tail else []))
        if reply:
            ctx = history.set_reply(ctx, turn, reply)
        return ctx, reply


async def run_conversation(path: ReplyPath, conv: Conversation) -> list[dict]:
    ctx, turns = None, []
    for i, t in enumerate(conv.turns):
        ctx, reply = await path.turn(ctx, conv.id, i + 1, t.text)
        turns.append({"user": t.text, "reply": reply, "keywords": [list(k) for k in t.keywords],
                      "keyword_ok": has_keywords(reply, t.keywords) if t.keywords else None})
    return turns


async def run_all(path: ReplyPath, convs: list[Conversation], parallel: int) -> dict:
    gate = asyncio.Semaphore(max(1, parallel))

    async def one(conv: Conversation) -> tuple[str, list[dict]]:
        async with gate:
            turns = await run_conversation(path, conv)
        print(f"  {conv.id}: {len(turns)} turns", file=sys.stderr, flush=True)
        return conv.id, turns

    return dict(await asyncio.gather(*(one(c) for c in convs)))


def scores(sessions: dict[str, list[dict]], eval_set: dict[str, list[dict]]) -> dict:
    totals = {"replies": 0, "statements": 0, "echoes": 0, "repeats": 0}
    for turns in sessions.values():
        for k, v in session_rates([(t["user"], t["reply"]) for t in turns]).items():
            totals[k] += v
    kw = [t["keyword_ok"] for turns in sessions.values() for t in turns
          if t["keyword_ok"] is not None]
    kw_set = [t["keyword_ok"] for turns in eval_set.values() for t in turns
              if t["keyword_ok"] is not None]
    n = max(1, totals["replies"])
    return {"sessions": len(sessions), "replies": totals["replies"],
            "statements": totals["statements"],  # replies to statements: echoes are of those
            "echo_rate": round(totals["echoes"] / max(1, totals["statements"]), 3),
            "repeat_rate": round(totals["repeats"] / n, 3),
            "keyword_accuracy": round(sum(kw) / len(kw), 3) if kw else None,
            "keyword_turns": len(kw),
            "eval_set_keyword_accuracy": round(sum(kw_set) / len(kw_set), 3) if kw_set else None,
            "eval_set_keyword_turns": len(kw_set),
            "empty_replies": sum(not t["reply"] for turns in sessions.values() for t in turns)}


def flagged(sessions: dict[str, list[dict]]) -> list[str]:
    """The echoing and repeating replies, for reading."""
    lines = []
    for sid, turns in sessions.items():
        earlier: list[str] = []
        for t in turns:
            marks = [m for m, bad in (("ECHO", echoes(t["user"], t["reply"])),
                                      ("REPEAT", repeats_earlier(t["reply"], earlier))) if bad]
            if t["keyword_ok"] is False:
                marks.append("KEYWORD")
            if marks:
                lines.append(f"  [{sid}] {'+'.join(marks)}: {t['user']!r} -> {t['reply']!r}")
            if t["reply"].strip():
                earlier.append(t["reply"])
    return lines


def parse_variant(spec: str) -> tuple[str, dict]:
    """"label:name=value;name=value" -> (label, settings overrides); ``;`` separates them
    because a system prompt has commas."""
    label, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        name, _, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in config.FIELDS:
            raise SystemExit(f"unknown setting {name!r} in --variant {spec!r}")
        overrides[name] = config._parse(config.FIELDS[name].type, raw)
    return label or "current", overrides


async def run_variant(base: config.Settings, overrides: dict, convs: list[Conversation],
                      eval_convs: list[Conversation], parallel: int) -> dict:
    settings = replace(base, **overrides)
    path = ReplyPath(settings)
    await asyncio.to_thread(path.setup)
    try:
        started = time.perf_counter()
        sessions = await run_all(path, convs, parallel)
        eval_set = await run_all(path, eval_convs, parallel)
        took = time.perf_counter() - started
    finally:
        path.close()
    return {"overrides": overrides, "scores": scores(sessions, eval_set),
            "seconds": round(took, 1), "sessions": sessions, "eval_set": eval_set}


def table(results: dict[str, dict]) -> str:
    rows = ["| variant | replies | echo rate | repeat rate | keyword acc (sessions) | "
            "keyword acc (eval set) | empty | s |", "|---|---|---|---|---|---|---|---|"]
    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    for label, r in results.items():
        s = r["scores"]
        rows.append(f"| {label} | {s['replies']} | {share(s['echo_rate'])} | "
                    f"{share(s['repeat_rate'])} | {share(s['keyword_accuracy'])} "
                    f"({s['keyword_turns']}) | {share(s['eval_set_keyword_accuracy'])} "
                    f"({s['eval_set_keyword_turns']}) | {s['empty_replies']} | {r['seconds']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m s2s.bench.eval_replies", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE;...",
                   help="settings to measure, as overrides of the current ones (repeat to "
                        "compare; default: the current settings alone)")
    p.add_argument("--sessions", default="", help="only these session ids, comma-separated")
    p.add_argument("--no-eval-set", action="store_true",
                   help="skip the eval set's factual and multi-turn conversations")
    p.add_argument("--parallel", type=int, default=4,
                   help="sessions generated side by side (batched, as in a worker)")
    p.add_argument("--show", action="store_true", help="print every echo, repeat and miss")
    p.add_argument("--out", default="", help="write every reply and score as JSON here")
    config.add_flags(p, ["core", "llm"])
    args = p.parse_args(argv)
    base = config.from_args(args)
    wanted = set(filter(None, args.sessions.split(",")))
    convs = [c for c in REPLY_SESSIONS if not wanted or c.id in wanted]
    eval_convs = [] if args.no_eval_set else [c for c in CONVERSATIONS
                                             if c.group in ("factual", "multiturn")]
    results = {}
    for spec in args.variant or ["current:"]:
        label, overrides = parse_variant(spec)
        results[label] = asyncio.run(run_variant(base, overrides, convs, eval_convs,
                                                 args.parallel))
        print(f"{label}: {json.dumps(results[label]['scores'])}", file=sys.stderr)
        if args.show:
            print("\n".join(flagged(results[label]["sessions"]) +
                            flagged(results[label]["eval_set"])), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
