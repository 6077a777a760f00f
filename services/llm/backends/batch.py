"""One generation loop for every session a transformers worker serves: decode steps
of all active replies run as ONE forward pass (a batch of left-padded KV caches),
and a new turn's prompt is prefilled before the next step of older replies.

Why: one token step of a 135M model reads every weight once and pays ~10 ms of
framework overhead, whatever the rows; 8 replies in one step cost 2.5x one (SmolLM2,
1 thread, 300-token contexts: 27 ms for 1 row, 48 ms for 4, 68 ms for 8), where
threads each stepping their own reply fight for the same 2 cores.
Why prefill first: a new turn waits for its first words, an older reply is already
being spoken and only has to stay ahead of the voice (turn-aware scheduling).

The loop runs in one thread (one torch thread).  A consumer that goes away sets
``seq.stop``: its row leaves the batch after the current step (tens of ms), and a
prefill or a step with only stopped rows is abandoned inside the forward pass.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from typing import Callable

import torch
from prometheus_client import Gauge, Histogram

from . import batch_kv
from .batch_kv import GrowingLayer, pad as _pad, use_row_attention

log = logging.getLogger("s2s.llm")

BATCH_ROWS = Histogram("s2s_llm_batch_rows", "Replies advanced by one decode step of the "
                       "transformers backend (batched in one forward pass).",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16))
STEP_SECONDS = Histogram("s2s_llm_step_seconds", "Time of one forward pass of the transformers "
                         "backend, by kind (prefill: a new turn's prompt; decode: one token of "
                         "every active reply).", ["kind"],
                         buckets=(.01, .02, .04, .06, .08, .1, .15, .2, .3, .5, 1, 2))
WAITING = Gauge("s2s_llm_waiting", "New turns waiting for their prefill in the transformers "
                "backend's generation loop.")


class Stopped(Exception):
    """Raised inside the model's forward pass to abandon work nobody waits for."""


class Sequence:
    """One reply being generated: prompt ids in, text pieces out through callbacks."""

    def __init__(self, ids: list[int], max_tokens: int, temperature: float,
                 on_text: Callable[[str], None], on_end: Callable[[BaseException | None], None],
                 matcher=None, avoid: "NgramBan | None" = None):
        self.ids = list(ids)          # prompt + generated tokens
        self.matcher = matcher        # constrained.Matcher: only tokens its grammar allows
        self.avoid = avoid            # runs of the session's earlier replies not to say again
        self.prompt_len = len(ids)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.on_text, self.on_end = on_text, on_end
        self.stop = threading.Event()
        self.cached = 0               # tokens whose keys/values are in the cache
        self.sent = 0                 # characters of the decoded reply already sent
        self.done = False

    @property
    def reply(self) -> list[int]:
        return self.ids[self.prompt_len:]


class BatchEngine:
    def __init__(self, model, tokenizer, prefix, device: str, max_batch: int,
                 eos_ids: set[int], no_repeat_ngram: int, repetition_penalty: float):
        self.model, self.tokenizer, self.prefix = model, tokenizer, prefix
        self.device, self.max_batch = device, max_batch
        self.eos_ids, self.ngram, self.penalty = eos_ids, no_repeat_ngram, repetition_penalty
        self.pending: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.cache = None             # DynamicCache, rows = self.active, left-padded
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 real, 0 padding
        self.forwarding: list[Sequence] = []   # whose forward pass runs now
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0                # decode forwards run (tests, bench)
        self.prefills = 0
        self.rows_stepped = 0         # sequences advanced by them
        use_row_attention(model)
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers or [model]:
            layer.register_forward_pre_hook(self._check_stop)
        self.thread = threading.Thread(target=self._run, name="llm-batch", daemon=True)
        self.thread.start()

    # --- called from other threads ---------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self.cond:
            self.pending.append(seq)
            self.cond.notify()

    def wake(self) -> None:
        """A sequence was stopped: let the loop drop it even if it sleeps."""
        with self.cond:
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        # the loop ends after its current forward pass: joined, so that the interpreter
        # does not exit under a running torch op ("terminate called...")
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # --- the loop ----------------------------------------------------------------------------
    def _check_stop(self, module, args) -> None:
        # before every decoder layer: a few ms between checks
        if self.forwarding and all(s.stop.is_set() for s in self.forwarding):
            raise Stopped

    def _run(self) -> None:
        torch.set_num_threads(1)  # per thread in OpenMP: this loop is the engine's one core
        while True:
            with self.cond:
                while not self.closed and not self.pending and not self.active:
                    self.cond.wait()
                if self.closed:
                    break
                # turn-aware: a waiting new turn is prefilled before older replies step on
                new = self.pending.popleft() if self.pending and \
                    len(self.active) < self.max_batch else None
            try:
                self._drop_stopped()
                if new is not None:
                    self._prefill(new)
                    self.prefills += 1
                    if self.prefills % TRIM_EVERY == 0:
                        _malloc_trim()
                elif self.active:
                    self._step()
            except Exception as e:  # a bug or a torch error: fail the replies, keep serving
                log.exception("LLM batch step failed")
                failed = self.active + ([new] if new is not None and new not in self.active
                                        and not new.done else [])
                self.active, self.cache, self.mask = [], None, None
                for seq in failed:
                    self._finish(seq, e)
        for seq in list(self.pending) + self.active:
            self._finish(seq, None)

    def _forward(self, seqs: list[Sequence], decoding: bool, **kwargs):
        from .cpu_speed import INT8_ROWS, Int8DecodeLinear

        self.forwarding = seqs
        Int8DecodeLinear.decoding = decoding and len(seqs) <= INT8_ROWS
        WAITING.set(len(self.pending))
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                return self.model(use_cache=True, **kwargs)
        finally:
            self.forwarding = []
            Int8DecodeLinear.decoding = None
            STEP_SECONDS.labels("decode" if decoding else "prefill").observe(
                time.perf_counter() - started)

    def _prefill(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        if seq.stop.is_set():
            return self._finish(seq, None)
        layers, n = self.prefix.lookup(seq.ids)  # only the tokens past a known prefix
        cache = DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()
        new = seq.ids[n:]
        # padded to a few lengths: every distinct matrix shape makes oneDNN build and keep
        # a kernel (its cache of 1024 grew the worker's memory turn after turn); causal
        # attention keeps the padding out of the real tokens, and its keys are cut below
        padded = _bucket(len(new))
        todo = torch.tensor([new + new[-1:] * (padded - len(new))], device=self.device)
        pos = torch.arange(n, n + padded, device=self.device)
        try:
            out = self._forward([seq], False, input_ids=todo, past_key_values=cache,
                                position_ids=pos[None], cache_position=pos,
                                logits_to_keep=padded - len(new) + 1)  # not the whole prompt's
        except Stopped:
            return self._finish(seq, None)
        seq.cached = len(seq.ids)
        for layer in out.past_key_values.layers:
            layer.keys, layer.values = layer.keys[:, :, :seq.cached], layer.values[:, :, :seq.cached]
        self._join(seq, out.past_key_values)
        self._advance([seq], out.logits[:, 0, :])

    def _join(self, seq: Sequence, cache) -> None:
        """Add a prefilled sequence as a new row, left-padding the shorter side."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache, self.active = DynamicCache(), [seq]
            self.cache.layers = [GrowingLayer(layer.keys, layer.values) for layer in cache.layers]
            self.mask = torch.ones(1, seq.cached, dtype=torch.long, device=self.device)
            return
        length, own = self.mask.shape[1], seq.cached
        width = max(length, own)
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.replace(torch.cat([_pad(mine.keys, width), _pad(new.keys, width)]),
                         torch.cat([_pad(mine.values, width), _pad(new.values, width)]))
        row = torch.ones(1, own, dtype=torch.long, device=self.device)
        self.mask = torch.cat([_pad(self.mask, width, dim=1), _pad(row, width, dim=1)])
        self.active.append(seq)

    def _step(self) -> None:
        """One token for every active sequence, in one forward pass."""
        rows = len(self.active)
        length = self.mask.shape[1]
        mask = torch.cat([self.mask, torch.ones(rows, 1, dtype=torch.long,
                                                device=self.device)], dim=1)
        last = torch.tensor([[s.ids[-1]] for s in self.active], device=self.device)
        pos = torch.tensor([[s.cached] for s in self.active], device=self.device)
        batch_kv.row_starts = [length - s.cached for s in self.active]
        try:
            out = self._forward(list(self.active), True, input_ids=last, past_key_values=self.cache,
                                attention_mask=mask, position_ids=pos,
                                cache_position=torch.tensor([length], device=self.device))
        except Stopped:  # every row was stopped mid-step: the cache may be half updated
            stopped, self.active, self.cache, self.mask = self.active, [], None, None
            for seq in stopped:
                self._finish(seq, None)
            return
        finally:
            batch_kv.row_starts = None
        self.cache, self.mask = out.past_key_values, mask
        self.steps += 1
        self.rows_stepped += rows
        BATCH_ROWS.observe(rows)
        for seq in self.active:
            seq.cached += 1
        self._advance(list(self.active), out.logits[:, -1, :])

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token, send its text, retire finished rows."""
        # a copy: the bans write into it, and an fp32 model's logits are inference tensors
        logits = logits.to(torch.float32, copy=True)
        for row, seq in enumerate(seqs):
            if seq.stop.is_set():
                continue  # dropped below
            token = self._choose(seq, logits[row])
            seq.ids.append(token)
            ended = token in self.eos_ids or len(seq.reply) >= seq.max_tokens or \
                (seq.matcher is not None and seq.matcher.finished)
            self._send(seq, final=ended)
            if ended:
                seq.done = True
        self._drop_stopped()

    def _choose(self, seq: Sequence, scores: torch.Tensor) -> int:
        if seq.matcher is not None:  # the grammar decides what may come: no penalties
            return seq.matcher.choose(scores)
        reply = seq.reply
        if self.penalty != 1.0:  # as transformers' repetition_penalty: the whole conversation
            seen = torch.tensor(sorted(set(seq.ids)), device=scores.device)
            picked = scores[seen]
            scores[seen] = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        banned = repeated_ngram_ends(reply, self.ngram)
        if seq.avoid is not None:
            banned |= seq.avoid.after(reply)
        if banned:
            scores[list(banned)] = -float("inf")
        if seq.temperature > 0:
            probs = torch.softmax(scores / seq.temperature, dim=-1)
            return int(torch.multinomial(probs, 1))
        return int(torch.argmax(scores))

    def _send(self, seq: Sequence, final: bool) -> None:
        # like transformers' TextStreamer: decoded text up to the last space (a word may
        # still grow, a multi-byte character may be half decoded), the rest at the end
        text = self.tokenizer.decode(seq.reply, skip_special_tokens=True)
        if not final:
            text = text if text.endswith("\n") else text[:text.rfind(" ") + 1]
            if text.endswith("\ufffd"):
                return
        if len(text) > seq.sent:
            seq.on_text(text[seq.sent:])
            seq.sent = len(text)

    def _drop_stopped(self) -> None:
        gone = [i for i, s in enumerate(self.active) if s.done or s.stop.is_set()]
        if not gone:
            return
        width, leaving = self.mask.shape[1], [self.active[i] for i in gone]
        for i, seq in zip(gone, leaving):
            if seq.done and not seq.stop.is_set():
                self._remember(seq, i, width)
        keep = [i for i in range(len(self.active)) if i not in gone]
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
        else:
            index = torch.tensor(keep, device=self.device)
            mask = self.mask[index]
            # columns that only padded the rows that left are cut away
            start = int((mask.sum(dim=0) > 0).nonzero()[0])
            self.mask = mask[:, start:].contiguous()
            for layer in self.cache.layers:
                layer.replace(layer.keys[index, :, start:], layer.values[index, :, start:])
        for seq in leaving:  # told once the batch no longer holds them
            self._finish(seq, None)

    def _remember(self, seq: Sequence, row: int, width: int) -> None:
        """This reply's own keys/values (the right end of its row) for the next turn."""
        n = seq.cached
        layers = [(layer.keys[row:row + 1, :, width - n:].clone(),
                   layer.values[row:row + 1, :, width - n:].clone())
                  for layer in self.cache.layers]
        self.prefix.store(seq.ids[:n], layers)

    def _finish(self, seq: Sequence, error: BaseException | None) -> None:
        seq.done = True
        try:
            seq.on_end(error)
        except Exception:  # the consumer's loop is gone (shutdown)
            pass


TRIM_EVERY = 32  # prefills between returns of freed heap memory to the system


def _malloc_trim() -> None:
    """Give freed heap pages back (glibc keeps them, in every thread's arena: tensors
    of many sizes come and go each turn, and the RSS crept up for minutes)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def repeated_ngram_ends(reply: list[int], n: int) -> set[int]:
    """Tokens that would repeat an ``n``-gram the reply already said (0: none banned).
    Only the reply's own: transformers' no_repeat_ngram_size also bans n-grams of the
    prompt, so a reply could not say "the capital of France" after the user did."""
    if n <= 0 or len(reply) < n:
        return set()
    tail = reply[len(reply) - n + 1:]
    return {reply[i + n - 1] for i in range(len(reply) - n + 1) if reply[i:i + n - 1] == tail}


class NgramBan:
    """Tokens that would say again a run of ``n`` tokens of some other texts (the
    session's earlier replies): a small model copies its own history ("Boil water. Add
    tea. Enjoy your dinner." to the spider, the tea and a speech alike), and a reply that
    may not repeat any ``n`` tokens of them has to say something new."""

    def __init__(self, texts_ids: list[list[int]], n: int):
        self.n = n
        self.next: dict[tuple[int, ...], set[int]] = {}
        for ids in texts_ids if n > 0 else []:
            for i in range(len(ids) - n + 1):
                self.next.setdefault(tuple(ids[i:i + n - 1]), set()).add(ids[i + n - 1])

    def __bool__(self) -> bool:
        return bool(self.next)

    def after(self, reply: list[int]) -> set[int]:
        if not self.next or len(reply) < self.n - 1:
            return set()
        return set(self.next.get(tuple(reply[len(reply) - self.n + 1:]), ()))


def _bucket(tokens: int) -> int:
    """Prefill lengths: multiples of 16 up to 128, then of 64."""
    step = 16 if tokens <= 128 else 64
    return -(-tokens // step) * step
