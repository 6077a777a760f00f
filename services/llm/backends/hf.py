"""transformers on CPU (the default): generation runs in a thread and streams
text pieces back to the event loop; a stop flag checked after every token ends
it when the consumer goes away (barge-in)."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from . import Backend, BackendUnavailable
from .model_files import resolve

_END = object()


class _Stopped(Exception):
    """Raised inside the model's forward pass to abandon a superseded generation."""


class NoRepeatReplyNgrams:
    """transformers' no_repeat_ngram_size also bans n-grams of the prompt, so a reply
    could not say "the capital of France" after the user did: this bans only repeats
    within the reply itself (the tokens after ``prompt_len``)."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids, scores):
        n = self.n
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            if len(ids) < n:
                continue
            tail = ids[len(ids) - n + 1:]
            banned = {ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i:i + n - 1] == tail}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


class TransformersBackend(Backend):
    name = "transformers"
    # each generation takes one core; two let a second session start while one speaks
    concurrency = 2

    def setup(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise BackendUnavailable(f"the transformers backend needs torch and transformers "
                                     f"({e}): install with scripts/install.sh") from None
        torch.set_num_threads(1)  # engines share 2 cores (CONTRIBUTING.md)
        self.torch = torch
        self._lock = threading.Lock()
        self.path = resolve(self.settings)
        device = self.settings.device
        self.device = "cuda" if device == "cuda" or (device == "auto" and
                                                     torch.cuda.is_available()) else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path).to(self.device).eval()
        from .cpu_speed import PrefixCache, int8_decode_supported, speed_up_for_cpu

        self.fast = (self.device == "cpu" and self.settings.llm_cpu_int8
                     and int8_decode_supported())
        if self.fast:
            self.model = speed_up_for_cpu(self.model)
        self.prefix = PrefixCache()
        # one token step takes ~50-100 ms on a busy CPU core; checking the stop flag
        # before every decoder layer instead of after every token ends a superseded
        # generation within a few ms (each generation thread has its own flag)
        self._local = threading.local()
        layers = [m for m in self.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers or [self.model]:
            layer.register_forward_pre_hook(self._check_stop)
        # the first generate() pays one-off costs (~1 s): not on a user's first turn; it
        # also leaves the system prompt's keys/values in the prefix cache for every session
        system = self.settings.llm_system_prompt
        warm = self.tokenizer.apply_chat_template(
            ([{"role": "system", "content": system}] if system else []) +
            [{"role": "user", "content": "Hi"}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**warm, max_new_tokens=2, do_sample=False,
                                      return_dict_in_generate=True,
                                      pad_token_id=self.tokenizer.eos_token_id)
        self.prefix.store(out.sequences[0].tolist(), out.past_key_values)

    def _check_stop(self, module, args) -> None:
        stop = getattr(self._local, "stop", None)
        if stop is not None and stop.is_set():
            raise _Stopped

    def describe(self) -> str:
        mode = "bf16 + int8 decode, prefix cache" if self.fast else "prefix cache"
        return f"transformers {self.path} on {self.device} ({mode})"

    async def stream(self, messages, max_tokens, temperature) -> AsyncIterator[str]:
        from transformers import (LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                                  TextStreamer)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        torch = self.torch

        class Streamer(TextStreamer):  # decoded text -> the event loop's queue
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text and not stop.is_set():
                    loop.call_soon_threadsafe(queue.put_nowait, text)

        class Stop(StoppingCriteria):  # checked after every generated token
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        ids = inputs["input_ids"][0].tolist()
        cache, reused = self.prefix.lookup(ids)  # only the new tokens are prefilled
        s = self.settings
        processors = [NoRepeatReplyNgrams(s.llm_no_repeat_ngram, len(ids))] \
            if s.llm_no_repeat_ngram > 0 else []
        kwargs = dict(**inputs, max_new_tokens=max_tokens, past_key_values=cache,
                      repetition_penalty=s.llm_repetition_penalty if s.llm_repetition_penalty != 1
                      else None, logits_processor=LogitsProcessorList(processors),
                      return_dict_in_generate=True,
                      streamer=Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                      stopping_criteria=StoppingCriteriaList([Stop()]),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        def generate() -> None:
            torch.set_num_threads(1)  # the thread count is per thread in OpenMP
            self._local.stop = stop
            try:
                with torch.inference_mode():
                    out = self.model.generate(**kwargs)
                if out.past_key_values is not None:
                    self.prefix.store(out.sequences[0].tolist(), out.past_key_values)
                result: object = _END
            except _Stopped:
                result = _END
            except BaseException as e:  # handed to the consumer, raised there
                result = e
            finally:
                with self._lock:
                    self.running -= 1
            try:
                loop.call_soon_threadsafe(queue.put_nowait, result)
            except RuntimeError:
                pass  # the event loop is gone (shutdown): nobody waits for the end

        with self._lock:
            self.running += 1
        thread = threading.Thread(target=generate, name="llm-generate", daemon=True)
        thread.start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # cancelled or closed early: the thread stops after this token
