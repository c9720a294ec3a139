"""The interval plot of a matrix: each comparison's mean difference per evaluation set and Avg with its
95 % bootstrap interval (``paired_intervals`` of the experiment matrix), one row per comparison, a line at 0,
and optionally a reference line (the paper's average effect)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocl.errors import DataError
from pocl.reporting.figures import new_figure, save_figure

__all__ = ["plot_paired_intervals"]


def plot_paired_intervals(intervals: Sequence[dict[str, Any]], out_path: str | Path, *,
                          reference: float | None = None, reference_label: str = "",
                          title: str | None = None) -> Path:
    """One panel per column (the sets, then Avg): a point at each comparison's mean difference and a bar
    over its interval (``intervals``: the dicts of ``paired_intervals``, with ``label`` and
    ``cols[col]`` = ``{mean, low, high}``). A dashed line at ``reference`` (e.g. +1.93, the paper's
    average POCL effect) when given. Returns the PNG path (written atomically)."""
    if not intervals:
        raise DataError("no intervals to plot")
    cols = list(intervals[0]["cols"])
    labels = [row["label"] for row in intervals]
    legend = reference is not None and bool(reference_label)
    fig, axes = new_figure(2.6 * len(cols) + 2.2, 0.9 + 0.42 * len(labels) + 0.3 * legend, ncols=len(cols),
                           sharey=True)
    lows = [row["cols"][c]["low"] for row in intervals for c in cols]
    highs = [row["cols"][c]["high"] for row in intervals for c in cols]
    span = [min(lows + [0.0] + ([reference] if reference is not None else [])),
            max(highs + [0.0] + ([reference] if reference is not None else []))]
    pad = 0.08 * (span[1] - span[0] or 1.0)
    ys = list(range(len(labels)))[::-1]
    for k, col in enumerate(cols):
        ax = axes[0][k]
        for y, row in zip(ys, intervals):
            c = row["cols"][col]
            color = "tab:green" if c["low"] > 0 else ("tab:red" if c["high"] < 0 else "0.3")
            ax.plot([c["low"], c["high"]], [y, y], color=color, lw=2)
            ax.plot([c["mean"]], [y], "o", color=color, ms=4)
        ax.axvline(0.0, color="0.5", lw=0.8)
        if reference is not None:
            ax.axvline(reference, color="tab:blue", lw=0.8, ls="--", label=reference_label or None)
        ax.set_xlim(span[0] - pad, span[1] + pad)
        ax.set_title(col, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
        if k == 0:
            ax.set_yticks(ys, labels, fontsize=8)
    if legend:  # below the panels: inside one it can hide a row's interval
        fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="outside lower center", fontsize=7, frameon=False)
    fig.suptitle(title or "difference in ROUGE-L with 95 % bootstrap interval (green / red: excludes 0)",
                 fontsize=10)
    return save_figure(fig, Path(out_path))
