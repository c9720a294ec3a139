"""Text metrics of the evaluation protocol: ROUGE-L F-measure (rouge-score, Porter stemmer) x 100,
maximised over references, and exact match after whitespace normalisation."""

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
