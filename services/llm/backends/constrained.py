"""Grammar-constrained decoding for the transformers backend, with xgrammar: a reply
that must be JSON valid against a schema (a tool call) can only ever be that.  Each
step the matcher masks every token the grammar does not allow; the stop token is allowed
only once the JSON is complete."""

from __future__ import annotations

import json
import threading

import torch


class JsonConstraints:
    """Compiled schemas of one tokenizer (compiling takes ~10-50 ms: kept by schema)."""

    CACHE = 64

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        import xgrammar as xg

        self.xg = xg
        self.info = xg.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=sorted(stop_ids))
        self.compiler = xg.GrammarCompiler(self.info, max_threads=1)
        self.compiled: dict[str, object] = {}
        self.lock = threading.Lock()

    def matcher(self, schema: dict, bias: dict[int, float] | None = None) -> "Matcher":
        # not sort_keys: the grammar writes properties in the schema's order
        key = json.dumps(schema)
        with self.lock:
            grammar = self.compiled.get(key)
            if grammar is None:
                grammar = self.compiler.compile_json_schema(key, any_whitespace=False,
                                                            strict_mode=True)
                if len(self.compiled) >= self.CACHE:
                    self.compiled.pop(next(iter(self.compiled)))
                self.compiled[key] = grammar
        return Matcher(self.xg, grammar, self.info.vocab_size, bias)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, xg, grammar, vocab_size: int, bias: dict[int, float] | None = None):
        self.xg = xg
        self.bias = (torch.tensor(list(bias), dtype=torch.long),
                     torch.tensor(list(bias.values()))) if bias else None
        self.matcher = xg.GrammarMatcher(grammar)
        self.bitmask = xg.allocate_token_bitmask(1, vocab_size)

    def choose(self, scores: torch.Tensor) -> int:
        """The likeliest token the grammar allows next (greedy), accepted."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # a contiguous copy: the kernel reads rows by their stride, and a row of the
        # batch's logits is a strided view
        masked = scores.detach().float().contiguous().view(1, -1)
        self.xg.apply_token_bitmask_inplace(masked, self.bitmask.to(scores.device))
        if self.bias is not None:  # a token the grammar forbids stays at -inf
            ids, values = self.bias
            masked[0, ids.to(masked.device)] += values.to(masked.device)
        token = int(torch.argmax(masked))
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}")
        return token

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()
