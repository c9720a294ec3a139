"""Evaluation: text metrics and scoring of generations."""

from pocl.evaluation.metrics import exact_match, normalize_whitespace, rouge_l

__all__ = ["exact_match", "normalize_whitespace", "rouge_l"]
