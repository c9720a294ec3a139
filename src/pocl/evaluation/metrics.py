"""Text metrics of the evaluation protocol: ROUGE-L F-measure (rouge-score, Porter stemmer) x 100,
maximised over references, and exact match after whitespace normalisation; mean and standard
deviation over seeds."""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _refs(references: str | Sequence[str]) -> list[str]:
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure x 100 of ``prediction`` against the best of ``references``.

    rouge-score's default tokenizer lowercases and keeps only ASCII letters and digits, so an empty
    or punctuation-only text scores 0 against anything.
    """
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _refs(references))


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """100 if ``prediction`` equals one of ``references`` after whitespace normalisation, else 0."""
    pred = normalize_whitespace(prediction)
    return 100.0 * any(pred == normalize_whitespace(r) for r in _refs(references))


def mean_std(values: Sequence[float], *, std: str = "sample") -> tuple[float, float]:
    """Mean and standard deviation of ``values`` (e.g. one score per seed).

    ``std="sample"`` divides by n - 1 (the unbiased variance estimate), ``"population"`` by n. A single
    value has a standard deviation of 0 in both conventions (nothing to spread over).
    """
    if std not in ("sample", "population"):
        raise ValueError(f"std must be 'sample' or 'population', got {std!r}")
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, 0.0
    ddof = 1 if std == "sample" else 0
    var = sum((v - mean) ** 2 for v in vals) / (n - ddof)
    return mean, var ** 0.5
