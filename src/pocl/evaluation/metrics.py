"""Text metrics of the evaluation protocol: ROUGE-L F-measure (rouge-score, Porter stemmer) x 100,
maximised over references, and exact match after answer normalisation; mean and standard
deviation over seeds.

Exact-match normalisations (``EM_NORMALIZATIONS``):

* ``"squad"`` (the default, the papers' protocol): ``normalize_answer`` of the SQuAD v1.1
  evaluation script, which the MiniLLM / DistiLLM / POCL evaluation code (via the
  Super-NaturalInstructions metric script) uses: lowercase, delete ASCII punctuation, replace the
  articles a/an/the (whole words) by a space, collapse whitespace.
* ``"whitespace"``: collapse runs of whitespace and strip the ends; case, punctuation and articles
  count (what pocl did before the option existed).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence


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
    """Runs of whitespace to one space, ends stripped (the ``"whitespace"`` normalisation)."""
    return " ".join(text.split())


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 ``normalize_answer``: lowercase, remove punctuation, remove articles, collapse
    whitespace, in this order (``"squad"``).

    Punctuation is ``string.punctuation`` (ASCII only: typographic quotes and dashes stay); an
    article is replaced by a space, so ``"a-b"`` becomes ``"ab"`` but ``"the cat"`` becomes ``"cat"``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


#: name -> normalisation applied to the prediction and to every reference before comparing
EM_NORMALIZATIONS: dict[str, Callable[[str], str]] = {"squad": normalize_answer, "whitespace": normalize_whitespace}
DEFAULT_EM_NORMALIZATION = "squad"


def exact_match(prediction: str, references: str | Sequence[str], *,
                normalization: str = DEFAULT_EM_NORMALIZATION) -> float:
    """100 if ``prediction`` equals one of ``references`` after ``normalization`` (a key of
    ``EM_NORMALIZATIONS``: ``"squad"``, the default, or ``"whitespace"``), else 0."""
    try:
        norm = EM_NORMALIZATIONS[normalization]
    except KeyError:
        raise ValueError(f"unknown exact-match normalization {normalization!r}; known: "
                         f"{', '.join(EM_NORMALIZATIONS)}") from None
    pred = norm(prediction)
    return 100.0 * any(pred == norm(r) for r in _refs(references))


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
