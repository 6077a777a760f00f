"""The transformers backend's batched generation loop (services/llm/backends/batch.py)
with the real model: replies of several sessions step together, a new turn is
prefilled before older replies go on, a stopped reply leaves the batch at once,
and the prefix cache of past conversations stays within its byte budget."""

from __future__ import annotations

import asyncio

import pytest
import torch

from s2s import config
from s2s.services.llm import history
from s2s.services.llm.backends.cpu_speed import PrefixCache

SYSTEM = config.Settings().llm_system_prompt
LONG = "Tell me about the history of Rome."


@pytest.fixture(scope="module")
def backend():
    from s2s.services.llm.backends import create

    b = create(config.load({"llm_backend": "transformers", "llm_max_batch": 4}, environ={}))
    b.setup()
    yield b
    b.close()


def forget_conversations(backend) -> None:
    """Drop the prefix cache's entries but the system prompt's (a reply may differ in
    its last bits with how much of its prompt was computed earlier)."""
    prefix = backend.prefix
    for key in [k for k in prefix.entries if k != prefix.pinned]:
        prefix.bytes -= sum(k.nbytes + v.nbytes for k, v in prefix.entries.pop(key))


def msgs(question: str) -> list[dict[str, str]]:
    return history.messages(history.start_turn(None, 0, question, 6), SYSTEM)


async def reply(backend, question: str, max_tokens: int = 40, first=None) -> str:
    out = []
    async for piece in backend.stream(msgs(question), max_tokens, 0.0):
        out.append(piece)
        if first is not None and not first.is_set():
            first.set()
    return "".join(out)


@pytest.mark.slow
async def test_batched_replies_are_the_replies_alone(backend):
    questions = ["What is the capital of France?", "Why is the sky blue?", LONG,
                 "How do plants make food?"]
    alone = []
    for q in questions:  # each from the same cache state: only the system prompt known
        forget_conversations(backend)
        alone.append(await reply(backend, q))
    forget_conversations(backend)
    steps, rows = backend.engine.steps, backend.engine.rows_stepped
    together = await asyncio.gather(*(reply(backend, q) for q in questions))
    assert "Paris" in alone[0]
    # greedy replies do not depend on which other sessions share the forward pass
    # (attention runs row by row over each row's own keys; int8 steps of 1..8 rows
    # compute each row alike)
    assert together == alone
    # and they did share it: more than one row per decode step on average
    assert (backend.engine.rows_stepped - rows) / (backend.engine.steps - steps) > 2
    assert backend.running == 0


@pytest.mark.slow
async def test_a_new_turn_is_prefilled_before_older_replies_step_on(backend):
    engine = backend.engine
    started = [asyncio.Event() for _ in range(2)]
    older = [asyncio.create_task(reply(backend, LONG, 120, first=e)) for e in started]
    for e in started:
        await asyncio.wait_for(e.wait(), 60)
    seen: list[int] = []
    original = engine._prefill

    def prefill(seq):  # note how many decode steps ran between submit and prefill
        seen.append(engine.steps)
        return original(seq)

    engine._prefill = prefill
    try:
        submitted = engine.steps
        text = await reply(backend, "What is the capital of France?")
    finally:
        engine._prefill = original
    assert "Paris" in text
    # at most the step in flight when it was submitted ran before its prefill
    assert seen and seen[0] - submitted <= 1, (submitted, seen)
    assert all(not t.done() for t in older), "the older replies were still going"
    await asyncio.gather(*older)


@pytest.mark.slow
async def test_a_stopped_reply_leaves_the_batch_and_the_others_go_on(backend):
    engine = backend.engine
    alone = await reply(backend, "Why is the sky blue?", 60)
    first = asyncio.Event()
    doomed = asyncio.create_task(reply(backend, LONG, 200, first=first))
    other = asyncio.create_task(reply(backend, "Why is the sky blue?", 60))
    await asyncio.wait_for(first.wait(), 60)
    steps = engine.steps
    doomed.cancel()  # as the runtime does on barge-in
    while backend.running > 1:
        await asyncio.sleep(0.002)
    assert engine.steps - steps <= 1  # gone after the step in flight, if any
    assert await other == alone
    assert backend.running == 0 and not engine.active
    # the row's keys/values left with it: the batch holds nothing after the last reply
    assert engine.cache is None and engine.mask is None


@pytest.mark.slow
async def test_an_fp32_model_says_something_new_on_a_repeated_question():
    """fp32 (CUDA, llm_cpu_int8 off, a CPU without fast bf16): the bans on earlier
    replies' runs write into the logits, which must not be the model's own tensor."""
    from s2s.services.llm.backends import create

    b = create(config.load({"llm_backend": "transformers", "llm_cpu_int8": False,
                            "llm_max_batch": 1}, environ={}))
    b.setup()
    try:
        assert "fp32" in b.describe()
        question, earlier = "What is the capital of France?", "The capital of France is Paris."
        messages = msgs(question) + [{"role": "assistant", "content": earlier},
                                     {"role": "user", "content": question}]
        again = "".join([piece async for piece in b.stream(messages, 30, 0.0)])
        assert again.strip()
        said, new = (b.tokenizer.encode(t, add_special_tokens=False) for t in (earlier, again))
        runs = {tuple(said[i:i + 4]) for i in range(len(said) - 3)}
        assert not any(tuple(new[i:i + 4]) in runs for i in range(len(new) - 3))
    finally:
        b.close()


def kv(tokens: int, layers: int = 2) -> list:
    return [(torch.full((1, 3, tokens, 8), float(i)), torch.zeros(1, 3, tokens, 8))
            for i in range(layers)]


def test_prefix_cache_is_bounded_in_bytes_and_keeps_the_system_prompt():
    per_token = 2 * 2 * 3 * 8 * 4  # layers * (k, v) * heads * dim * fp32
    cache = PrefixCache(max_bytes=100 * per_token, size=16)
    cache.store([1, 2, 3], kv(3), pin=True)
    for conv in range(10):  # ten conversations of 30 tokens: not all fit in 100 tokens
        cache.store([1, 2, 3] + [100 + conv] * 27, kv(30))
        assert cache.bytes <= cache.max_bytes
        assert cache.bytes == sum(k.nbytes + v.nbytes for e in cache.entries.values()
                                  for k, v in e)
    assert (1, 2, 3) in cache.entries  # pinned: every session's first turn starts with it
    assert len(cache.entries) == 4  # the system prompt + the three latest conversations
    # a conversation's next turn replaces the entry it extends
    key = [1, 2, 3] + [109] * 27
    cache.store(key + [7, 8], kv(32))
    assert tuple(key) not in cache.entries and len(cache.entries) == 4
    # lookup: the longest shared prefix, a private copy, the last prompt token left to do
    layers, n = cache.lookup(key + [7, 8, 9])
    assert n == 32 and layers[1][0].shape == (1, 3, 32, 8) and float(layers[1][0][0, 0, 0, 0]) == 1
    layers[1][0].zero_()
    assert float(cache.lookup(key + [7, 8, 9])[0][1][0][0, 0, 0, 0]) == 1
    assert cache.lookup(key + [7, 8])[1] == 31
    assert cache.lookup([5, 6]) == (None, 0)
    # a context larger than the whole budget is not kept
    cache.store([1, 2, 3] + [55] * 200, kv(203))
    assert cache.bytes <= cache.max_bytes and len(cache.entries) == 4
