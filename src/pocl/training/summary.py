"""The run summary: ``summary.json`` (everything) and ``summary.md`` (a readable table).

:func:`run_summary` is the whole document, built from the trainer's state (each finished stage's entry
is :func:`pocl.training.stages.stage_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pocl.artifacts import atomic_write
from pocl.training import selection


def run_summary(status: str, state, *, config, extra: dict[str, Any], has_dev: bool, fingerprints: dict[str, Any],
                output_dir: Path, num_processes: int) -> dict[str, Any]:
    """``summary.json`` of a run with ``status`` ("completed"/"interrupted"): ``extra`` (e.g. the
    ranking's timing) first, then the run's steps, method, timings, best model and stages. The best
    values are real values of the metric (a checkpoint of an older version stored dev ROUGE-L negated:
    converted once, in ``state``)."""
    selection.Selection(config.train.selection_metric, state).adopt()
    name = state.selection_metric or config.train.selection_metric
    note = None
    if state.best_step is None:
        note = ("no dev set: no dev evaluation and no best/ model (final/ is the run's model)"
                if not has_dev else "no dev evaluation with a finite value yet: no best/ model")
    return {
        **extra,
        "status": status,
        "global_steps": state.global_step,
        "skipped_steps": state.skipped_steps,
        "on_policy_steps": state.on_policy_steps,
        "replayed_steps": state.replayed_steps,
        "generation_seconds": state.generation_seconds,
        **({"skd": dict(state.skd)} if state.skd else {}),
        "method": config.loss.method,
        "train_seconds": state.train_seconds,
        "selection_metric": name,
        "selection_direction": selection.metric(name).direction,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "best_note": note,
        "stages": state.stage_summaries,
        "fingerprints": fingerprints,
        "output_dir": str(output_dir),
        "num_processes": num_processes,
    }


def _fmt(value: Any, spec: str = ".4g") -> str:
    """A table cell: "–" for None, floats by ``spec``."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: the run's summary as a short list and a table of its stages."""
    lines = [f"# Run summary: `{summary.get('output_dir', '')}`", ""]
    lines.append(f"- status: **{summary['status']}**")
    lines.append(f"- optimizer steps: {summary['global_steps']} ({summary['skipped_steps']} skipped as non-finite)")
    ranking = summary.get("ranking")
    train_s = summary.get("train_seconds", 0.0)
    if ranking:
        rank_s = ranking.get("measure_seconds", ranking.get("seconds", 0.0))
        share = 100.0 * rank_s / max(rank_s + train_s, 1e-9)
        how = (f"reused (measuring it took {rank_s:.1f} s)" if ranking.get("reused")
               else f"{ranking.get('action', 'computed')} in {ranking.get('seconds', 0.0):.1f} s")
        lines.append(f"- difficulty ranking ({summary.get('measurer', 'rrf')}): {how}; the measurement is "
                     f"{share:.1f}% of measurement + training time; {ranking.get('reason', '')}")
    lines.append(f"- training: {train_s:.1f} s")
    metric = summary.get("selection_metric", "dev_ce")
    direction = f", {summary['selection_direction']}" if summary.get("selection_direction") else ""
    if summary.get("best_metric") is not None:
        lines.append(f"- best model (best/) by {metric}{direction}: {summary['best_metric']:.4f} at step "
                     f"{summary['best_step']}")
    elif summary.get("best_note"):
        lines.append(f"- best model: {summary['best_note']}")
    if summary.get("selection_note"):
        lines.append(f"- note: {summary['selection_note']}")
    overrides = summary.get("curriculum_overrides") or {}
    for key in ("alpha", "temperature"):
        if key in overrides:
            lines.append(f"- --{key} {overrides[key]:g} overrode every stage of the curriculum")
    if "max_steps" in overrides:
        changes = "; ".join(overrides.get("max_steps_changes") or []) or "no stage was cut"
        lines.append(f"- --max-steps {overrides['max_steps']} capped the curriculum: {changes}")
    lines += ["", f"| stage | samples | epochs | steps | T | alpha | skew | wall time (s) | best {metric} in stage |",
              "|---|---|---|---|---|---|---|---|---|"]
    for st in summary.get("stages", []):
        lines.append("| {name} | {n} | {ep} | {steps}{early} | {t} | {a} | {skew} | {secs} | {dev} |".format(
            name=st["name"], n=st["num_samples"], ep=_fmt(st["epochs"]), steps=st["steps"],
            early=" (plateau)" if st.get("advanced_early") else "", t=_fmt(st["temperature"], ".3g"),
            a=_fmt(st["alpha"], ".3g"), skew=_fmt(st.get("skew"), ".3g"), secs=_fmt(st["train_seconds"], ".1f"),
            dev=_fmt(st.get("best_in_stage"))))
    lines.append("")
    return "\n".join(lines)


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    """Write summary.json and summary.md atomically."""
    output_dir = Path(output_dir)
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str)),
                       ("summary.md", render_markdown(summary))):
        atomic_write(output_dir / name, text)
