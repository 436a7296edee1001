"""The sweep's figures, after the paper's: score delta vs the parents' mean (Figure 8), repetition
rate per model (Figure 1) and where each candidate's parameters come from (Figure 7).

Each function takes plain data, writes one PNG with the non-interactive Agg backend and returns its
path, so it runs on a headless worker.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

IMPROVES, DEGRADES = "#2b6cb0", "#c53030"  # blue / red, as in the paper's Figure 8


def score_deltas(entries: list[dict], out: Path) -> Path:
    """Per-benchmark score change of each merged candidate against the mean of its parents.

    Args:
        entries: leaderboard entries (``results_db.leaderboard``); parents are skipped.
        out: the PNG to write.

    Returns:
        ``out``.
    """
    merges = [entry for entry in entries if entry["kind"] == "merge"]
    keys = sorted({key for entry in merges for key in entry["deltas"]})
    fig, axes = plt.subplots(
        1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 0.4 * len(merges) + 1.5), squeeze=False
    )
    for ax, key in zip(axes[0], keys, strict=False):
        labels = [entry["label"] for entry in merges]
        deltas = [entry["deltas"].get(key) or 0.0 for entry in merges]
        ax.barh(labels, deltas, color=[IMPROVES if d >= 0 else DEGRADES for d in deltas])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Score change vs mean of parents", fontsize=10)
    return _save(fig, out)


def repetition_rates(entries: list[dict], out: Path) -> Path:
    """Share of looping generations per model (parents first), the paper's Figure 1.

    Args:
        entries: leaderboard entries.
        out: the PNG to write.

    Returns:
        ``out``.
    """
    labels = [entry["label"] for entry in entries]
    rates = [100 * (entry["repetition_rate"] or 0.0) for entry in entries]
    colors = ["#718096" if entry["kind"] == "parent" else IMPROVES for entry in entries]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 1), 3.5))
    ax.bar(labels, rates, color=colors)
    ax.set_ylabel("repetition rate (%)")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.set_title("Repetition rate per model (grey: parents)", fontsize=10)
    return _save(fig, out)


def parameter_sources(fractions: dict[str, dict[str, float]], out: Path) -> Path:
    """Stacked share of parameters taken from the base, each secondary, or neither, per candidate.

    Args:
        fractions: candidate label -> ``merge_report["totals"]["fraction_from"]``.
        out: the PNG to write.

    Returns:
        ``out``.
    """
    labels = list(fractions)
    origins = sorted({origin for shares in fractions.values() for origin in shares}, key=_origin_order)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.5))
    left = [0.0] * len(labels)
    for origin in origins:
        shares = [100 * fractions[label].get(origin, 0.0) for label in labels]
        ax.barh(labels, shares, left=left, label=origin)
        left = [a + b for a, b in zip(left, shares, strict=True)]
    ax.set_xlabel("share of parameters (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(labelsize=7)
    ax.set_title("Parameter source distribution", fontsize=10)
    return _save(fig, out)


def _origin_order(origin: str) -> tuple[int, str]:
    return ({"base": 0, "neither": 2}.get(origin, 1), origin)


def _save(fig: plt.Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
