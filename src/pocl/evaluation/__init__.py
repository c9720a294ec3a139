"""Evaluation: text metrics, evaluation-set formats, generation-based scoring over seeds,
per-difficulty breakdowns and reports (``pocl eval``; see docs/evaluation.md)."""

from pocl.evaluation.metrics import (EM_NORMALIZATIONS, exact_match, mean_std, normalize_answer, normalize_whitespace,
                                     rouge_l)

_LAZY = {
    "EvalConfig": "pocl.config.eval",
    "EvalSet": "pocl.evaluation.formats",
    "load_eval_set": "pocl.evaluation.formats",
    "SampleResult": "pocl.evaluation.runner",
    "SeedResult": "pocl.evaluation.runner",
    "SetResult": "pocl.evaluation.runner",
    "EvalReport": "pocl.evaluation.runner",
    "evaluate_records": "pocl.evaluation.runner",
    "average_over_sets": "pocl.evaluation.runner",
    "run_eval": "pocl.evaluation.runner",
    "Ranking": "pocl.evaluation.breakdown",
    "Breakdown": "pocl.evaluation.breakdown",
    "load_ranking": "pocl.evaluation.breakdown",
    "markdown_report": "pocl.evaluation.report",
    "results_table": "pocl.evaluation.report",
}


def __getattr__(name):  # lazy: the metrics stay importable without torch and transformers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pocl.evaluation' has no attribute {name!r}")


__all__ = ["EM_NORMALIZATIONS", "exact_match", "mean_std", "normalize_answer", "normalize_whitespace", "rouge_l",
           *_LAZY]
