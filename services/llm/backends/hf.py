"""transformers on CPU (the default): one engine thread generates every reply of
this worker, their token steps batched (batch.py), and streams text pieces back
to the event loop; a consumer that goes away (barge-in) stops its reply between
steps, or inside the forward pass when nobody else shares it."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
from typing import AsyncIterator

from . import Backend, BackendUnavailable, earlier_replies, prefix_tokens
from .model_files import resolve

_END = object()


class TransformersBackend(Backend):
    name = "transformers"
    # replies one worker generates at once (settings.llm_max_batch sets the instance's)
    concurrency = 8

    def __init__(self, settings):
        super().__init__(settings)
        self.concurrency = max(1, settings.llm_max_batch)

    def setup(self) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise BackendUnavailable(f"the transformers backend needs torch and transformers "
                                     f"({e}): install with scripts/install.sh") from None
        torch.set_num_threads(1)  # engines share 2 cores (CONTRIBUTING.md)
        _steady_malloc()
        self.torch = torch
        self._lock = threading.Lock()
        self.path = resolve(self.settings)
        device = self.settings.device
        self.device = "cuda" if device == "cuda" or (device == "auto" and
                                                     torch.cuda.is_available()) else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path).to(self.device).eval()
        from .batch import BatchEngine
        from .cpu_speed import PrefixCache, bf16_is_fast, int8_decode_supported, speed_up_for_cpu

        self.mode = "fp32"
        if self.device == "cpu" and self.settings.llm_cpu_int8:
            if not int8_decode_supported():
                self.mode = "fp32: this torch has no int8 one-token product"
            elif not bf16_is_fast(self.model):
                self.mode = "fp32: this CPU has no fast bf16"
            else:
                self.mode = "bf16 + int8 decode"
                self.model = speed_up_for_cpu(self.model)
        s = self.settings
        self.prefix = PrefixCache(max_bytes=s.llm_prefix_cache_mb << 20)
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = {e for e in eos if e is not None}
        self.constraints = None  # made on the first constrained reply (xgrammar)
        self.engine = BatchEngine(self.model, self.tokenizer, self.prefix, self.device,
                                  self.concurrency, {e for e in eos if e is not None},
                                  s.llm_no_repeat_ngram, s.llm_repetition_penalty)
        # the first forward passes pay one-off costs (~1 s): not on a user's first turn;
        # the system prompt's keys/values stay in the prefix cache for every session
        system = s.llm_system_prompt
        ids = self.tokenizer.apply_chat_template(
            ([{"role": "system", "content": system}] if system else []) +
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]
        done = threading.Event()
        from .batch import Sequence

        self.engine.submit(Sequence(ids, 2, 0.0, lambda text: None, lambda e: done.set()))
        done.wait()
        system_ids = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system}], tokenize=True,
            return_dict=True)["input_ids"] if system else []
        layers, n = self.prefix.lookup(list(system_ids) + [-1])
        if n:
            self.prefix.store(list(system_ids)[:n], layers, pin=True)

    def describe(self) -> str:
        return (f"transformers {self.path} on {self.device} ({self.mode}, {self.concurrency} "
                f"replies batched, prefix cache {self.settings.llm_prefix_cache_mb} MB)")

    async def stream(self, messages, max_tokens, temperature,
                     json_schema: dict | None = None,
                     bias: dict[str, float] | None = None) -> AsyncIterator[str]:
        from .batch import Sequence

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the event loop is gone (shutdown): nobody waits for the end

        def ended(error: BaseException | None) -> None:
            with self._lock:
                self.running -= 1
            put(error if error is not None else _END)

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        matcher = self._matcher(json_schema, bias) if json_schema is not None else None
        seq = Sequence(list(ids), max_tokens, temperature, put, ended, matcher,
                       self._earlier_runs(messages) if matcher is None else None)
        with self._lock:
            self.running += 1
        self.engine.submit(seq)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            seq.stop.set()  # cancelled or closed early: it leaves the batch after this step
            self.engine.wake()

    async def end_of_turn(self, messages: list[dict]) -> float | None:
        """P(the user's turn ends here): the probability of ``<|im_end|>`` right after the
        last (user) message's text, the chat prompt left open there (LiveKit's turn
        detector, on the model that answers).  One prefill in the generation loop, which
        reuses the conversation's cached prefix and keeps the keys/values it computes:
        the reply's own prefill then starts from them."""
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                 return_dict=True)["input_ids"]
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ends = [i for i, t in enumerate(ids) if t == end]
        if not ends or not isinstance(end, int):
            return None  # a chat template without <|im_end|>: the audio and text decide
        probe = _EndProbe(end)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def ended(error: BaseException | None) -> None:
            def settle() -> None:
                if not done.done():
                    done.set_exception(error) if error else done.set_result(probe.p)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:
                pass  # the event loop is gone (shutdown)

        from .batch import Sequence

        seq = Sequence(list(ids[:ends[-1]]), 1, 0.0, lambda text: None, ended, probe)
        self.engine.submit(seq)
        try:
            return await done
        finally:
            seq.stop.set()  # superseded while waiting: the loop drops it
            self.engine.wake()

    def _earlier_runs(self, messages: list[dict]):
        """The runs of llm_avoid_reply_ngram tokens of the conversation's earlier replies,
        as the reply would say them: at its start, and after a space (mid-reply)."""
        from .batch import NgramBan

        n = self.settings.llm_avoid_reply_ngram
        texts = earlier_replies(messages) if n > 0 else []
        if not texts:
            return None
        encode = self.tokenizer.encode
        return NgramBan([encode(t, add_special_tokens=False) for t in texts] +
                        [encode(" " + t, add_special_tokens=False) for t in texts], n)

    def _matcher(self, schema: dict, bias: dict[str, float] | None = None):
        if self.constraints is None:
            from .constrained import JsonConstraints

            self.constraints = JsonConstraints(self.tokenizer, self.model.config.vocab_size,
                                               self.stop_ids)
        ids: dict[int, float] = {}
        for word, value in (bias or {}).items():
            for i in self._prefix_ids(word):
                ids[i] = ids.get(i, 0.0) + value
        return self.constraints.matcher(schema, ids)

    @functools.lru_cache(maxsize=64)
    def _prefix_ids(self, word: str) -> tuple[int, ...]:
        return tuple(prefix_tokens(self.tokenizer.get_vocab(), word))

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class _EndProbe:
    """Stands in for a grammar matcher in the generation loop: reads the probability of
    ``<|im_end|>`` from the prompt's last logits and ends the sequence with it (its keys/
    values are kept in the prefix cache, as a finished reply's are)."""

    finished = True

    def __init__(self, end_id: int):
        self.end_id, self.p = end_id, None

    def choose(self, scores) -> int:
        self.p = float(scores.float().softmax(-1)[self.end_id])
        return self.end_id


def _steady_malloc() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which
    tensors of keys/values come from the heap, whose freed holes are rarely returned:
    the RSS creeps up for hours.  A fixed threshold keeps big blocks on mmap (returned
    on free).  Best effort: not glibc, nothing done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD (fixing it disables the dynamic rise)
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD: return freed heap tops
    except (OSError, AttributeError):
        pass
