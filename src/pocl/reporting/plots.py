"""PNG plots of runs and evaluations (matplotlib, Agg; no display needed).

- :func:`plot_training_curves`: train loss and dev CE over global steps from ``metrics.jsonl``, the
  stage boundaries (``summary.json`` ``stages[*].end_global_step``) as vertical lines, and the stage
  temperature and alpha in a second panel. An interrupted run has no summary entry for its unfinished
  stage: that stage comes from the train records of ``metrics.jsonl`` (which carry ``stage``,
  ``stage_index``, ``temperature`` and ``alpha``), and the title says "interrupted at step N"
  (:func:`training_curves_data` computes what is drawn).
- :func:`plot_difficulty`: the difficulty scores of a ranking file (``ranking.jsonl``) sorted by rank
  and as a histogram, with the stage cut points (``summary.json`` ``stages[*].num_samples``; for an
  interrupted run also the stages of the newest checkpoint's stage plan).
- :func:`plot_eval_comparison`: grouped bars of ROUGE-L per evaluation set (and Avg) for the models
  of one or more ``pocl eval`` results.json files, with error bars = std over seeds.

Figures are drawn with :class:`matplotlib.figure.Figure` (no pyplot state) and written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pocl.errors import DataError

log = logging.getLogger("pocl.report")

#: fields of a ranking line that hold a difficulty score, in order of preference
SCORE_FIELDS = ("score", "rrf_score", "rrf", "difficulty", "rouge_l", "loss")
SCORE_LABELS = {"score": "fused RRF score (higher = easier)", "rrf_score": "fused RRF score (higher = easier)",
                "rrf": "fused RRF score (higher = easier)", "difficulty": "difficulty score",
                "rouge_l": "initial student's ROUGE-L", "loss": "initial student's loss (CE)"}
STAGE_COLOR = "0.45"


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            # a line cut by a crash at the very end of a file is tolerated
            if number == len(lines):
                log.warning("%s:%d: skipping an incomplete last line", path, number)
                continue
            raise DataError(f"invalid JSON: {e}", path=str(path), line=number) from None
    return rows


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    return None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"invalid JSON: {e}", path=str(path)) from None


def _stage_boundaries(summary: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The finished stages of summary.json with their start/end global steps."""
    out = []
    start = 0
    for i, st in enumerate((summary or {}).get("stages") or []):
        if not isinstance(st, Mapping) or _num(st.get("end_global_step")) is None:
            continue
        end = int(st["end_global_step"])
        index = st.get("index") if isinstance(st.get("index"), int) else i
        out.append({"name": str(st.get("name", f"stage{index + 1}")), "index": index, "start": start, "end": end,
                    "first_step": None, "last_step": None, "temperature": _num(st.get("temperature")),
                    "alpha": _num(st.get("alpha")), "num_samples": st.get("num_samples"), "finished": True})
        start = end
    return out


def _stages_from_metrics(train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stages read from the train records of metrics.jsonl, in order: each stage's first and last logged step
    and the temperature and alpha it logged (its rows carry ``stage``, ``stage_index``, ``temperature``,
    ``alpha``). ``start`` is the previous stage's end (0 for the first), ``end`` its last logged step."""
    out: list[dict[str, Any]] = []
    for rec in train:
        index = rec.get("stage_index") if isinstance(rec.get("stage_index"), int) else None
        name = rec.get("stage")
        key = (index, name) if index is not None else (None, name)
        step = int(rec["step"])
        if not out or out[-1]["_key"] != key:
            start = out[-1]["end"] if out else 0
            out.append({"_key": key, "name": str(name if name is not None else f"stage{len(out) + 1}"),
                        "index": index if index is not None else len(out), "start": start, "end": step,
                        "first_step": step, "last_step": step, "temperature": _num(rec.get("temperature")),
                        "alpha": _num(rec.get("alpha")), "num_samples": None, "finished": None})
        st = out[-1]
        st["end"] = st["last_step"] = max(st["last_step"], step)
        for field in ("temperature", "alpha"):
            if st[field] is None:
                st[field] = _num(rec.get(field))
    for st in out:
        del st["_key"]
    return out


def _latest_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """trainer_state.json of the run's newest checkpoint (``state`` and the stage plan ``stages``), or None
    when there is none or it cannot be read (only used to fill in what summary.json lacks)."""
    best: tuple[int, Path] | None = None
    for path in (run_dir / "checkpoints").glob("step-*/trainer_state.json"):
        try:
            step = int(path.parent.name.split("-", 1)[1])
        except ValueError:
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        return None
    try:
        data = json.loads(best[1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s: unreadable, not used for the stage plan", best[1])
        return None
    return data if isinstance(data, dict) else None


@dataclasses.dataclass
class TrainingCurves:
    """What :func:`plot_training_curves` draws, read from a run folder by :func:`training_curves_data`.

    ``stages``: every stage that finished (summary.json, else the newest checkpoint's trainer state) or has
    logged train steps (metrics.jsonl), in order, each a dict with ``name``, ``index``, ``start`` and ``end``
    (the global steps the stage spans on the x axis: from the previous stage's end to its own last step),
    ``first_step``/``last_step`` (its first and last logged train step; None when not known),
    ``temperature``, ``alpha``, ``num_samples`` and ``finished``. ``status``: summary.json's status
    (``completed``, ``interrupted``), or ``unknown`` without a summary.json. ``interrupted_at``: the last
    global step of a run that did not complete (None for a completed run)."""

    run_dir: Path
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    status: str
    last_step: int
    interrupted_at: int | None

    @property
    def note(self) -> str | None:
        """The title's mark of a run that did not complete."""
        if self.interrupted_at is None:
            return None
        if self.status == "unknown":
            return f"unfinished: no summary.json, last logged step {self.interrupted_at}"
        return f"{self.status} at step {self.interrupted_at}"


def training_curves_data(run_dir: str | Path) -> TrainingCurves:
    """Read metrics.jsonl, summary.json and (for what they lack) the newest checkpoint of ``run_dir``.

    An interrupted run has no summary entry for its unfinished stage: that stage is taken from the train
    records of metrics.jsonl (its span up to the last step, its logged T and alpha; the checkpoint's stage
    plan fills in T, alpha and the sample count when the records lack them)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError("no metrics.jsonl here (is this the output folder of `pocl distill`?)", path=str(run_dir))
    records = [r for r in _read_jsonl(metrics_path) if isinstance(r, dict)]
    train = [r for r in records if r.get("split") == "train" and _num(r.get("step")) is not None]
    dev = [r for r in records if r.get("split") == "dev" and _num(r.get("step")) is not None]
    if not train and not dev:
        raise DataError("no train or dev records", path=str(metrics_path))
    summary = read_summary(run_dir)
    state = _latest_trainer_state(run_dir)
    finished = _stage_boundaries(summary)
    if summary is None and state is not None:  # a run stopped before it wrote summary.json
        inner = state.get("state")
        done = inner.get("stage_summaries") if isinstance(inner, dict) else None
        if isinstance(done, list):
            finished = _stage_boundaries({"stages": done})
    logged = _stages_from_metrics(train)
    plan = [p for p in (state or {}).get("stages") or [] if isinstance(p, dict)]

    stages = [dict(st) for st in finished]
    for lg in logged:
        match = next((st for st in stages if st["index"] == lg["index"] and st["name"] == lg["name"]), None)
        if match is not None:  # a finished stage: its logged steps
            match["first_step"], match["last_step"] = lg["first_step"], lg["last_step"]
            continue
        if stages and lg["last_step"] <= stages[-1]["end"]:
            continue  # steps inside the finished stages (a stage that summary.json names otherwise)
        lg = dict(lg, start=stages[-1]["end"] if stages else 0, finished=False)
        planned = plan[lg["index"]] if 0 <= lg["index"] < len(plan) else {}
        for field in ("temperature", "alpha"):
            if lg[field] is None:
                lg[field] = _num(planned.get(field))
        if lg["num_samples"] is None and isinstance(planned.get("num_samples"), int):
            lg["num_samples"] = planned["num_samples"]
        stages.append(lg)

    steps = [int(r["step"]) for r in train + dev]
    last_step = max(steps + [st["end"] for st in stages] + [0])
    status = str((summary or {}).get("status") or "unknown")
    if summary is not None and _num(summary.get("global_steps")) is not None:
        last_step = max(last_step, int(summary["global_steps"]))
    interrupted_at = None if status == "completed" else last_step
    if stages and not stages[-1]["finished"] and interrupted_at is not None:
        stages[-1]["end"] = max(stages[-1]["end"], interrupted_at)
    for st in stages[:-1]:
        st["finished"] = True  # a later stage has logged steps
    if stages and status == "completed":
        stages[-1]["finished"] = True
    return TrainingCurves(run_dir, train, dev, stages, status, last_step, interrupted_at)


def _draw_stage_lines(ax, stages: list[dict[str, Any]], *, label_top: bool) -> None:
    for k, st in enumerate(stages):
        if k < len(stages) - 1:
            ax.axvline(st["end"], color=STAGE_COLOR, linestyle="--", linewidth=1, zorder=1)
        if label_top:
            mid = (st["start"] + st["end"]) / 2
            name = str(st["name"]) + (" (unfinished)" if st.get("finished") is False else "")
            ax.annotate(name, xy=(mid, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8, color="0.25",
                        annotation_clip=False)


def _draw_interruption(ax, data: TrainingCurves, *, label: bool) -> list:
    if data.interrupted_at is None:
        return []
    line = ax.axvline(data.interrupted_at, color="tab:red", linestyle=":", linewidth=1.4, zorder=1,
                      label=data.note if label else None)
    return [line] if label else []


def plot_training_curves(run_dir: str | Path, out_path: str | Path, *, title: str | None = None) -> Path:
    """Train loss and dev CE over global steps, stage boundaries, and T and alpha per stage
    (:func:`training_curves_data`); a run that did not complete is marked in the title and by a red line."""
    data = training_curves_data(run_dir)
    run_dir, train, dev, stages = data.run_dir, data.train, data.dev, data.stages
    has_rouge = any(_num(r.get("dev_rouge_l")) is not None for r in dev)

    nrows = 3 if has_rouge else 2
    ratios = [3, 2, 1.6] if has_rouge else [3, 1.6]
    fig, axes = _figure(10.5, 6.8 if has_rouge else 5.6, nrows, 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    ax = axes[0][0]
    handles = []
    if train:
        steps = [r["step"] for r in train]
        if any(_num(r.get("loss")) is not None for r in train):
            handles += ax.plot(steps, [_num(r.get("loss")) for r in train], color="tab:blue", linewidth=1.3,
                               label="train loss (1-α)·CE + α·s(T)·KD")
        if any(_num(r.get("ce")) is not None for r in train):
            handles += ax.plot(steps, [_num(r.get("ce")) for r in train], color="tab:cyan", linewidth=1,
                               alpha=0.8, label="train CE")
    if dev:
        dsteps = [r["step"] for r in dev]
        handles += ax.plot(dsteps, [_num(r.get("dev_ce")) for r in dev], color="tab:red", marker="o", markersize=3,
                           linewidth=1.4, label="dev CE")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    _draw_stage_lines(ax, stages, label_top=len(stages) > 1 or data.interrupted_at is not None)
    handles += _draw_interruption(ax, data, label=True)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, borderaxespad=0)
    row = 1
    if has_rouge:
        rax = axes[1][0]
        pts = [(r["step"], _num(r.get("dev_rouge_l"))) for r in dev if _num(r.get("dev_rouge_l")) is not None]
        rax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:green", marker="o", markersize=3)
        rax.set_ylabel("dev ROUGE-L")
        rax.grid(alpha=0.3)
        _draw_stage_lines(rax, stages, label_top=False)
        _draw_interruption(rax, data, label=False)
        row = 2

    kax = axes[row][0]
    tax = kax.twinx()
    xs, temps, alphas = [], [], []
    for st in stages:
        xs += [st["start"], st["end"]]
        temps += [st["temperature"]] * 2
        alphas += [st["alpha"]] * 2
    h1 = kax.plot(xs, temps, color="tab:orange", linewidth=2, label="temperature T")
    h2 = tax.plot(xs, alphas, color="tab:purple", linewidth=2, linestyle=":", label="KD weight α")
    kax.set_ylabel("T", color="tab:orange")
    tax.set_ylabel("α", color="tab:purple")
    t_vals = [t for t in temps if t is not None] or [1.0]
    a_vals = [a for a in alphas if a is not None] or [1.0]
    kax.set_ylim(min(t_vals) - 0.15 * max(1e-3, max(t_vals) - min(t_vals)) - 0.1,
                 max(t_vals) + 0.25 * max(1e-3, max(t_vals) - min(t_vals)) + 0.1)
    tax.set_ylim(max(0.0, min(a_vals) - 0.1), min(1.05, max(a_vals) + 0.1) if max(a_vals) <= 1 else max(a_vals) + 0.1)
    kax.grid(alpha=0.3)
    _draw_stage_lines(kax, stages, label_top=False)
    _draw_interruption(kax, data, label=False)
    kax.legend(handles=h1 + h2, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, borderaxespad=0)
    kax.set_xlabel("global optimizer step")
    heading = title or f"Training curves: {run_dir.name or run_dir}"
    if data.note:
        heading += f" ({data.note})"
    fig.suptitle(heading, fontsize=11)
    return _save(fig, Path(out_path))


def _load_ranking_rows(path: Path) -> list[dict[str, Any]]:
    rows = [r for r in _read_jsonl(path) if isinstance(r, dict) and r.get("id") is not None and
            r.get("rank") is not None]
    if not rows:
        raise DataError("no ranked samples (no line with 'id' and 'rank')", path=str(path))
    return sorted(rows, key=lambda r: r["rank"])


def _score_field(rows: list[dict[str, Any]], ranking_path: Path) -> str:
    field = next((f for f in SCORE_FIELDS if sum(_num(r.get(f)) is not None for r in rows) >= len(rows) / 2), None)
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


def _difficulty_stages(run_dir: Path, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """summary.json's stages, then those of the newest checkpoint's stage plan that it lacks (an interrupted
    run): the cut points of every planned stage."""
    stages = [st for st in (summary or {}).get("stages") or [] if isinstance(st, Mapping)]
    state = _latest_trainer_state(run_dir)
    plan = [p for p in (state or {}).get("stages") or [] if isinstance(p, Mapping)]
    if not stages and state is not None and isinstance(state.get("state"), dict):
        stages = [st for st in state["state"].get("stage_summaries") or [] if isinstance(st, Mapping)]
    return {"stages": list(stages) + plan[len(stages):]}


def plot_difficulty(ranking_path: str | Path, out_path: str | Path, *, summary: Mapping[str, Any] | None = None,
                    title: str | None = None) -> Path:
    """Difficulty scores by rank and their histogram, with the stage cut points."""
    ranking_path = Path(ranking_path)
    rows = _load_ranking_rows(ranking_path)
    field = _score_field(rows, ranking_path)
    pairs = [(r["rank"], _num(r.get(field))) for r in rows if _num(r.get(field)) is not None]
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
    signals = [f for f in ("rouge_l", "loss") if f != field and all(_num(r.get(f)) is not None for r in rows)]
    ncols = 3 if len(signals) == 2 else 2
    fig, axes = _figure(5.0 * ncols, 4.2, 1, ncols)
    ax, hax = axes[0][0], axes[0][1]
    ax.plot(ranks, values, color="tab:blue", linewidth=1.2)
    ax.set_xlabel("rank (1 = easiest)")
    ax.set_ylabel(SCORE_LABELS.get(field, field))
    ax.grid(alpha=0.3)
    hax.hist(values, bins=min(40, max(5, n // 10)), color="tab:blue", alpha=0.75, edgecolor="white")
    hax.set_xlabel(SCORE_LABELS.get(field, field))
    hax.set_ylabel("samples")
    hax.grid(alpha=0.3)
    by_rank = {r["rank"]: _num(r.get(field)) for r in rows}
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
            sax.scatter([_num(r["loss"]) for r in pts], [_num(r["rouge_l"]) for r in pts], s=10, alpha=0.8,
                        color=cmap(g / max(len(groups) - 1, 1) * 0.9), label=label)
        sax.set_xlabel(SCORE_LABELS["loss"])
        sax.set_ylabel(SCORE_LABELS["rouge_l"])
        sax.set_title("the two signals (colour: first stage that trains on the sample)", fontsize=8.5)
        sax.grid(alpha=0.3)
        sax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.suptitle(title or f"Difficulty ranking: {n} samples ({ranking_path.name})", fontsize=11)
    return _save(fig, Path(out_path))


def _load_results(paths: Sequence[str | Path]) -> list[tuple[str, dict[str, Any]]]:
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
    loaded = _load_results(results_paths)
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
                if _num(m.get("mean")) is not None:
                    bars[label][s] = (m["mean"], _num(m.get("std")) or 0.0)
            avg = (entry.get("avg") or {}).get(metric)
            if avg and len(entry.get("sets", {})) > 1:
                bars[label]["Avg"] = (avg["mean"], _num(avg.get("std")) or 0.0)
    groups = set_order + (["Avg"] if any("Avg" in v for v in bars.values()) else [])
    if not bars or not groups:
        raise DataError("no scores to plot", path=", ".join(p for p, _ in loaded))
    n_models = len(bars)
    width = 0.8 / n_models
    fig, axes = _figure(max(7.5, 2.8 + len(groups) * (0.5 + 0.32 * n_models)), 4.6)
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
    return _save(fig, Path(out_path))


def _ranking_path(run_dir: Path) -> Path | None:
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


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return keep.strip("_") or "run"


def report(run_dirs: Sequence[str | Path] = (), eval_results: Sequence[str | Path] = (), *,
           output_dir: str | Path | None = None, metric: str = "rouge_l") -> list[Path]:
    """Write every plot that the inputs allow; return the written files.

    Per run folder: ``<run>_training_curves.png`` and, when it has a ranking, ``<run>_difficulty.png``;
    for the eval results: ``eval_<metric>.png``. ``output_dir`` defaults to ``FIRST_RUN/plots`` (or the
    folder of the first results.json).
    """
    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs and not eval_results:
        raise DataError("nothing to plot: give run folders and/or --eval-results files")
    if output_dir is None:
        output_dir = run_dirs[0] / "plots" if run_dirs else Path(eval_results[0]).parent / "plots"
    out = Path(output_dir)
    _check_plots_dir(out, run_dirs, eval_results)
    names = [_slug(r.resolve().name) for r in run_dirs]
    if len(set(names)) < len(names):  # runs/a/kd and runs/b/kd
        names = [_slug(f"{r.resolve().parent.name}_{r.resolve().name}") for r in run_dirs]
    # Every input is read before anything is drawn: a bad one is refused with no plot written.
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise DataError("run folder not found", path=str(run_dir))
        training_curves_data(run_dir)
        ranking = _ranking_path(run_dir)
        if ranking is not None:
            _score_field(_load_ranking_rows(ranking), ranking)
    if eval_results:
        _load_results(eval_results)
    written: list[Path] = []
    for run_dir, name in zip(run_dirs, names):
        written.append(plot_training_curves(run_dir, out / f"{name}_training_curves.png", title=f"Training: {name}"))
        ranking = _ranking_path(run_dir)
        if ranking is not None:
            stages = _difficulty_stages(run_dir, read_summary(run_dir))
            written.append(plot_difficulty(ranking, out / f"{name}_difficulty.png", summary=stages,
                                           title=f"Difficulty ranking of {name} ({ranking.name})"))
        else:
            log.info("%s: no ranking.jsonl, no difficulty plot", run_dir)
    if eval_results:
        written.append(plot_eval_comparison(eval_results, out / f"eval_{metric}.png", metric=metric))
    return written


def _check_plots_dir(out: Path, run_dirs: Sequence[Path], eval_results: Sequence[str | Path]) -> None:
    """Refuse (ConfigError, exit 2) a --output-dir that is one of the inputs (a run folder, a results.json or
    its folder), or contains one, or is a non-empty folder that holds anything but pocl's plots."""
    from pocl.errors import ConfigError
    from pocl.training.output_dirs import check_output_dir

    resolved = out.resolve()
    inputs = [("run", r) for r in run_dirs]
    for e in eval_results:
        e = Path(e)
        inputs.append(("evaluation results", e))
        if e.is_file():
            inputs.append(("evaluation results", e.parent))
    for label, inp in inputs:
        inp_res = inp.resolve()
        if resolved == inp_res or resolved in inp_res.parents:
            rel = "is" if resolved == inp_res else "contains"
            raise ConfigError(f"--output-dir {out} {rel} the {label} folder {inp}; pocl report never writes into its "
                              "inputs: give another --output-dir (default: RUN_DIR/plots)")
    check_output_dir(out, kind="plots")
