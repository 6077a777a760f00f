"""The dashboard's memory: what changed between sampling ticks, kept for a bounded time,
and the windowed figures worked out from it.

Each tick turns the cumulative series of every process (``dashboard_source``) into deltas
per process, as Prometheus's ``increase()`` does: a process seen for the first time only
sets its baseline, and one whose counters went down has restarted (its new values are the
increase).  The deltas of all processes are summed and kept, sparse, one ``Point``
per tick, in a deque of fixed length, so memory does not grow with uptime or traffic.

Quantiles come from summed histogram buckets the way ``histogram_quantile`` computes them
(linear within the bucket that holds the rank), over a rolling window at each point (the
lines of the charts) or over the whole range the page shows (its headline figures).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from s2s.histograms import histogram_quantile

from .dashboard_source import Labels, Process, Series

STAGES = ("vad", "stt", "llm", "tts")
V2V = "s2s_voice_to_voice_seconds"
STEPS = {"first_transcript": "s2s_time_to_first_transcript_seconds",
         "first_reply_text": "s2s_time_to_first_reply_text_seconds"}
STAGE_HISTS = {"queue_wait": "s2s_stage_queue_wait_seconds",
               "processing": "s2s_stage_processing_seconds",
               "first_output": "s2s_stage_first_output_seconds"}
CUMULATIVE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


@dataclass
class Point:
    t: float
    counts: Series                 # increases over the tick, summed over processes
    sessions_open: float = 0.0
    in_flight: dict[str, float] = field(default_factory=dict)   # by stage, all workers
    workers: dict[str, int] = field(default_factory=dict)       # live workers by stage
    rolling: dict = field(default_factory=dict)  # windowed figures ending at this point


def label(labels: Labels, name: str) -> str:
    for k, v in labels:
        if k == name:
            return v
    return ""


def add_counts(into: Series, counts: Series) -> None:
    for key, v in counts.items():
        into[key] = into.get(key, 0.0) + v


Buckets = list[tuple[float, float]]  # (le, cumulative count), sorted by le


def buckets(counts: Series, name: str, by: str | None = None,
            bounds: Iterable[float] = ()) -> dict[str, Buckets]:
    """Cumulative buckets of histogram ``name`` summed over every other label, by the
    value of label ``by`` ("" when None): {group: [(le, count), ...] sorted by le}.
    Increments are kept sparse, so ``bounds`` (the histogram's ``le`` values) puts back
    the buckets that did not grow: the bucket holding a rank starts at the bound below
    it, whether or not that one grew."""
    acc: dict[str, dict[float, float]] = {}
    for (sample, labels), v in counts.items():
        if sample != name + "_bucket":
            continue
        group = label(labels, by) if by else ""
        le = float(label(labels, "le"))
        acc.setdefault(group, {})
        acc[group][le] = acc[group].get(le, 0.0) + v
    for b in acc.values():
        for le in bounds:
            b.setdefault(le, 0.0)
    return {g: sorted(b.items()) for g, b in acc.items()}


def quantile(q: float, cumulative: Buckets) -> float | None:
    """Prometheus's histogram_quantile over one group's cumulative buckets (seconds)."""
    return histogram_quantile(q, cumulative)


def count(cumulative: Buckets) -> int:
    return int(round(cumulative[-1][1])) if cumulative else 0


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def total(counts: Series, name: str, by: str | None = None) -> dict[str, float]:
    """Sum of counter ``name`` by the value of label ``by``."""
    out: dict[str, float] = {}
    for (sample, labels), v in counts.items():
        if sample == name:
            group = label(labels, by) if by else ""
            out[group] = out.get(group, 0.0) + v
    return out


class History:
    """Points of the last ``keep`` ticks; rolling figures over ``window_s``."""

    def __init__(self, keep: int, window_s: float):
        self.points: deque[Point] = deque(maxlen=max(2, keep))
        self.window_s = window_s
        self.last: dict[str, Series] = {}  # per process: its cumulative values at the last tick
        self.bounds: dict[str, set[float]] = {}  # per histogram: every bucket bound seen
        self.latest: list[Process] = []     # the processes of the last tick, for the worker table

    def rebase(self) -> None:
        """Forget the baselines (after a pause in sampling): the next tick only sets them,
        so the pause is not counted as one huge tick."""
        self.last.clear()

    def add(self, t: float, procs: Iterable[Process]) -> Point:
        procs = list(procs)
        counts: Series = {}
        seen: dict[str, Series] = {}
        for proc in procs:
            if not proc.up:
                continue
            cumulative = {k: v for k, v in proc.series.items()
                          if k[0].endswith(CUMULATIVE_SUFFIXES)}
            before = self.last.get(proc.key)
            seen[proc.key] = cumulative
            for sample, labels in cumulative:
                if sample.endswith("_bucket"):  # the layout: a few dozen bounds in all
                    self.bounds.setdefault(sample[:-len("_bucket")], set()).add(
                        float(label(labels, "le")))
            if before is None:
                continue  # first sight: a baseline, not an increase
            if any(cumulative.get(key, -1.0) < v for key, v in before.items()):
                # a counter went down or vanished: the process restarted (same address),
                # all its values are new; judged per process, not per series, or the
                # buckets of one histogram would disagree with each other
                before = {}
            for key, v in cumulative.items():
                inc = v - before.get(key, 0.0)
                if inc > 0:
                    counts[key] = counts.get(key, 0.0) + inc
        self.last = seen  # processes gone since are forgotten
        self.latest = procs
        point = Point(t, counts)
        for proc in procs:
            if not proc.up:
                continue
            if proc.role in STAGES:
                point.workers[proc.role] = point.workers.get(proc.role, 0) + 1
            for (sample, labels), v in proc.series.items():
                if sample == "s2s_active_sessions":
                    point.sessions_open += v
                elif sample == "s2s_stage_in_flight":
                    stage = label(labels, "stage")
                    point.in_flight[stage] = point.in_flight.get(stage, 0.0) + v
        self.points.append(point)
        point.rolling = self.figures(self.since(t - self.window_s), self.window_s)
        return point

    def since(self, t0: float) -> list[Point]:
        return [p for p in self.points if p.t > t0]

    def figures(self, points: list[Point], span_s: float) -> dict:
        """Every windowed figure the page shows, over ``points`` (which cover ``span_s``)."""
        counts: Series = {}
        for p in points:
            add_counts(counts, p.counts)

        def buckets_of(name: str, by: str | None = None) -> dict[str, Buckets]:
            return buckets(counts, name, by, self.bounds.get(name, ()))

        v2v = buckets_of(V2V).get("", [])
        out: dict = {
            "turns": count(v2v),
            "turns_per_min": round(count(v2v) * 60 / span_s, 2) if span_s > 0 else None,
            "v2v_p50_ms": ms(quantile(0.5, v2v)), "v2v_p95_ms": ms(quantile(0.95, v2v)),
            "sessions_opened": int(round(sum(total(counts, "s2s_sessions_total").values()))),
            "interrupts": int(round(sum(total(counts, "s2s_interrupts_total").values()))),
        }
        for key, name in STEPS.items():
            b = buckets_of(name).get("", [])
            out[f"{key}_p50_ms"], out[f"{key}_p95_ms"] = ms(quantile(0.5, b)), ms(quantile(0.95, b))
        refusals = {r: int(round(n)) for r, n in
                    total(counts, "s2s_rejected_inputs_total", "reason").items() if n > 0}
        items = {}
        for (sample, labels), v in counts.items():
            if sample == "s2s_stage_items_total":
                key = (label(labels, "stage"), label(labels, "outcome"))
                items[key] = items.get(key, 0.0) + v
        errors = {s: int(round(n)) for (s, outcome), n in items.items()
                  if outcome == "error" and n > 0}
        redis_errors = int(round(sum(total(counts, "s2s_redis_errors_total").values())))
        out.update(refusals=refusals, refusals_total=sum(refusals.values()), errors=errors,
                   redis_errors=redis_errors, errors_total=sum(errors.values()) + redis_errors)
        per_stage: dict[str, dict] = {}
        for key, name in STAGE_HISTS.items():
            for stage, b in buckets_of(name, "stage").items():
                if count(b):
                    row = per_stage.setdefault(stage, {})
                    row[f"{key}_p50_ms"] = ms(quantile(0.5, b))
                    row[f"{key}_p95_ms"] = ms(quantile(0.95, b))
                    row[f"{key}_count"] = count(b)
        for (stage, outcome), n in items.items():
            per_stage.setdefault(stage, {})[f"items_{outcome}"] = int(round(n))
        out["stages"] = per_stage
        return out
