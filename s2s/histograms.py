"""Prometheus's ``histogram_quantile`` over cumulative buckets, for the code that reads
histograms itself (the bench's client-side figures, the gateway's live page) so that
their quantiles are the ones a Prometheus would give for the same buckets."""

from __future__ import annotations

import math
from typing import Sequence

Buckets = Sequence[tuple[float, float]]  # (upper bound ``le``, cumulative count), ascending


def histogram_quantile(q: float, cumulative: Buckets) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation inside its bucket; None for no
    observations; above the highest finite bucket, that bucket's bound (as Prometheus)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in cumulative:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le
