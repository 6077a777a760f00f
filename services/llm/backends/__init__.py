"""LLM backends behind one small interface, chosen by ``settings.llm_backend``.

    backend = create(settings)          # cheap: nothing imported or loaded yet
    backend.setup()                     # blocking: load the model / connect
    async for piece in backend.stream(messages, max_tokens=80, temperature=0.0):
        ...                             # text pieces as they are generated
    backend.stream(..., json_schema=schema)  # a reply that is JSON valid against schema
    backend.stream(..., json_schema=schema, bias={"none": -1.5})  # ... leaning away from a word

Closing the ``stream`` generator early (``aclose()``, or cancelling the task
that iterates it) stops the generation at the engine, so a superseded turn
frees its compute at once.  ``running`` counts generations still being
computed by the engine (tests use it to check that they really stop).
"""

from __future__ import annotations

import importlib
from typing import AsyncIterator

from s2s.config import Settings

# name -> "module:Class"; imported only when chosen, so torch/vllm load only if used
REGISTRY = {
    "transformers": "s2s.services.llm.backends.hf:TransformersBackend",
    "vllm": "s2s.services.llm.backends.vllm_engine:VllmBackend",
    "openai": "s2s.services.llm.backends.openai_compat:OpenAIBackend",
}


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (extra not installed, server unreachable...):
    the message says what to do."""


class Backend:
    name = "backend"
    #: items one LLM worker should take at once with this backend
    concurrency = 4

    def __init__(self, settings: Settings):
        self.settings = settings
        self.running = 0

    def setup(self) -> None:
        """Load the model (blocking, runs in a thread)."""

    def describe(self) -> str:
        return self.name

    #: speaks OpenAI's ``tools`` itself (``stream_tools``) instead of a constrained
    #: decision step in front of ``stream`` (services/llm/tools/decide.py)
    native_tools = False

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float, json_schema: dict | None = None,
                     bias: dict[str, float] | None = None) -> AsyncIterator[str]:
        """Text pieces of the reply; with ``json_schema`` the reply is JSON valid against
        it (grammar-constrained decoding, greedy).  ``bias`` (with ``json_schema``): added
        to the logits of the tokens that begin each word (``prefix_tokens``), wherever the
        grammar allows them: a constrained choice between words leans that way."""
        raise NotImplementedError
        yield  # pragma: no cover

    async def end_of_turn(self, messages: list[dict[str, str]]) -> float | None:
        """The model's probability that the user's turn ends after the last message (a
        user message); None where the backend cannot tell (vllm, openai: the end-of-turn
        model's audio and the transcript's ending decide, services/llm/turn_end.py)."""
        return None

    def close(self) -> None:
        """Release engines and servers (tests, shutdown)."""


def earlier_replies(messages: list[dict]) -> list[str]:
    """What the assistant said earlier in the conversation (its messages' text), without
    the tool answers' few-shot examples, which are not the session's (tools/render.py)."""
    from ..tools.render import ANSWER_EXAMPLES

    examples = {m["content"] for m in ANSWER_EXAMPLES if m["role"] == "assistant"}
    return [m["content"] for m in messages if m.get("role") == "assistant"
            and isinstance(m.get("content"), str) and m["content"].strip()
            and m["content"] not in examples]


def prefix_tokens(vocab: dict[str, int], word: str) -> list[int]:
    """The ids of the tokens that can begin ``word`` in JSON: non-empty prefixes of it,
    alone or after the string's opening quote (a tokenizer's ``Ġ`` or ``▁`` marks a
    space: such tokens begin the word only after one)."""
    return sorted(i for t, i in vocab.items()
                  if (s := t[1:] if t.startswith('"') else t) and word.startswith(s))


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise BackendUnavailable(f"unknown LLM backend {name!r}: choose one of "
                                 f"{', '.join(REGISTRY)} (S2S_LLM_BACKEND)") from None
    return getattr(importlib.import_module(module), cls)


def create(settings: Settings) -> Backend:
    return backend_class(settings.llm_backend)(settings)
