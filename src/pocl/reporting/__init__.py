"""Plots of runs and evaluations (``pocl report``; see docs/evaluation.md)."""

from pocl.reporting.plots import plot_difficulty, plot_eval_comparison, plot_training_curves, report

__all__ = ["plot_difficulty", "plot_eval_comparison", "plot_training_curves", "report"]
