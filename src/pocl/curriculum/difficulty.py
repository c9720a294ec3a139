"""The difficulty measurers: how the signals of the *initial* student turn into an easy-to-hard order
of the training samples.

The signals themselves (per-sample loss and ROUGE-L, POCL spec, section 2) are measured by
:func:`measure_difficulty` in :mod:`pocl.curriculum.measurement`, re-exported here with
:class:`SampleDifficulty`, :class:`BatchJournal` and :func:`gather_difficulties`.
:func:`rank_samples` turns the signals into an order with one of the registered measurers
(:data:`MEASURERS`). The paper's measurers use the student alone; ``teacher_kl``,
``teacher_entropy`` and ``rrf_teacher`` (an extension) also use the two teacher signals of
:mod:`pocl.curriculum.teacher_signals`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from pocl.data import id_sort_key
from pocl.errors import ConfigError, DataError
from pocl.generation import DecodingConfig
from pocl.registry import Registry

from .measurement import BatchJournal, SampleDifficulty, gather_difficulties, measure_difficulty
from .rrf import ordinal_ranks, rrf_order, rrf_scores

#: The signals of the student alone (the paper's) and those that also need the teacher.
STUDENT_SIGNALS = ("rouge_l", "loss")
TEACHER_SIGNALS = ("teacher_kl", "teacher_entropy")
SIGNALS = STUDENT_SIGNALS + TEACHER_SIGNALS

#: The measurement pass that produces each signal (also the journal's name of the pass): the two
#: teacher signals come from one joint pass.
SIGNAL_PASS = {"rouge_l": "rouge_l", "loss": "loss", "teacher_kl": "teacher", "teacher_entropy": "teacher"}

#: Sort direction of each signal's rank (True: the largest value is rank 1, the easiest).
_DESCENDING = {"rouge_l": True, "loss": False, "teacher_kl": False, "teacher_entropy": False}

__all__ = ["SampleDifficulty", "RankedSample", "Measurer", "MEASURERS", "SIGNALS", "SIGNAL_PASS", "STUDENT_SIGNALS",
           "TEACHER_SIGNALS", "BatchJournal", "measure_difficulty", "measurer_needs", "measurer_needs_teacher",
           "rank_samples", "ranking_decoding", "gather_difficulties"]


@dataclasses.dataclass
class RankedSample:
    """One sample of a ranking. ``rank`` 1 = easiest; ``score``: higher = easier (None for ``random``);
    ``rouge_rank`` / ``loss_rank`` / ``teacher_kl_rank`` / ``teacher_entropy_rank``: the sample's rank
    by that signal alone (None when not measured)."""

    id: str
    rank: int
    score: float | None
    rouge_l: float | None
    loss: float | None
    rouge_rank: int | None
    loss_rank: int | None
    generation: str | None = None
    teacher_kl: float | None = None
    teacher_entropy: float | None = None
    teacher_kl_rank: int | None = None
    teacher_entropy_rank: int | None = None


def ranking_decoding(curriculum) -> DecodingConfig:
    """The measurer's decoding settings from a :class:`pocl.config.CurriculumConfig`."""
    return DecodingConfig(do_sample=True, temperature=curriculum.rank_temperature, top_p=1.0, top_k=0,
                          no_repeat_ngram_size=curriculum.rank_no_repeat_ngram_size,
                          max_new_tokens=curriculum.rank_max_new_tokens)

# ------------------------------------------------------------------------------------------- measurers
@dataclasses.dataclass(frozen=True)
class Measurer:
    """A difficulty order: the signals it needs and ``order(difficulties, k, seed) -> (ids, scores)``."""

    name: str
    needs: frozenset[str]
    order: Callable[[list[SampleDifficulty], int, int], tuple[list[str], list[float | None]]]
    description: str = ""


def _signal_ranks(difficulties: list[SampleDifficulty]) -> dict[str, list[int] | None]:
    ids = [d.id for d in difficulties]
    out: dict[str, list[int] | None] = {}
    for name, descending in _DESCENDING.items():
        values = [getattr(d, name) for d in difficulties]
        out[name] = None if all(v is None for v in values) else ordinal_ranks(values, ids, descending=descending)
    return out


def _fused(signals: Sequence[str]):
    def order(difficulties: list[SampleDifficulty], k: int, seed: int):
        ids = [d.id for d in difficulties]
        ranks = _signal_ranks(difficulties)
        lists = [ranks[s] for s in signals]
        scores = rrf_scores(lists, k)
        by_id = dict(zip(ids, scores))
        ordered = rrf_order(ids, lists, k)
        return ordered, [by_id[i] for i in ordered]

    return order


def _random_order(difficulties: list[SampleDifficulty], k: int, seed: int):
    ids = sorted((d.id for d in difficulties), key=id_sort_key)  # independent of the input order
    random.Random(f"pocl-random-measurer/{seed}").shuffle(ids)
    return ids, [None] * len(ids)


def _reverse_order(difficulties: list[SampleDifficulty], k: int, seed: int):
    ids, scores = _fused(("rouge_l", "loss"))(difficulties, k, seed)
    return ids[::-1], scores[::-1]


MEASURERS: Registry[Measurer] = Registry("difficulty measurer")
for _m in (
    Measurer("rrf", frozenset(STUDENT_SIGNALS), _fused(("rouge_l", "loss")),
             "reciprocal rank fusion of the ROUGE-L and loss ranks (POCL)"),
    Measurer("rouge", frozenset({"rouge_l"}), _fused(("rouge_l",)), "ROUGE-L rank alone"),
    Measurer("loss", frozenset({"loss"}), _fused(("loss",)), "loss rank alone (no generation)"),
    Measurer("random", frozenset(), _random_order,
             "a seeded shuffle (ablation control: same stages, no difficulty order; measures nothing)"),
    Measurer("reverse", frozenset(STUDENT_SIGNALS), _reverse_order,
             "the rrf order reversed, hardest first (anti-curriculum ablation)"),
    Measurer("teacher_kl", frozenset({"teacher_kl"}), _fused(("teacher_kl",)),
             "rank of the teacher-student divergence KL(p_teacher || q_student) alone (needs the teacher)"),
    Measurer("teacher_entropy", frozenset({"teacher_entropy"}), _fused(("teacher_entropy",)),
             "rank of the teacher's entropy alone (needs the teacher)"),
    Measurer("rrf_teacher", frozenset(SIGNALS), _fused(SIGNALS),
             "RRF of the ROUGE-L, loss, teacher_kl and teacher_entropy ranks (needs the teacher)"),
):
    MEASURERS.register(_m.name, _m)


def measurer_needs(name: str) -> frozenset[str]:
    """The signals (``"rouge_l"``, ``"loss"``, ``"teacher_kl"``, ``"teacher_entropy"``) measurer ``name`` needs."""
    return MEASURERS.get(name).needs


def measurer_needs_teacher(name: str) -> bool:
    """Whether measurer ``name`` ranks with a teacher signal (and so needs the teacher model)."""
    return bool(measurer_needs(name) & set(TEACHER_SIGNALS))


def rank_samples(difficulties: Sequence[SampleDifficulty], measurer: str = "rrf", *, k: int = 60,
                 seed: int = 0) -> list[RankedSample]:
    """Order the samples with ``measurer``; easiest first, ``rank`` 1..N.

    ``score`` is the RRF score of the signals the measurer uses (one signal: ``1/(k + rank)``;
    ``reverse`` keeps the rrf scores, so they increase down its list; ``random`` has none).
    ``rouge_rank``/``loss_rank``/``teacher_kl_rank``/``teacher_entropy_rank`` are filled for every
    signal present, used or not. ``seed`` only matters to ``random``.
    """
    spec = MEASURERS.get(measurer)
    difficulties = list(difficulties)
    if not difficulties:
        raise DataError("nothing to rank: no samples")
    for signal in (s for s in SIGNALS if s in spec.needs):  # a fixed order: the same message every run
        absent = [d.id for d in difficulties if getattr(d, signal) is None]
        if absent:
            raise ConfigError(f"measurer '{spec.name}' needs the {signal} signal, which is missing for "
                              f"{len(absent)} samples (e.g. '{absent[0]}')")
    ids, scores = spec.order(difficulties, k, seed)
    ranks = _signal_ranks(difficulties)
    pos = {d.id: i for i, d in enumerate(difficulties)}
    out = []
    for rank, (sid, score) in enumerate(zip(ids, scores), start=1):
        i = pos[sid]
        d = difficulties[i]
        at = {name: None if r is None else r[i] for name, r in ranks.items()}
        out.append(RankedSample(
            id=sid, rank=rank, score=score, rouge_l=d.rouge_l, loss=d.loss, rouge_rank=at["rouge_l"],
            loss_rank=at["loss"], generation=d.generation, teacher_kl=d.teacher_kl,
            teacher_entropy=d.teacher_entropy, teacher_kl_rank=at["teacher_kl"],
            teacher_entropy_rank=at["teacher_entropy"]))
    return out


def difficulties_from_ranking(ranking: Sequence[RankedSample]) -> list[SampleDifficulty]:
    """The stored signals of a ranking, back as :class:`SampleDifficulty` (in ranking order)."""
    return [SampleDifficulty(r.id, r.rouge_l, r.loss, r.generation, r.teacher_kl, r.teacher_entropy) for r in ranking]


def summarize_quartiles(ranking: Sequence[RankedSample], parts: int = 4) -> list[dict[str, Any]]:
    """Mean ROUGE-L, loss, teacher_kl and teacher_entropy per quarter of the order (easiest quarter
    first; None for a signal the ranking does not hold)."""
    n = len(ranking)
    rows = []
    for q in range(parts):
        chunk = ranking[q * n // parts:(q + 1) * n // parts]

        def mean(name: str) -> float | None:
            vals = [getattr(r, name) for r in chunk]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            return sum(vals) / len(vals) if vals else None

        rows.append({"part": q + 1, "ranks": (chunk[0].rank, chunk[-1].rank) if chunk else None,
                     "samples": len(chunk), "rouge_l": mean("rouge_l"), "loss": mean("loss"),
                     "teacher_kl": mean("teacher_kl"), "teacher_entropy": mean("teacher_entropy")})
    return rows
