"""LLM backends behind one small interface, chosen by ``settings.llm_backend``.

    backend = create(settings)          # cheap: nothing imported or loaded yet
    backend.setup()                     # blocking: load the model / connect
    async for piece in backend.stream(messages, max_tokens=80, temperature=0.0):
        ...                             # text pieces as they are generated

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

    async def stream(self, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        """Release engines and servers (tests, shutdown)."""


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise BackendUnavailable(f"unknown LLM backend {name!r}: choose one of "
                                 f"{', '.join(REGISTRY)} (S2S_LLM_BACKEND)") from None
    return getattr(importlib.import_module(module), cls)


def create(settings: Settings) -> Backend:
    return backend_class(settings.llm_backend)(settings)
