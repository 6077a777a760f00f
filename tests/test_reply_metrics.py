"""The echo and repeat scores of bench/reply_metrics.py on the failures issue 19 quotes."""

from s2s.bench.reply_metrics import echoes, repeats_earlier, session_rates


def test_echo_of_the_users_statement():
    assert echoes("The horizon seems extremely distant.", "The horizon seems extremely distant.")
    assert echoes("I went hiking with my brother.", "You went hiking with your brother? Nice.")
    assert not echoes("The horizon seems extremely distant.",
                      "It does. Distances at sea are hard to judge.")
    assert not echoes("Hi.", "Hi.")  # too short to be a copy
    # an answer restates its question: not an echo
    assert not echoes("What is the capital of Germany?", "The capital of Germany is Berlin.")
    assert not echoes("tell me the capital of Germany", "The capital of Germany is Berlin.")


def test_repeat_of_an_earlier_reply():
    dinner = "Boil water. Add tea. Enjoy your dinner."
    assert repeats_earlier("Boil water. Add tea. Enjoy your dinner!", [dinner])
    assert not repeats_earlier("A spider has eight legs.", [dinner])
    assert not repeats_earlier("Okay.", ["Okay."])


def test_session_rates_count_in_order():
    turns = [("What should I cook for dinner?", "Boil water. Add tea. Enjoy your dinner."),
             ("How many legs does a spider have?", "Boil water. Add tea. Enjoy your dinner."),
             ("I like the sea.", "I like the sea."),
             ("Hello?", "")]
    assert session_rates(turns) == {"replies": 3, "statements": 1, "echoes": 1, "repeats": 1}
