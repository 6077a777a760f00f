"""Keys/values and attention of the batched generation loop (batch.py): a cache layer
that grows in place, and a decode attention that runs row by row over each row's
own keys of the left-padded batch."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

# Where each row's real keys start in the left-padded batch during a decode step, or None
row_starts: list[int] | None = None
ROW_ATTENTION = "s2s_rows"


def row_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention of a decode step row by row over each row's own keys (no padding):
    the same arithmetic as the reply alone, so a greedy reply does not depend on which
    other replies share the step (padding would change the sums' order, and a rounding
    difference can flip a near tie).  Plain matmuls: for one query token torch's CPU
    flash kernel costs ~10x more.  The weights, the costly part, stay batched."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = row_starts
    if starts is None or query.shape[2] != 1 or len(starts) != query.shape[0]:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, **kwargs)
    _, heads, _, dim = query.shape
    groups = heads // key.shape[1]  # query heads per key/value head (GQA)
    scale = scaling if scaling is not None else dim ** -0.5
    outs = []
    for i, start in enumerate(starts):
        q = query[i].reshape(key.shape[1], groups, dim)
        k, v = key[i, :, start:], value[i, :, start:]
        weights = torch.softmax(torch.matmul(q, k.transpose(1, 2)).float() * scale, dim=-1)
        outs.append(torch.matmul(weights.to(v.dtype), v).reshape(heads, dim))
    return torch.stack(outs)[:, None], None  # [rows, 1 token, heads, dim]


class GrowingLayer(DynamicLayer):
    """One layer's keys/values of the batch in buffers with room to grow: a decode step
    writes its column in place (transformers' DynamicLayer copies the whole cache with
    torch.cat at every token: for 8 replies of 300 tokens that was a third of a step)."""

    ROOM = 64  # spare columns per (re)allocation

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.replace(keys, values)

    def update(self, key_states, value_states, *args, **kwargs):
        n, extra = self.n, key_states.shape[2]
        if n + extra > self.kbuf.shape[2]:
            self.replace(self.keys, self.values, room=extra + self.ROOM + n // 2)
        self.kbuf[:, :, n:n + extra] = key_states
        self.vbuf[:, :, n:n + extra] = value_states
        self._view(n + extra)
        return self.keys, self.values

    def replace(self, keys: torch.Tensor, values: torch.Tensor, room: int = ROOM) -> None:
        """New contents (rows joined or gone): copied into fresh buffers."""
        b, h, n, d = keys.shape
        self.kbuf, self.vbuf = keys.new_empty(b, h, n + room, d), values.new_empty(b, h, n + room, d)
        self.kbuf[:, :, :n] = keys
        self.vbuf[:, :, :n] = values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._view(n)

    def _view(self, n: int) -> None:
        self.n, self.keys, self.values = n, self.kbuf[:, :, :n], self.vbuf[:, :, :n]


def use_row_attention(model) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ROW_ATTENTION, row_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_ATTENTION, sdpa_mask)
    model.config._attn_implementation = ROW_ATTENTION


def pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad ``t`` with zeros along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
