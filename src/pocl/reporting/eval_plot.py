"""The evaluation plot: grouped bars of a metric per evaluation set (and Avg) for the models of one or more
``pocl eval`` results.json files, with error bars = std over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocl.errors import DataError
from pocl.reporting.figures import as_finite, new_figure, save_figure

__all__ = ["load_results", "plot_eval_comparison"]


def load_results(paths: Sequence[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise DataError("results.json of `pocl eval` not found", path=str(p))
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"not a results.json of `pocl eval` (invalid JSON: {e})", path=str(p)) from None
        if not isinstance(data, dict) or "models" not in data or "sets" not in data:
            raise DataError("not a results.json of `pocl eval` (no 'models' and 'sets')", path=str(p))
        out.append((str(p), data))
    return out


def plot_eval_comparison(results_paths: Sequence[str | Path], out_path: str | Path, *, metric: str = "rouge_l",
                         title: str | None = None) -> Path:
    """Grouped bars: one group per evaluation set (+ Avg), one bar per model; error bars = std over seeds."""
    loaded = load_results(results_paths)
    bars: dict[str, dict[str, tuple[float, float]]] = {}  # model label -> set -> (mean, std)
    set_order: list[str] = []
    seeds_info = set()
    for path, data in loaded:
        seeds_info.add(f"{len(data.get('seeds', []))} seeds, {data.get('std', 'sample')} std")
        for s in data["sets"]:
            if s not in set_order:
                set_order.append(s)
        for model, entry in data["models"].items():
            label = model
            if label in bars:  # the same model name in two results files
                label = f"{model} ({Path(path).parent.name})"
            bars[label] = {}
            for s, res in entry.get("sets", {}).items():
                m = res.get(metric) or {}
                if as_finite(m.get("mean")) is not None:
                    bars[label][s] = (m["mean"], as_finite(m.get("std")) or 0.0)
            avg = (entry.get("avg") or {}).get(metric)
            if avg and len(entry.get("sets", {})) > 1:
                bars[label]["Avg"] = (avg["mean"], as_finite(avg.get("std")) or 0.0)
    groups = set_order + (["Avg"] if any("Avg" in v for v in bars.values()) else [])
    if not bars or not groups:
        raise DataError("no scores to plot", path=", ".join(p for p, _ in loaded))
    n_models = len(bars)
    width = 0.8 / n_models
    fig, axes = new_figure(max(7.5, 2.8 + len(groups) * (0.5 + 0.32 * n_models)), 4.6)
    ax = axes[0][0]
    cmap = __import__("matplotlib").colormaps["tab10" if n_models <= 10 else "tab20"]
    top = 0.0
    for j, (label, per_set) in enumerate(bars.items()):
        xs = [g + (j - (n_models - 1) / 2) * width for g in range(len(groups))]
        means = [per_set.get(g, (math.nan, 0))[0] for g in groups]
        stds = [per_set.get(g, (0, 0))[1] for g in groups]
        rects = ax.bar(xs, means, width * 0.92, yerr=stds, capsize=3, label=label, color=cmap(j % cmap.N),
                       error_kw={"elinewidth": 1, "ecolor": "0.2"})
        if n_models * len(groups) <= 24:
            ax.bar_label(rects, labels=[f"{m:.1f}" if not math.isnan(m) else "" for m in means], fontsize=7,
                         padding=2 + 0 * len(stds))
        top = max([top] + [m + s for m, s in zip(means, stds) if not math.isnan(m)])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel({"rouge_l": "ROUGE-L F × 100", "exact_match": "exact match (%)"}.get(metric, metric))
    ax.set_ylim(0, top * 1.18 + 1e-9 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="model",
              title_fontsize=8)
    what = {"rouge_l": "ROUGE-L", "exact_match": "Exact match"}.get(metric, metric)
    fig.suptitle(title or f"{what} per evaluation set (error bars: std over seeds; {'; '.join(sorted(seeds_info))})",
                 fontsize=10)
    return save_figure(fig, Path(out_path))
