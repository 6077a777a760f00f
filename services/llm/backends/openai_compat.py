"""Any OpenAI-compatible server (vLLM, llama.cpp, TGI, a hosted API): streamed
``/v1/chat/completions`` over HTTP.  Closing the stream closes the connection,
which is how these servers learn to abort the request."""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx

from . import Backend, BackendUnavailable


class OpenAIBackend(Backend):
    name = "openai"
    concurrency = 16  # the server batches; we only wait on sockets
    native_tools = True  # tools go to the server, whose model chooses

    def setup(self) -> None:
        s = self.settings
        self.base = s.llm_openai_base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {s.llm_openai_api_key}"} \
            if s.llm_openai_api_key else {}
        self.model = s.llm_openai_model
        if not self.model:  # the server's first (often only) model
            try:
                r = httpx.get(f"{self.base}/models", headers=self.headers, timeout=10)
                r.raise_for_status()
                self.model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise BackendUnavailable(
                    f"cannot list models at {self.base}/models ({e}): start an OpenAI-compatible "
                    f"server there (e.g. `python -m vllm.entrypoints.openai.api_server --model DIR`) "
                    f"or set S2S_LLM_OPENAI_BASE_URL / S2S_LLM_OPENAI_MODEL") from None

    def describe(self) -> str:
        return f"openai-compatible {self.base} model {self.model}"

    async def stream(self, messages, max_tokens, temperature,
                     json_schema: dict | None = None,
                     bias: dict[str, float] | None = None) -> AsyncIterator[str]:
        # bias: the server's model chooses its tools itself (stream_tools), unled
        extra = {"response_format": {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": json_schema, "strict": True}}} if json_schema else {}
        async for piece in self._chat(messages, max_tokens, temperature, extra):
            if isinstance(piece, str):
                yield piece

    async def stream_tools(self, messages, max_tokens, temperature, tools: list[dict],
                           tool_choice) -> AsyncIterator["str | list[dict]"]:
        """Text pieces as they come; then, if the model called tools, one list of
        ``{"id", "name", "arguments"}`` (arguments as JSON text), as the server sent them."""
        async for piece in self._chat(messages, max_tokens, temperature,
                                      {"tools": tools, "tool_choice": tool_choice}):
            yield piece

    async def _chat(self, messages, max_tokens, temperature, extra: dict) -> AsyncIterator:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "stream": True, **extra}
        penalty = self.settings.llm_repetition_penalty - 1
        if penalty:  # OpenAI's own knob (vLLM's and llama.cpp's servers take it too)
            body["frequency_penalty"] = max(-2.0, min(2.0, penalty))
        # a client per reply: httpx clients are bound to one event loop
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as client:
            self.running += 1
            try:
                async with client.stream("POST", f"{self.base}/chat/completions", json=body,
                                         headers=self.headers) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise RuntimeError(f"{self.base} answered {r.status_code}: "
                                           f"{r.text[:300]}")
                    calls: dict[int, dict] = {}
                    async for line in r.aiter_lines():
                        if piece := parse_sse(line):
                            yield piece
                        for delta in parse_tool_deltas(line):
                            call = calls.setdefault(delta.get("index", 0),
                                                    {"id": "", "name": "", "arguments": ""})
                            fn = delta.get("function") or {}
                            call["id"] = delta.get("id") or call["id"]
                            call["name"] += fn.get("name") or ""
                            call["arguments"] += fn.get("arguments") or ""
                    if calls:
                        yield [calls[i] for i in sorted(calls)]
            finally:
                self.running -= 1


def parse_sse(line: str) -> str:
    """The text delta of one server-sent-events line ('' for anything else)."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return ""
    try:
        choices = json.loads(data).get("choices") or [{}]
        return choices[0].get("delta", {}).get("content") or ""
    except (ValueError, AttributeError, TypeError):
        return ""


def parse_tool_deltas(line: str) -> list[dict]:
    """The ``tool_calls`` deltas of one server-sent-events line (none for anything else)."""
    if not line.startswith("data:") or line[5:].strip() in ("", "[DONE]"):
        return []
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
        deltas = choices[0].get("delta", {}).get("tool_calls") or []
        return [d for d in deltas if isinstance(d, dict)]
    except (ValueError, AttributeError, TypeError):
        return []
