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

This module holds :func:`report` (every plot the inputs allow); the plots themselves are in
:mod:`pocl.reporting.training_curves`, :mod:`pocl.reporting.difficulty_plot` and
:mod:`pocl.reporting.eval_plot`, their shared helpers in :mod:`pocl.reporting.figures`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pocl.errors import DataError
from pocl.reporting.difficulty_plot import (difficulty_stages, load_ranking_rows, plot_difficulty, run_ranking_path,
                                            score_field)
from pocl.reporting.eval_plot import load_results, plot_eval_comparison
from pocl.reporting.figures import read_summary
from pocl.reporting.training_curves import TrainingCurves, plot_training_curves, training_curves_data

log = logging.getLogger("pocl.report")

__all__ = ["TrainingCurves", "plot_difficulty", "plot_eval_comparison", "plot_training_curves", "report",
           "training_curves_data"]


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
        ranking = run_ranking_path(run_dir)
        if ranking is not None:
            score_field(load_ranking_rows(ranking), ranking)
    if eval_results:
        load_results(eval_results)
    written: list[Path] = []
    for run_dir, name in zip(run_dirs, names):
        written.append(plot_training_curves(run_dir, out / f"{name}_training_curves.png", title=f"Training: {name}"))
        ranking = run_ranking_path(run_dir)
        if ranking is not None:
            stages = difficulty_stages(run_dir, read_summary(run_dir))
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
