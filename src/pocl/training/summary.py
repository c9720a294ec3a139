"""The run summary: ``summary.json`` (everything) and ``summary.md`` (a readable table)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
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
        tmp = output_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output_dir / name)
