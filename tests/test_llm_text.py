"""Unit tests of the LLM stage's text handling: chunking, speakable text, history."""

from __future__ import annotations

import re

from hypothesis import example, given, settings, strategies as st

from s2s.services.llm import history
from s2s.services.llm.chunker import Chunker, chunks_of
from s2s.services.llm.speakable import speakable
from s2s.services.llm.backends.openai_compat import parse_sse


# --- chunker ---------------------------------------------------------------------------
def test_first_chunk_at_a_clause_then_whole_sentences():
    text = ("Well, the capital of France, as you know, is Paris. It is a lovely city, "
            "with many museums! Would you like to know more?")
    assert chunks_of(text) == ["Well, the capital of France,", "as you know, is Paris.",
                               "It is a lovely city, with many museums!",
                               "Would you like to know more?"]


def test_no_cut_inside_numbers_abbreviations_initials_or_code():
    text = "Dr. Smith paid 3.50 dollars, e.g. for J. R. R. Tolkien books. ```x = 1. y = 2``` Done."
    assert chunks_of(text) == ["Dr. Smith paid 3.50 dollars,",
                               "e.g. for J. R. R. Tolkien books.", "```x = 1. y = 2``` Done."]


def test_line_breaks_end_chunks_and_long_runs_are_cut():
    assert chunks_of("Here:\n- one\n- two") == ["Here:", "- one", "- two"]
    words = " ".join(f"w{i}" for i in range(100))
    chunks = chunks_of(words, max_words=40)
    assert [len(c.split()) for c in chunks] == [40, 40, 20]


def test_chunks_come_as_soon_as_the_boundary_is_known():
    c = Chunker()
    assert c.feed("The capital of France") == []
    assert c.feed(" is Paris.") == []          # "." might be "Paris.com": wait for more
    assert c.feed(" It") == ["The capital of France is Paris."]
    assert c.flush() == "It"


_texts = st.text(alphabet=st.sampled_from(list("abc XY,.!?;:\n`'-\"123")), max_size=200)


@settings(max_examples=300, deadline=None)
@given(_texts, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=60))
def test_chunks_do_not_depend_on_how_tokens_split_the_text(text, cuts):
    c, out, i = Chunker(), [], 0
    for n in cuts * (len(text) // max(1, sum(cuts)) + 1):
        out += c.feed(text[i:i + n])
        i += n
    rest = c.flush()
    assert out + ([rest] if rest else []) == chunks_of(text)
    # and nothing is lost or reordered
    assert "".join(chunks_of(text)).split() == "".join(text.split("\n")).split() or \
        " ".join(chunks_of(text)).split() == text.split()


# --- speakable ---------------------------------------------------------------------------
def test_markdown_lists_code_urls_and_emoji_are_removed():
    assert speakable("**Paris** is the _capital_ of France 🇫🇷😀!") == \
        "Paris is the capital of France!"
    assert speakable("# Fruits\n- apples\n- pears\n1. plums") == "Fruits. apples. pears. plums"
    assert speakable("See [the docs](https://x.io/a) or https://example.com/p?q=1 now.") == \
        "See the docs or now."
    assert speakable("Run `make`:\n```bash\nrm -rf /\n```\nDone.") == "Run make: Done."
    assert speakable("Hello <b>there</b> ✨ friend ❤️.") == "Hello there friend."
    assert speakable("snake_case_name and ~~old~~ text") == "snake case name and old text"


def test_nothing_speakable_gives_empty_text():
    for text in ["👍", "```python\nprint(1)", "---", "- ", "https://example.com", "** **"]:
        assert speakable(text) == ""


def test_plain_sentences_are_unchanged():
    for text in ["The capital of France is Paris.", "Yes, it's 3.5 km away; about 10 minutes!",
                 "Don't worry (really), it's fine?"]:
        assert speakable(text) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
@example("HTTP")  # a word, not a link: it may be spoken (hypothesis found it on a fresh machine)
def test_speakable_output_is_clean_and_stable(text):
    out = speakable(text)
    assert "\n" not in out and "```" not in out and "**" not in out
    assert not re.search(r"https?://|ftp://|www\.", out, re.I)  # no link is read aloud
    assert not re.search("[\U0001F300-\U0001FAFF#*`]", out)
    assert out == out.strip()
    assert speakable(out) == out


# --- history -----------------------------------------------------------------------------
def test_history_merges_unanswered_user_text_and_replaces_reruns():
    ctx = history.start_turn(None, 1, "Hi, my name is Anna.", 6)
    ctx = history.set_reply(ctx, 1, "Nice to meet you.")
    ctx = history.set_reply(ctx, 1, "Nice to meet you. How can I help?")
    ctx = history.start_turn(ctx, 2, "What is", 6)        # superseded before any reply
    ctx = history.start_turn(ctx, 3, "my name?", 6)
    ctx = history.start_turn(ctx, 3, "my name?", 6)        # a re-run of turn 3
    assert history.messages(ctx, "SYS") == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi, my name is Anna."},
        {"role": "assistant", "content": "Nice to meet you. How can I help?"},
        {"role": "user", "content": "What is my name?"}]


def test_a_continuation_replaces_the_message_it_re_heard_and_its_early_reply():
    ctx = history.start_turn(None, 1, "My name is Anna.", 6, 0.2, 1.5)
    ctx = history.set_reply(ctx, 1, "Hi Anna!")
    ctx = history.start_turn(ctx, 2, "And so my fellow", 6, 3.0, 4.4)
    ctx = history.set_reply(ctx, 2, "Go on.")             # answered too early
    ctx = history.start_turn(ctx, 3, "And so my fellow Americans, ask not", 6, 3.0, 6.0)
    ctx = history.start_turn(ctx, 4, "And so my fellow Americans, ask not what", 6, 3.0, 8.0)
    assert history.messages(ctx, "") == [
        {"role": "user", "content": "My name is Anna."},
        {"role": "assistant", "content": "Hi Anna!"},
        {"role": "user", "content": "And so my fellow Americans, ask not what"}]
    assert ctx["history"][-1] == {"role": "user", "content": "And so my fellow Americans, ask "
                                  "not what", "turn": 4, "start_s": 3.0, "end_s": 8.0}


def test_answered_early_is_a_continuation_of_an_answered_message():
    ctx = history.start_turn(None, 1, "My name is Anna.", 6, 0.2, 1.5)
    ctx = history.set_reply(ctx, 1, "Hi Anna!")
    assert not history.answered_early(ctx, 2, 3.0)        # new speech after it: a new turn
    ctx = history.start_turn(ctx, 2, "And so my fellow", 6, 3.0, 4.4)
    assert not history.answered_early(ctx, 3, 3.0)        # continued, but nothing was said
    ctx = history.set_reply(ctx, 2, "Go on.")
    assert history.answered_early(ctx, 3, 3.0)            # continued after a reply: too early
    assert not history.answered_early(ctx, 3, None) and not history.answered_early(None, 1, 0)


def test_speech_after_the_previous_message_is_joined_not_replaced():
    ctx = history.start_turn(None, 1, "What is", 6, 0.3, 1.0)
    ctx = history.start_turn(ctx, 2, "the capital of France?", 6, 2.5, 4.0)  # after it: joined
    assert history.messages(ctx, "")[-1]["content"] == "What is the capital of France?"
    # a position before the previous message's start is no continuation either (the
    # VAD's positions restart at 0 when another worker takes the session over)
    ctx = history.set_reply(ctx, 2, "Paris.")
    ctx = history.start_turn(ctx, 3, "Thanks.", 6, 0.5, 1.2)
    assert [m["content"] for m in history.messages(ctx, "")] == [
        "What is the capital of France?", "Paris.", "Thanks."]
    # contexts stored before positions were kept, and transcripts without them, still work
    old = {"history": [{"role": "user", "content": "Hello", "turn": 1}]}
    for start, end in ((0.0, 2.0), (None, None)):
        ctx = history.start_turn(old, 2, "there", 6, start, end)
        assert history.messages(ctx, "") == [{"role": "user", "content": "Hello there"}]


def test_history_keeps_the_last_exchanges_and_survives_garbage():
    ctx, kept = None, []
    for turn in range(12):
        ctx = history.start_turn(ctx, turn, f"q{turn}", 4)
        kept.append([m["content"] for m in history.messages(ctx, "") if m["role"] == "user"])
        ctx = history.set_reply(ctx, turn, f"a{turn}")
    # at most 4 exchanges; once over, cut to the last 2 in one block, so that the prompt
    # starts alike for the next turns (their keys/values come from the prefix cache)
    assert [len(k) for k in kept] == [1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3]
    assert kept[-1] == ["q9", "q10", "q11"] and kept[4] == ["q3", "q4"]
    assert [m["content"] for m in history.messages(ctx, "")] == \
        ["q9", "a9", "q10", "a10", "q11", "a11"]
    ctx = None
    for turn in range(3):  # one exchange kept: only the newest message
        ctx = history.set_reply(history.start_turn(ctx, turn, f"q{turn}", 1), turn, f"a{turn}")
    assert [m["content"] for m in history.messages(ctx, "")] == ["q2", "a2"]
    assert history.start_turn({"history": "oops"}, 1, "hi", 3) == \
        {"history": [{"role": "user", "content": "hi", "turn": 1}]}


def test_sse_lines():
    assert parse_sse('data: {"choices":[{"delta":{"content":"Hi"}}]}') == "Hi"
    assert parse_sse("data: [DONE]") == parse_sse(": ping") == parse_sse("data: {bad") == ""
    assert parse_sse('data: {"choices":[{"delta":{"role":"assistant"}}]}') == ""


def test_a_long_first_sentence_is_cut_before_a_phrase_opener():
    from s2s.services.llm.chunker import chunks_of
    text = "Octopuses are fascinating creatures that can change color. They have three hearts."
    assert chunks_of(text) == ["Octopuses are fascinating creatures",
                               "that can change color.", "They have three hearts."]
    # only the first chunk is cut early; later ones stay whole sentences
    assert chunks_of("Yes. Octopuses are fascinating creatures that can change color.") == [
        "Yes.", "Octopuses are fascinating creatures that can change color."]


def test_apply_heard_cuts_a_reply_to_what_the_user_heard():
    from s2s.services.llm import history

    ctx = {"history": [{"role": "user", "content": "Tell me a story.", "turn": 1},
                       {"role": "assistant", "content": "Once upon a time. There was a king.",
                        "turn": 1},
                       {"role": "user", "content": "Stop.", "turn": 2}]}
    cut = history.apply_heard(ctx, {"heard:1": "Once upon a time.", "instructions": "x"})
    assert cut["history"][1]["content"] == "Once upon a time."
    assert cut["history"][0] == ctx["history"][0] and cut["history"][2] == ctx["history"][2]
    assert history.apply_heard(ctx, {"heard:7": "nothing of turn 7 is stored"}) == ctx
    assert history.apply_heard(None, {"heard:1": "x"}) is None


def test_questions_and_requests_are_answered_at_once_statements_may_go_on():
    from s2s.services.llm.worker import asks

    for text in ("What is the capital of France?", "Tell me a fun fact about octopuses.",
                 "Give me a tip for sleeping better.", "Can you recommend a good book.",
                 "how far away is the moon",
                 "What is the capital of France? Answer in one sentence.",
                 "I am cooking pasta. How long should I boil it?"):
        assert asks(text), text
    for text in ("I need to buy milk.", "My name is Anna.", "The numbers are fifteen.",
                 "please send it to twenty two Baker Street", "", "  ",
                 "I need to buy milk. And eggs. And bread."):
        assert not asks(text), text
