"""Ordinal ranks and reciprocal rank fusion (RRF), as pure functions (no torch).

Rank 1 is the easiest sample. Each signal is ranked on its own (ROUGE-L descending: a high ROUGE-L
means the initial student already answers well; loss ascending), and the ranks are fused::

    s_i = sum over signals of 1 / (k + r_i)        (k = 60)

Samples are ordered by ``s`` descending, easiest first. Every tie -- equal signal values, equal
fused scores -- is broken by the sample id in natural order (:func:`pocl.data.id_sort_key`:
``"2" < "10"``), so the order is a pure function of the signal values and the ids. The authors'
code broke ties by file order under multiprocessing, which was not reproducible.

A missing value (``None`` or NaN, e.g. a sample whose response was cut to nothing) ranks after all
present values, whatever the direction: it is treated as the hardest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from pocl.data.records import id_sort_key

__all__ = ["ordinal_ranks", "rrf_scores", "order_by_score", "rrf_order"]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_ids(ids: Sequence[str], n: int, what: str) -> None:
    if len(ids) != n:
        raise ValueError(f"{what}: {n} values but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupe = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"{what}: duplicate id {dupe!r}; ids must be unique")


def ordinal_ranks(values: Sequence[float | None], ids: Sequence[str], *, descending: bool) -> list[int]:
    """Ordinal ranks 1..N of ``values`` (aligned with ``ids``); 1 = first in the sort.

    ``descending=True`` gives rank 1 to the largest value (ROUGE-L), ``False`` to the smallest
    (loss). Equal values get consecutive ranks in natural id order; missing values (None, NaN)
    come last. Returns the rank of each input position.
    """
    _check_ids(ids, len(values), "ordinal_ranks")

    def key(i: int):
        v = values[i]
        if _missing(v):
            return (1, 0.0, id_sort_key(ids[i]))
        v = float(v)  # type: ignore[arg-type]
        return (0, -v if descending else v, id_sort_key(ids[i]))

    ranks = [0] * len(values)
    for rank, i in enumerate(sorted(range(len(values)), key=key), start=1):
        ranks[i] = rank
    return ranks


def _check_rank_lists(rank_lists: Sequence[Sequence[int]], k: float) -> int:
    if not rank_lists:
        raise ValueError("rrf needs at least one rank list")
    n = len(rank_lists[0])
    if any(len(r) != n for r in rank_lists):
        raise ValueError(f"rank lists differ in length: {[len(r) for r in rank_lists]}")
    if k < 0:
        raise ValueError(f"rrf k must be >= 0 (got {k})")
    for r in rank_lists:
        if any(x < 1 for x in r):
            raise ValueError("ranks start at 1")
    return n


def rrf_scores(rank_lists: Sequence[Sequence[int]], k: int = 60) -> list[float]:
    """Reciprocal rank fusion: ``s_i = sum_lists 1 / (k + r_i)`` (ranks start at 1)."""
    n = _check_rank_lists(rank_lists, k)
    return [sum(1.0 / (k + ranks[i]) for ranks in rank_lists) for i in range(n)]


def order_by_score(ids: Sequence[str], scores: Sequence) -> list[str]:
    """``ids`` sorted by score descending (easiest first); equal scores in natural id order.

    ``scores`` may be floats or exact numbers (:class:`fractions.Fraction`).
    """
    _check_ids(ids, len(scores), "order_by_score")
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], id_sort_key(ids[i])))
    return [ids[i] for i in order]


def rrf_order(ids: Sequence[str], rank_lists: Sequence[Sequence[int]], k: int = 60) -> list[str]:
    """The fused order, easiest first, computed with exact fractions.

    Two different rank pairs can have mathematically equal RRF scores whose floating-point sums
    differ in the last bit; exact arithmetic makes such a tie a tie, broken by id like any other.
    """
    n = _check_rank_lists(rank_lists, k)
    fk = Fraction(k)
    exact = [sum(1 / (fk + ranks[i]) for ranks in rank_lists) for i in range(n)]
    return order_by_score(ids, exact)
