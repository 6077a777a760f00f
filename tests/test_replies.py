"""Replies that make sense: a looping reply stops at the first repeated sentence, a
reply the token cap cut ends at its last whole sentence, and every backend gets its
repetition controls.  The stage-level cases drive the real LLM stage and its openai
backend, through a real Redis, against a small OpenAI-compatible server that streams
the replies quoted in issue 13 (what SmolLM2 really said)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from s2s.services.llm.replies import Repeats, ends_sentence, last_sentences
from s2s.services.llm.worker import REPLY_CUT, LlmStage
from s2s.worker import Runtime
from tests.test_llm import ask, check_reply, llm_settings

LOSS = ("I'm sorry for your loss. I'm sorry for any other losses you may have had. " * 4).strip()
FRAGMENT = "The capital of France is Paris and the friends are Paris and"


def test_a_repeated_sentence_stops_the_reply():
    r = Repeats()
    assert r.check("I'm sorry for your loss.") == ("I'm sorry for your loss.", False)
    said, stop = r.check("I'm sorry for any other losses you may have had. I'm sorry for "
                         "your loss.")
    assert said == "I'm sorry for any other losses you may have had." and stop
    # nearly the same words count too; short sentences may honestly recur
    r = Repeats()
    r.check("The capital of France is Paris.")
    assert r.check("Paris is the capital of France.") == ("", True)
    r = Repeats()
    assert r.check("Yes. I can help. Yes.") == ("Yes. I can help. Yes.", False)
    # a phrase looping inside one long sentence
    r = Repeats()
    said, stop = r.check("Paris and the friends are Paris and the friends are Paris and the "
                         "friends are")
    assert stop and said == ""
    # an ordinary answer passes whole
    r = Repeats()
    text = "A spider has eight legs. Insects have six."
    assert r.check(text) == (text, False)


def test_last_sentences():
    assert last_sentences(FRAGMENT) == ""
    assert last_sentences("It is Paris. And the friends are") == "It is Paris."
    assert last_sentences('He said "stop." Then') == 'He said "stop."'
    assert ends_sentence("Really?") and ends_sentence('"Yes."') and not ends_sentence("and")


def test_no_repeat_ngrams_ban_only_the_reply_s_own_repeats():
    from s2s.services.llm.backends.batch import repeated_ngram_ends

    # the reply so far: 1 2 3 1 2 -> "1 2" was followed by 3: 3 is banned next
    assert repeated_ngram_ends([1, 2, 3, 1, 2], 3) == {3}
    # the generation loop passes the reply alone (after the prompt 5 6 7 8): repeating
    # the prompt's words ("the capital of France") stays allowed
    assert repeated_ngram_ends([6, 7], 3) == set()
    assert repeated_ngram_ends([1, 2, 1, 2], 0) == set()  # 0: off


# --- the stage, through Redis, against a scripted OpenAI-compatible server -----------------
class Script(BaseHTTPRequestHandler):
    reply = ""
    bodies: list = []

    def do_GET(self):  # /v1/models
        self._json({"data": [{"id": "scripted"}]})

    def do_POST(self):  # /v1/chat/completions, streamed word by word
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Script.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        words = Script.reply.split(" ")
        for i, w in enumerate(words):
            delta = {"choices": [{"delta": {"content": w + (" " if i < len(words) - 1 else "")}}]}
            self.wfile.write(f"data: {json.dumps(delta)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture
def runtime(server, redis_url):
    stage = LlmStage(llm_settings(redis_url, "openai", llm_openai_base_url=server,
                                  llm_repetition_penalty=1.2))
    stage.setup()
    return Runtime(stage, stage.settings)


async def say(rt: Runtime, sid: str, reply: str) -> str:
    Script.reply = reply
    outcome, got, _ = await ask(rt, sid, 0, "Hello?")
    assert outcome == "ok"
    return check_reply(got).strip()


async def test_the_issue_s_replies_are_spoken_sensibly(runtime):
    repeated = REPLY_CUT.labels("repeated")._value.get()
    unfinished = REPLY_CUT.labels("unfinished")._value.get()
    # the loop: each sentence once, then the reply stops
    assert await say(runtime, "loss", LOSS) == \
        "I'm sorry for your loss. I'm sorry for any other losses you may have had."
    assert REPLY_CUT.labels("repeated")._value.get() == repeated + 1
    # the fragment: the first clause may already be spoken, the dangling rest never is
    text = await say(runtime, "paris", FRAGMENT)
    assert text == "The capital of France is Paris", text
    assert await say(runtime, "cut", "It is Paris. It has the Eiffel tower and the") == \
        "It is Paris."
    assert REPLY_CUT.labels("unfinished")._value.get() == unfinished + 2
    # what was not spoken is not remembered either
    hist = (await runtime.stage.state.load("loss"))["history"]
    assert hist[-1]["content"] == "I'm sorry for your loss. I'm sorry for any other losses " \
                                  "you may have had."
    # a short answer without a full stop is still an answer
    assert await say(runtime, "short", "Paris") == "Paris"
    # the backend sent its repetition control
    assert Script.bodies[-1]["frequency_penalty"] == pytest.approx(
        runtime.stage.settings.llm_repetition_penalty - 1)
    await runtime.bus.close()
