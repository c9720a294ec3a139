"""The difficulty plot: the scores of a ranking file (``ranking.jsonl``) by rank and as a histogram, with the
stage cut points, and where a run folder's ranking and stage plan are found.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pocl.errors import DataError
from pocl.reporting.figures import as_finite, latest_trainer_state, new_figure, read_jsonl, save_figure

__all__ = ["SCORE_FIELDS", "SCORE_LABELS", "difficulty_stages", "load_ranking_rows", "plot_difficulty",
           "run_ranking_path", "score_field"]


#: fields of a ranking line that hold a difficulty score, in order of preference
SCORE_FIELDS = ("score", "rrf_score", "rrf", "difficulty", "rouge_l", "loss")
SCORE_LABELS = {"score": "fused RRF score (higher = easier)", "rrf_score": "fused RRF score (higher = easier)",
                "rrf": "fused RRF score (higher = easier)", "difficulty": "difficulty score",
                "rouge_l": "initial student's ROUGE-L", "loss": "initial student's loss (CE)"}


def load_ranking_rows(path: Path) -> list[dict[str, Any]]:
    rows = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("id") is not None and
            r.get("rank") is not None]
    if not rows:
        raise DataError("no ranked samples (no line with 'id' and 'rank')", path=str(path))
    return sorted(rows, key=lambda r: r["rank"])


def score_field(rows: list[dict[str, Any]], ranking_path: Path) -> str:
    field = next((f for f in SCORE_FIELDS if sum(as_finite(r.get(f)) is not None for r in rows) >= len(rows) / 2), None)
    if field is None:
        raise DataError(f"no difficulty score field ({', '.join(SCORE_FIELDS)}) in the ranking lines",
                        path=str(ranking_path))
    return field


def _stage_sizes(summary: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``{"name", "num_samples"}`` of each stage of ``summary["stages"]`` (finished or planned)."""
    out = []
    for i, st in enumerate((summary or {}).get("stages") or []):
        if isinstance(st, Mapping):
            out.append({"name": str(st.get("name", f"stage{i + 1}")), "num_samples": st.get("num_samples")})
    return out


def difficulty_stages(run_dir: Path, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """summary.json's stages, then those of the newest checkpoint's stage plan that it lacks (an interrupted
    run): the cut points of every planned stage."""
    stages = [st for st in (summary or {}).get("stages") or [] if isinstance(st, Mapping)]
    state = latest_trainer_state(run_dir)
    plan = [p for p in (state or {}).get("stages") or [] if isinstance(p, Mapping)]
    if not stages and state is not None and isinstance(state.get("state"), dict):
        stages = [st for st in state["state"].get("stage_summaries") or [] if isinstance(st, Mapping)]
    return {"stages": list(stages) + plan[len(stages):]}


def plot_difficulty(ranking_path: str | Path, out_path: str | Path, *, summary: Mapping[str, Any] | None = None,
                    title: str | None = None) -> Path:
    """Difficulty scores by rank and their histogram, with the stage cut points."""
    ranking_path = Path(ranking_path)
    rows = load_ranking_rows(ranking_path)
    field = score_field(rows, ranking_path)
    pairs = [(r["rank"], as_finite(r.get(field))) for r in rows if as_finite(r.get(field)) is not None]
    ranks = [p[0] for p in pairs]
    values = [p[1] for p in pairs]
    n = len(rows)
    cuts = []  # (samples in the stage, stage name)
    sizes = _stage_sizes(summary)
    stage_names = [str(st["name"]) for st in sizes]
    for st in sizes:
        k = st.get("num_samples")
        if isinstance(k, int) and 0 < k < n:
            cuts.append((k, st["name"]))
    signals = [f for f in ("rouge_l", "loss") if f != field and all(as_finite(r.get(f)) is not None for r in rows)]
    ncols = 3 if len(signals) == 2 else 2
    fig, axes = new_figure(5.0 * ncols, 4.2, 1, ncols)
    ax, hax = axes[0][0], axes[0][1]
    ax.plot(ranks, values, color="tab:blue", linewidth=1.2)
    ax.set_xlabel("rank (1 = easiest)")
    ax.set_ylabel(SCORE_LABELS.get(field, field))
    ax.grid(alpha=0.3)
    hax.hist(values, bins=min(40, max(5, n // 10)), color="tab:blue", alpha=0.75, edgecolor="white")
    hax.set_xlabel(SCORE_LABELS.get(field, field))
    hax.set_ylabel("samples")
    hax.grid(alpha=0.3)
    by_rank = {r["rank"]: as_finite(r.get(field)) for r in rows}
    ordered = sorted(by_rank)
    for j, (k, name) in enumerate(cuts):
        ax.axvline(k + 0.5, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"{name}: {k}", xy=(k + 0.5, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -4 - 11 * (j % 2)),
                    textcoords="offset points", ha="left", va="top", fontsize=7.5, color="tab:red")
        # the score between the last included and the first excluded sample of the stage
        lo, hi = by_rank.get(ordered[k - 1]), by_rank.get(ordered[k]) if k < len(ordered) else None
        if lo is not None and hi is not None:
            hax.axvline((lo + hi) / 2, color="tab:red", linestyle="--", linewidth=1)
            # cut points crowd at the dense end of the histogram: one text row per cut
            hax.annotate(str(name), xy=((lo + hi) / 2, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(2, -4 - 11 * j), textcoords="offset points", ha="left", va="top",
                         fontsize=7.5, color="tab:red")
    if cuts:
        ax.plot([], [], color="tab:red", linestyle="--", label="stage cut (samples in the stage)")
        ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    if len(signals) == 2:
        sax = axes[0][2]
        stage_of = [sum(r["rank"] > k for k, _ in cuts) for r in rows]
        groups = sorted(set(stage_of))
        cmap = __import__("matplotlib").colormaps["viridis"]
        for g in groups:
            pts = [r for r, s in zip(rows, stage_of) if s == g]
            label = (f"from {stage_names[g]}" if cuts and g < len(stage_names) else "all samples")
            sax.scatter([as_finite(r["loss"]) for r in pts], [as_finite(r["rouge_l"]) for r in pts], s=10, alpha=0.8,
                        color=cmap(g / max(len(groups) - 1, 1) * 0.9), label=label)
        sax.set_xlabel(SCORE_LABELS["loss"])
        sax.set_ylabel(SCORE_LABELS["rouge_l"])
        sax.set_title("the two signals (colour: first stage that trains on the sample)", fontsize=8.5)
        sax.grid(alpha=0.3)
        sax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title or f"Difficulty ranking: {n} samples ({ranking_path.name})", fontsize=11)
    return save_figure(fig, Path(out_path))


def run_ranking_path(run_dir: Path) -> Path | None:
    """RUN_DIR/ranking.jsonl, or the curriculum.ranking_file of RUN_DIR/config.yaml."""
    default = run_dir / "ranking.jsonl"
    if default.is_file():
        return default
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            import yaml

            values = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            path = (values.get("curriculum") or {}).get("ranking_file")
        except Exception:  # noqa: BLE001 - a broken config only loses this plot
            path = None
        if path and Path(path).is_file():
            return Path(path)
    return None
