"""Ordinal ranks, reciprocal rank fusion and the fused order: hand-computed cases and an independent implementation."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocl.curriculum import SampleDifficulty, order_by_score, ordinal_ranks, rank_samples, rrf_order, rrf_scores


def test_ordinal_ranks_by_hand():
    ids = ["a", "b", "c", "d"]
    values = [0.5, 0.9, 0.5, 0.1]
    # descending: b (0.9) = 1, then the tie a/c by id, then d
    assert ordinal_ranks(values, ids, descending=True) == [2, 1, 3, 4]
    # ascending: d (0.1) = 1, then a/c by id, then b
    assert ordinal_ranks(values, ids, descending=False) == [2, 4, 3, 1]


def test_ties_are_broken_by_natural_id_order():
    # all equal: "1" < "2" < "10" (natural order, not string order where "10" < "2")
    assert ordinal_ranks([7.0, 7.0, 7.0], ["10", "2", "1"], descending=True) == [3, 2, 1]
    assert ordinal_ranks([7.0, 7.0, 7.0], ["train-10", "train-9", "train-1"], descending=False) == [3, 2, 1]
    assert order_by_score(["10", "2", "1"], [0.5, 0.5, 0.5]) == ["1", "2", "10"]


def test_missing_values_rank_last_in_both_directions():
    ids = ["a", "b", "c"]
    assert ordinal_ranks([None, 1.0, float("nan")], ids, descending=True) == [2, 1, 3]
    assert ordinal_ranks([None, 1.0, float("nan")], ids, descending=False) == [2, 1, 3]


def test_rrf_scores_by_hand():
    scores = rrf_scores([[1, 2, 3], [3, 1, 2]], k=60)
    assert scores == pytest.approx([1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62], abs=0, rel=1e-15)
    assert rrf_scores([[1, 2]], k=0) == [1.0, 0.5]
    with pytest.raises(ValueError):
        rrf_scores([[1, 2], [1]])
    with pytest.raises(ValueError):
        rrf_scores([[0, 1]])


def test_fused_order_by_hand_with_ties():
    ids = ["s10", "s2", "s1", "s3"]
    rouge = [50.0, 50.0, 20.0, 80.0]
    loss = [1.0, 2.0, 1.0, 3.0]
    # ROUGE-L descending: s3=1, tie 50: s2=2, s10=3, s1=4
    # loss ascending: tie 1.0: s1=1, s10=2, then s2=3, s3=4
    r_rouge = ordinal_ranks(rouge, ids, descending=True)
    r_loss = ordinal_ranks(loss, ids, descending=False)
    assert r_rouge == [3, 2, 4, 1]
    assert r_loss == [2, 3, 1, 4]
    # s10 and s2: 1/63 + 1/62 (an exact tie); s1 and s3: 1/64 + 1/61 (an exact tie), which is larger
    scores = rrf_scores([r_rouge, r_loss])
    assert scores[0] == pytest.approx(1 / 63 + 1 / 62) and scores[2] == pytest.approx(1 / 64 + 1 / 61)
    assert 1 / 64 + 1 / 61 > 1 / 63 + 1 / 62
    assert rrf_order(ids, [r_rouge, r_loss]) == ["s1", "s3", "s2", "s10"]
    ranked = rank_samples([SampleDifficulty(i, r, l) for i, r, l in zip(ids, rouge, loss)], "rrf")
    assert [r.id for r in ranked] == ["s1", "s3", "s2", "s10"]
    assert [r.rank for r in ranked] == [1, 2, 3, 4]
    assert [(r.rouge_rank, r.loss_rank) for r in ranked] == [(4, 1), (1, 4), (2, 3), (3, 2)]


def test_exact_ties_that_floats_split_are_broken_by_id():
    # 1/300 + 1/300 == 1/275 + 1/330 == 1/150 exactly, but the float sums differ in the last bit.
    lists = [[240, 215], [240, 270]]
    floats = rrf_scores(lists)
    assert floats[0] != floats[1]
    assert Fraction(1, 300) * 2 == Fraction(1, 275) + Fraction(1, 330)
    assert rrf_order(["b", "a"], lists) == ["a", "b"]
    assert rrf_order(["a", "b"], lists) == ["a", "b"]


def _reference_order(ids, rouge, loss, k):
    """Independent implementation with plain sorted() on tuples and exact fractions."""
    import re

    def nat(s):
        return [(0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s) if p]

    by_rouge = sorted(range(len(ids)), key=lambda i: (-rouge[i], nat(ids[i])))
    by_loss = sorted(range(len(ids)), key=lambda i: (loss[i], nat(ids[i])))
    rr = {i: pos + 1 for pos, i in enumerate(by_rouge)}
    rl = {i: pos + 1 for pos, i in enumerate(by_loss)}
    score = {i: Fraction(1, k + rr[i]) + Fraction(1, k + rl[i]) for i in range(len(ids))}
    return [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-score[i], nat(ids[i])))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=40),
       st.integers(0, 100), st.randoms(use_true_random=False))
def test_fused_order_matches_an_independent_implementation(values, k, rnd):
    ids = [f"id{n}" for n in rnd.sample(range(1000), len(values))]
    rouge = [float(v[0]) * 10 for v in values]
    loss = [float(v[1]) / 3 for v in values]
    ranked = rank_samples([SampleDifficulty(i, r, l) for i, r, l in zip(ids, rouge, loss)], "rrf", k=k)
    assert [r.id for r in ranked] == _reference_order(ids, rouge, loss, k)
    # the order does not depend on the input order
    perm = list(range(len(ids)))
    rnd.shuffle(perm)
    again = rank_samples([SampleDifficulty(ids[i], rouge[i], loss[i]) for i in perm], "rrf", k=k)
    assert [r.id for r in again] == [r.id for r in ranked]
    # reverse is exactly the rrf order backwards
    rev = rank_samples([SampleDifficulty(i, r, l) for i, r, l in zip(ids, rouge, loss)], "reverse", k=k)
    assert [r.id for r in rev] == [r.id for r in ranked][::-1]


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        ordinal_ranks([1.0, 2.0], ["a", "a"], descending=True)
