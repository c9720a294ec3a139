"""ROUGE-L and exact match against rouge-score itself; mean and std over seeds."""

from __future__ import annotations

import statistics

import pytest
from rouge_score import rouge_scorer

from pocl.evaluation import exact_match, mean_std, rouge_l

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference_rouge(pred: str, refs) -> float:
    refs = [refs] if isinstance(refs, str) else refs
    return 100 * max(SCORER.score(r, pred)["rougeL"].fmeasure for r in refs)


PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("A quick brown fox.", "the quick brown fox jumps over the lazy dog"),
    ("Paris is the capital of France", "The capital of France is Paris."),
    ("1, 2, 3, 4", "1 2 3 4 5"),
    ("completely unrelated words", "nothing in common here"),
    ("He was RUNNING quickly", "he runs quick"),
]


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_rouge_l_equals_rouge_score(pred, ref):
    assert rouge_l(pred, ref) == pytest.approx(reference_rouge(pred, ref), abs=1e-12)


def test_known_value():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each: F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)


def test_list_references_take_the_max():
    refs = ["nothing similar", "the cat sat on the mat", "the cat"]
    pred = "the cat sat on a mat"
    scores = [reference_rouge(pred, r) for r in refs]
    assert rouge_l(pred, refs) == pytest.approx(max(scores))
    assert rouge_l(pred, refs) > rouge_l(pred, refs[0])
    assert rouge_l(pred, tuple(refs)) == rouge_l(pred, refs)
    with pytest.raises(ValueError):
        rouge_l(pred, [])


def test_empty_and_empty_after_tokenisation():
    assert rouge_l("", "the answer") == 0.0 == reference_rouge("", "the answer")
    # rouge-score keeps only ASCII letters and digits: these are empty after tokenisation
    assert rouge_l("!!! ...", "the answer") == 0.0
    assert rouge_l("the answer", "?!") == 0.0
    assert rouge_l("", "") == reference_rouge("", "")
    assert rouge_l("¿¡", "—") == 0.0


def test_stemming_and_case():
    assert rouge_l("running", "run") == 100.0  # Porter stemmer: running -> run
    assert rouge_l("Cats", "cat") == 100.0
    assert rouge_l("ran", "run") == 0.0  # irregular forms are not stemmed together


def test_exact_match():
    assert exact_match("  Paris \n", "Paris") == 100.0
    assert exact_match("paris", "Paris") == 0.0  # case-sensitive
    assert exact_match("b", ["a", "b"]) == 100.0
    assert exact_match("", "a") == 0.0


def test_mean_std_conventions():
    values = [24.24, 25.68, 24.9, 25.1, 24.7]
    mean, sd = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert sd == pytest.approx(statistics.stdev(values))  # sample: n - 1
    assert mean_std(values, std="population")[1] == pytest.approx(statistics.pstdev(values))
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
    with pytest.raises(ValueError):
        mean_std(values, std="unbiased")
