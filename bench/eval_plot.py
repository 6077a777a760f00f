"""The turn-taking figure of ``s2s eval --plot`` (docs/turn-taking.md): per group, the
latency heard, the audio heard too early, how fast a reply falls silent when the user
goes on or interrupts, and the rates, each beside its target (issue 19)."""

from __future__ import annotations

from typing import Any

TARGETS = {"v2v_p50_ms": 800, "early_heard_p95_s": 0.3, "recovery_ms": 200, "stop_ms": 300}
RATE_TARGETS = [("backchannel_cancels", "backchannel\ncancels", 0.10, "≤"),
                ("interruptions_stopped", "interruptions\nstopped ≤300 ms", 0.95, "≥"),
                ("digit_error_rate", "digit\nerror rate", 0.02, "≤"),
                ("echo_rate", "echo", 0.05, "≤"), ("repeat_rate", "repeat", 0.02, "≤")]


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {g: s for g, s in report["summary"].items() if g != "all"}
    convs = report["conversations"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 8.5))
    title = report.get("label") or "s2s eval"
    fig.suptitle(f"{title}: turn-taking as the client heard it")

    names = [g for g, s in summary.items() if s["v2v_p50_ms"] is not None]
    x = range(len(names))
    ax[0][0].bar([i - 0.2 for i in x], [summary[g]["v2v_p50_ms"] for g in names], 0.4,
                 label="p50")
    ax[0][0].bar([i + 0.2 for i in x], [summary[g]["v2v_p95_ms"] for g in names], 0.4,
                 label="p95")
    ax[0][0].axhline(TARGETS["v2v_p50_ms"], color="k", ls="--", lw=1,
                     label="statements p50 target")
    ax[0][0].set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
    ax[0][0].set_ylabel("voice-to-voice (ms)")
    ax[0][0].legend(fontsize=8)

    groups = sorted({c["group"] for c in convs})
    early = {g: [sum(t.get("early_heard_s") or 0 for t in c["turns"]) for c in convs
                 if c["group"] == g and any(t.get("early_heard_s") is not None
                                            for t in c["turns"])] for g in groups}
    early = {g: v for g, v in early.items() if v}
    for i, (g, values) in enumerate(early.items()):
        ax[0][1].scatter([i] * len(values), values, alpha=0.6)
    ax[0][1].axhline(TARGETS["early_heard_p95_s"], color="k", ls="--", lw=1,
                     label="target (p95)")
    ax[0][1].set_xticks(range(len(early)), list(early), rotation=35, ha="right", fontsize=8)
    ax[0][1].set_ylabel("reply audio heard before the last piece (s)")
    ax[0][1].legend(fontsize=8)

    recovery = [r * 1000 for c in convs for t in c["turns"] for r in t.get("recovery_s") or []]
    stops = [t["cue"]["stop_s"] * 1000 for c in convs for t in c["turns"]
             if t.get("cue") and t["cue"]["kind"] == "interruption" and t["cue"]["cut"]]
    cancels = [t["cue"]["stop_s"] * 1000 for c in convs for t in c["turns"]
               if t.get("cue") and t["cue"]["kind"] == "backchannel" and t["cue"]["cut"]]
    series = [("resumed speech\n→ reply silent", recovery, TARGETS["recovery_ms"]),
              ("interruption\n→ reply silent", stops, TARGETS["stop_ms"]),
              ("backchannel\n→ reply cut (bad)", cancels, None)]
    for i, (name, values, target) in enumerate(series):
        ax[1][0].scatter([i] * len(values), values, alpha=0.6)
        if target:
            ax[1][0].hlines(target, i - 0.3, i + 0.3, color="k", ls="--", lw=1)
    ax[1][0].set_xticks(range(len(series)), [s[0] for s in series], fontsize=8)
    ax[1][0].set_ylabel("ms after the user's speech began (dashed: target)")

    every = report["summary"].get("all", {})
    rates = [(label, every.get(key), target, sign) for key, label, target, sign in RATE_TARGETS]
    ax[1][1].bar(range(len(rates)), [(r[1] or 0) * 100 for r in rates], color="tab:blue")
    for i, (_, value, target, sign) in enumerate(rates):
        ax[1][1].hlines(target * 100, i - 0.4, i + 0.4, color="k", ls="--", lw=1)
        ax[1][1].text(i, target * 100, f"{sign}{target * 100:g}%", ha="center",
                      va="bottom", fontsize=7)
        if value is None:
            ax[1][1].text(i, 1, "not run", ha="center", fontsize=7)
    ax[1][1].set_xticks(range(len(rates)), [r[0] for r in rates], fontsize=8)
    ax[1][1].set_ylabel("% (all groups; dashed: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
