"""Plots of runs and evaluations (``pocl report``; see docs/evaluation.md)."""

from pocl.reporting.plots import (
    TrainingCurves,
    plot_difficulty,
    plot_eval_comparison,
    plot_training_curves,
    report,
    training_curves_data,
)

__all__ = ["TrainingCurves", "plot_difficulty", "plot_eval_comparison", "plot_training_curves", "report",
           "training_curves_data"]
