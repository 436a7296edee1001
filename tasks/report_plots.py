"""The figures of `scf report` (docs/paper-toy/), after the paper's: each function takes plain data,
writes one PNG with the non-interactive Agg backend (as `tasks.plots`) and returns its path."""

from __future__ import annotations

from pathlib import Path

from tasks.plots import DEGRADES, IMPROVES, _save, plt

PARENT_GREY = "#718096"
SOURCE_COLORS = {"base": "#2b6cb0", "secondary": "#dd6b20", "neither": "#a0aec0"}


def rates_with_intervals(rows: list[tuple[str, float, float, float]], title: str, out: Path) -> Path:
    """Bars of a rate per row with its interval (paper Figure 1: repetition rate per method).

    Args:
        rows: ``(label, estimate, low, high)``; labels of parents start with ``base`` or ``secondary``.
        title: the figure title.
        out: the PNG to write.
    """
    labels = [r[0] for r in rows]
    est = [100 * r[1] for r in rows]
    err = [[100 * (r[1] - r[2]) for r in rows], [100 * (r[3] - r[1]) for r in rows]]
    colors = [PARENT_GREY if r[0].startswith(("base", "secondary")) else IMPROVES for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 1), 3.5))
    ax.bar(labels, est, color=colors, yerr=err, capsize=3)
    ax.set_ylabel("looping generations (%)")
    ax.set_ylim(0, max(10, *(100 * r[3] for r in rows)) * 1.1)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    return _save(fig, out)


def deltas(
    rows: list[str], columns: list[str], values: list[list[float | None]], title: str, out: Path
) -> Path:
    """Per-benchmark change of each method against the mean of its parents (paper Figure 8).

    Args:
        rows: method labels.
        columns: benchmark headers.
        values: ``values[i][j]``: row i's delta on column j (None: not measured).
        title: the figure title.
        out: the PNG to write.
    """
    fig, axes = plt.subplots(
        1, len(columns), figsize=(3.2 * len(columns), 0.35 * len(rows) + 1.5), squeeze=False, sharey=True
    )
    for j, (ax, column) in enumerate(zip(axes[0], columns, strict=True)):
        shown = [values[i][j] or 0.0 for i in range(len(rows))]
        ax.barh(rows, shown, color=[IMPROVES if v >= 0 else DEGRADES for v in shown])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(column, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis() if j == 0 else None
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def sources(rows: list[tuple[str, dict[str, float]]], title: str, out: Path) -> Path:
    """Stacked shares of fused values equal to the base's, the secondary's, or neither (paper Figure 7).

    Args:
        rows: ``(method, {"base": share, "secondary": share, "neither": share})``.
        title: the figure title.
        out: the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for key, color in SOURCE_COLORS.items():
        widths = [100 * shares[key] for _, shares in rows]
        ax.barh([r[0] for r in rows], widths, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("share of fused values (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    return _save(fig, out)


def per_layer(
    series: dict[str, dict[int, float]],
    ylabel: str,
    title: str,
    out: Path,
    *,
    log: bool = False,
    band: tuple[float, float] | None = None,
) -> Path:
    """One line per method over the layers (paper Figures 3-4: principal angle, NSS; and sparsity).

    Args:
        series: method -> layer -> value.
        ylabel: the y axis label.
        title: the figure title.
        out: the PNG to write.
        log: log-scale y axis (spectral shift spans orders of magnitude).
        band: a shaded (low, high) band, e.g. the paper's 5-15%.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if band is not None:
        ax.axhspan(*band, color="#c6f6d5", label="paper's claim")
    for method, values in series.items():
        layers = sorted(values)
        style = {"linewidth": 2.5, "color": "black"} if method == "scf_rkl" else {"linewidth": 1}
        ax.plot(layers, [values[k] for k in layers], marker="o", label=method, **style)
    ax.set_xticks(sorted({layer for values in series.values() for layer in values}))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, out)
