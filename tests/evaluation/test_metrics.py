"""ROUGE-L and exact match against rouge-score itself; mean and std over seeds."""

from __future__ import annotations

import functools
import statistics

import pytest
from rouge_score import rouge_scorer

from pocl.evaluation import EM_NORMALIZATIONS, exact_match, mean_std, normalize_answer, rouge_l

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


def test_exact_match_whitespace_normalization():
    em = functools.partial(exact_match, normalization="whitespace")
    assert em("  Paris \n", "Paris") == 100.0
    assert em("paris", "Paris") == 0.0  # case-sensitive
    assert em("Paris.", "Paris") == 0.0 and em("the Paris", "Paris") == 0.0
    assert em("b", ["a", "b"]) == 100.0
    assert em("", "a") == 0.0


# (text, SQuAD v1.1 normalize_answer(text)), worked by hand: lowercase, drop ASCII punctuation,
# articles -> space, collapse whitespace
SQUAD_CASES = [
    ("The Cat sat on a mat.", "cat sat on mat"),
    ("An apple, an orange & THE pear!", "apple orange pear"),
    ("  Hello\tWorld \n", "hello world"),
    ("theory another anthem", "theory another anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("it's a-ok", "its aok"),  # punctuation goes first: "a-ok" -> "aok" is no article
    ("the", ""),
    # typographic quotes and dashes are not ASCII punctuation
    ("\u201cParis\u201d \u2014 yes", "\u201cparis\u201d \u2014 yes"),
]


@pytest.mark.parametrize("text,expected", SQUAD_CASES)
def test_normalize_answer_by_hand(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_squad_normalization_is_the_default():
    assert exact_match("paris", "Paris") == 100.0  # default: squad
    assert exact_match("Paris.", "paris") == 100.0
    assert exact_match("The Eiffel tower", "eiffel Tower!") == 100.0
    assert exact_match("The answer is Paris", "Paris") == 0.0
    assert exact_match("cat sat", ["a dog", "The cat, sat."]) == 100.0
    assert exact_match("", "An.") == 100.0  # both normalise to "" (as in the SQuAD script)
    assert exact_match("", "a b") == 0.0
    assert exact_match("x", "X", normalization="squad") == 100.0
    assert set(EM_NORMALIZATIONS) == {"squad", "whitespace"}
    with pytest.raises(ValueError, match="unknown exact-match normalization"):
        exact_match("a", "a", normalization="lower")


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
