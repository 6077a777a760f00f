"""Two CPU speed-ups for the transformers backend.  bf16 + int8 pays only on a CPU
that multiplies bf16 natively (AVX-512 BF16 or AMX); SmolLM2-135M, 1 thread:

    CPU with bf16 units, 111-token prompt:   fp32 prefill 412 ms, decode 18 tok/s
                                             bf16 + int8 prefill 214 ms, decode 32 tok/s
    AVX2 only (EPYC), 50-token prompt:       fp32 prefill 310 ms, decode 16 tok/s
                                             bf16 + int8 prefill 1,800 ms, decode 18 tok/s

so ``bf16_is_fast`` times both on the model's own matrix shape when the worker starts,
and the backend keeps fp32 where bf16 is not faster.

* **int8 weight-only decode.** Generating one token reads every weight once, so
  decode is bound by memory bandwidth: int8 weights (per-row scales) halve what
  bf16 reads. Prefill (many tokens at once) is compute-bound and keeps bf16
  weights, which the CPU's bf16 matrix units run fast. The GGUF the model ships as
  is 4-bit, so 8-bit per-row weights lose nothing it still had.
* **Prefix KV cache.** Each turn's prompt starts with the previous turn's prompt
  (system prompt, history): the keys/values of the longest prefix already
  computed on this worker are reused and only the new tokens are prefilled.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from prometheus_client import Gauge

PREFIX_BYTES = Gauge("s2s_llm_prefix_cache_bytes", "Bytes of keys/values the transformers "
                     "backend keeps for the next turns of recent conversations "
                     "(bounded by llm_prefix_cache_mb).")


# Up to this many rows (a decode step of that many sequences) int8 weights win; beyond,
# the bf16 matrix units do (1 thread, 576x1536: 8 rows 0.10 vs 0.16 ms, 16 rows 0.20 vs 0.11)
INT8_ROWS = 8


class Int8DecodeLinear(torch.nn.Module):
    """A Linear with bf16 weights for prefill and int8 weights for one-token steps."""

    # set by the generation loop around its forward passes (True: a decode step, False:
    # a prefill), so that a prompt's keys/values do not depend on how many of its tokens
    # a prefix cache already had: greedy replies stay the same; None: by row count
    decoding: bool | None = None

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("w8", torch.round(w / scale[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("w16", linear.weight.detach().to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if flat.shape[0] <= INT8_ROWS if Int8DecodeLinear.decoding is None \
                else Int8DecodeLinear.decoding:
            y = torch._weight_int8pack_mm(flat, self.w8, self.scale)
        else:
            y = torch.nn.functional.linear(flat, self.w16)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], -1)


def int8_decode_supported() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def bf16_is_fast(model: torch.nn.Module, rows: int = 64, repeats: int = 5) -> bool:
    """Whether a prefill-sized product with the weights of the model's largest layer
    (an MLP projection; the vocabulary head aside) is clearly faster in bf16 than in
    fp32 on this CPU (without bf16 units it is emulated: ~5x slower)."""
    import time

    head = model.get_output_embeddings()
    linear = max((m for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not head),
                 key=lambda m: m.weight.numel())

    def best(dtype: torch.dtype) -> float:
        w = linear.weight.detach().to(dtype)
        x = torch.randn(rows, w.shape[1], dtype=dtype)
        with torch.inference_mode():
            torch.nn.functional.linear(x, w)  # the first call builds the kernel
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - started)
        return min(times)

    return best(torch.bfloat16) < 0.8 * best(torch.float32)


def speed_up_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """bf16 everywhere, int8 one-token steps in every Linear (lm_head included)."""
    model = model.to(torch.bfloat16)

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8DecodeLinear(child))
            else:
                swap(child)

    swap(model)
    return model


class PrefixCache:
    """The keys/values of the last few prompts (+ replies), by token ids, bounded in
    bytes and entries (least recently used go first), so that many sessions with
    growing contexts do not grow the worker's memory.  The system prompt's entry
    (``pin``) stays: every session's first turn starts with it."""

    def __init__(self, max_bytes: int = 64 << 20, size: int = 16):
        self.max_bytes, self.size = max_bytes, size
        self.entries: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.pinned: tuple[int, ...] | None = None
        self.bytes = 0
        self.lock = threading.Lock()

    def lookup(self, ids: list[int]) -> tuple[list | None, int]:
        """(per layer (keys, values) of the longest shared prefix, its length); at least
        the last prompt token is left to compute (its logits choose the first token)."""
        best, best_n = None, 0
        with self.lock:
            for key in self.entries:
                n = 0
                for a, b in zip(key, ids):
                    if a != b:
                        break
                    n += 1
                n = min(n, len(ids) - 1, len(key))
                if n > best_n:
                    best, best_n = key, n
            if best is None:
                return None, 0
            self.entries.move_to_end(best)
            layers = self.entries[best]
        # a private copy of the shared part: the batch appends to it
        return [(k[:, :, :best_n].clone(), v[:, :, :best_n].clone()) for k, v in layers], best_n

    def store(self, ids: list[int], layers: list, pin: bool = False) -> None:
        key = tuple(ids)
        size = _nbytes(layers)
        with self.lock:
            # an entry this one extends is the same conversation one turn ago: its next
            # turn starts with this one, so it is dropped (16 sessions fit in 16 entries)
            for old in [k for k in self.entries if k != self.pinned and len(k) <= len(key)
                        and key[:len(k)] == k]:
                self.bytes -= _nbytes(self.entries.pop(old))
            if size > self.max_bytes and not pin:
                return  # one context larger than the whole budget: not kept
            self.entries[key] = layers
            self.bytes += size
            if pin:
                self.pinned = key
            while len(self.entries) > self.size or self.bytes > self.max_bytes:
                victim = next((k for k in self.entries if k != self.pinned), None)
                if victim is None:
                    break
                self.bytes -= _nbytes(self.entries.pop(victim))
            PREFIX_BYTES.set(self.bytes)


def _nbytes(layers: list) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)
