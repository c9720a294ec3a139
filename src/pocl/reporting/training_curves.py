"""The training-curves plot: train loss and dev CE over global steps, the stage boundaries, and the stage
temperature and alpha (:func:`training_curves_data` reads what :func:`plot_training_curves` draws, also for an
interrupted run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pocl.errors import DataError
from pocl.reporting.figures import (as_finite, latest_trainer_state, new_figure, read_jsonl, read_summary,
                                    save_figure)

__all__ = ["STAGE_COLOR", "TrainingCurves", "plot_training_curves", "training_curves_data"]


STAGE_COLOR = "0.45"


def _stage_boundaries(summary: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The finished stages of summary.json with their start/end global steps."""
    out = []
    start = 0
    for i, st in enumerate((summary or {}).get("stages") or []):
        if not isinstance(st, Mapping) or as_finite(st.get("end_global_step")) is None:
            continue
        end = int(st["end_global_step"])
        index = st.get("index") if isinstance(st.get("index"), int) else i
        out.append({"name": str(st.get("name", f"stage{index + 1}")), "index": index, "start": start, "end": end,
                    "first_step": None, "last_step": None, "temperature": as_finite(st.get("temperature")),
                    "alpha": as_finite(st.get("alpha")), "num_samples": st.get("num_samples"), "finished": True})
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
                        "first_step": step, "last_step": step, "temperature": as_finite(rec.get("temperature")),
                        "alpha": as_finite(rec.get("alpha")), "num_samples": None, "finished": None})
        st = out[-1]
        st["end"] = st["last_step"] = max(st["last_step"], step)
        for field in ("temperature", "alpha"):
            if st[field] is None:
                st[field] = as_finite(rec.get(field))
    for st in out:
        del st["_key"]
    return out


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
    records = [r for r in read_jsonl(metrics_path) if isinstance(r, dict)]
    train = [r for r in records if r.get("split") == "train" and as_finite(r.get("step")) is not None]
    dev = [r for r in records if r.get("split") == "dev" and as_finite(r.get("step")) is not None]
    if not train and not dev:
        raise DataError("no train or dev records", path=str(metrics_path))
    summary = read_summary(run_dir)
    state = latest_trainer_state(run_dir)
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
                lg[field] = as_finite(planned.get(field))
        if lg["num_samples"] is None and isinstance(planned.get("num_samples"), int):
            lg["num_samples"] = planned["num_samples"]
        stages.append(lg)

    steps = [int(r["step"]) for r in train + dev]
    last_step = max(steps + [st["end"] for st in stages] + [0])
    status = str((summary or {}).get("status") or "unknown")
    if summary is not None and as_finite(summary.get("global_steps")) is not None:
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
    has_rouge = any(as_finite(r.get("dev_rouge_l")) is not None for r in dev)

    nrows = 3 if has_rouge else 2
    ratios = [3, 2, 1.6] if has_rouge else [3, 1.6]
    fig, axes = new_figure(10.5, 6.8 if has_rouge else 5.6, nrows, 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    ax = axes[0][0]
    handles = []
    if train:
        steps = [r["step"] for r in train]
        if any(as_finite(r.get("loss")) is not None for r in train):
            handles += ax.plot(steps, [as_finite(r.get("loss")) for r in train], color="tab:blue", linewidth=1.3,
                               label="train loss (1-α)·CE + α·s(T)·KD")
        if any(as_finite(r.get("ce")) is not None for r in train):
            handles += ax.plot(steps, [as_finite(r.get("ce")) for r in train], color="tab:cyan", linewidth=1,
                               alpha=0.8, label="train CE")
    if dev:
        dsteps = [r["step"] for r in dev]
        handles += ax.plot(dsteps, [as_finite(r.get("dev_ce")) for r in dev], color="tab:red", marker="o", markersize=3,
                           linewidth=1.4, label="dev CE")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    _draw_stage_lines(ax, stages, label_top=len(stages) > 1 or data.interrupted_at is not None)
    handles += _draw_interruption(ax, data, label=True)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, borderaxespad=0)
    row = 1
    if has_rouge:
        rax = axes[1][0]
        pts = [(r["step"], as_finite(r.get("dev_rouge_l"))) for r in dev if as_finite(r.get("dev_rouge_l")) is not None]
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
    return save_figure(fig, Path(out_path))
