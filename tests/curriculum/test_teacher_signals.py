"""The teacher signals of the measurer (teacher_kl, teacher_entropy): against a naive per-sample
computation, invariant to batching and sharding, NaN without response token; and the measurers
teacher_kl, teacher_entropy and rrf_teacher against a naive RRF."""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction

import pytest
import torch

from pocl.curriculum import (
    MEASURERS,
    SampleDifficulty,
    difficulty,
    measure_difficulty,
    measurement,
    measurer_needs,
    rank_samples,
)
from pocl.curriculum.difficulty import measurer_needs_teacher
from pocl.curriculum.teacher_signals import joint_batch_signals
from pocl.data import Record, generate_suite, tokenize_records
from pocl.errors import ConfigError, UnknownNameError
from pocl.generation import DecodingConfig
from tests.conftest import make_llama

DECODING = DecodingConfig(temperature=0.01, max_new_tokens=4)
LIMITS = {"max_length": 40, "max_prompt_length": 24}


@pytest.fixture(scope="module")
def student(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=16, layers=1, seed=2, tie=False)


@pytest.fixture(scope="module")
def teacher(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=32, layers=2, seed=1)


@pytest.fixture(scope="module")
def records():
    rows = generate_suite(n_train=14, n_dev=0, n_test=0, seed=1)["train"]
    recs = [Record(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"]) for r in rows]
    # a long input (prompt truncated on the left), a long response (cut at max_length) and two references
    recs.append(Record(id="long-1", instruction="Repeat the text twice.", input=" ".join(["red dog"] * 20),
                       output="red dog " * 10))
    recs.append(Record(id="multi-2", instruction="Add the two numbers.", input="2 + 3", output=("5", "five")))
    return recs


def naive_signals(student, teacher, tokenizer, records):
    """Per sample, no batching, full logits, float64: mean KL(p_t || q_s) and mean H(p_t) over the
    positions whose next label is a response token."""
    data = tokenize_records(records, tokenizer, "alpaca", **LIMITS)
    kls, entropies = [], []
    with torch.no_grad():
        for s in data:
            ids = torch.tensor([s.input_ids])
            targets = torch.tensor(s.labels)[1:]
            keep = targets != -100
            log_q = torch.log_softmax(student(input_ids=ids).logits[0, :-1][keep].double(), -1)
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1][keep].double(), -1)
            p = log_p.exp()
            kls.append(float((p * (log_p - log_q)).sum(-1).mean()))
            entropies.append(float(-(p * log_p).sum(-1).mean()))
    return kls, entropies


@pytest.mark.parametrize("fused", [None, False])
def test_teacher_signals_match_a_naive_per_sample_computation(student, teacher, suite_tokenizer, records,
                                                              monkeypatch, fused):
    monkeypatch.setattr(measurement, "generate", lambda *a, **k: pytest.fail("generate called"))
    student.train()
    teacher.train()
    timings: dict = {}
    got = measure_difficulty(student, suite_tokenizer, records, template="alpaca", decoding=DECODING, batch_size=5,
                             need_rouge=False, need_loss=False, teacher=teacher, progress=False, chunk_size=7,
                             fused=fused, timings=timings, **LIMITS)
    assert student.training and teacher.training  # modes restored
    assert set(timings) == {"teacher_seconds"}
    assert [d.id for d in got] == [r.id for r in records]
    assert all(d.loss is None and d.rouge_l is None for d in got)
    student.eval()
    teacher.eval()
    kls, entropies = naive_signals(student, teacher, suite_tokenizer, records)
    assert [d.teacher_kl for d in got] == pytest.approx(kls, rel=1e-5, abs=1e-5)
    assert [d.teacher_entropy for d in got] == pytest.approx(entropies, rel=1e-5, abs=1e-5)
    assert len({round(x, 6) for x in kls}) > len(records) // 2 and min(kls) > 0  # not vacuous
    assert len({round(x, 6) for x in entropies}) > len(records) // 2


def test_teacher_signals_do_not_depend_on_batching_padding_or_sharding(student, teacher, suite_tokenizer, records):
    kw = dict(template="alpaca", decoding=DECODING, need_rouge=False, need_loss=False, teacher=teacher,
              progress=False, **LIMITS)
    one = measure_difficulty(student, suite_tokenizer, records, batch_size=1, **kw)
    many = measure_difficulty(student, suite_tokenizer, list(reversed(records)), batch_size=16, chunk_size=5, **kw)
    by_id = {d.id: d for d in many}
    assert [d.teacher_kl for d in one] == pytest.approx([by_id[d.id].teacher_kl for d in one], rel=1e-5, abs=1e-6)
    assert [d.teacher_entropy for d in one] == pytest.approx([by_id[d.id].teacher_entropy for d in one], rel=1e-5)
    whole = measure_difficulty(student, suite_tokenizer, records, batch_size=3, **kw)
    parts = [measure_difficulty(student, suite_tokenizer, records, batch_size=3, shard=(r, 3), **kw) for r in range(3)]
    assert all(0 < sum(d.teacher_kl is not None for d in part) < len(records) for part in parts)
    merged = difficulty.gather_difficulties(parts)
    assert [(d.teacher_kl, d.teacher_entropy) for d in merged] == [(d.teacher_kl, d.teacher_entropy) for d in whole]


def test_a_row_without_response_token_is_nan(student, teacher):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": labels}
    out = joint_batch_signals(student, teacher, batch, student_head=None, teacher_head=None,
                              vocab=student.config.vocab_size, chunk_size=4)
    assert out["teacher_kl"][0] > 0 and out["teacher_entropy"][0] > 0
    assert math.isnan(out["teacher_kl"][1]) and math.isnan(out["teacher_entropy"][1])
    ranked = rank_samples([SampleDifficulty("a", teacher_kl=math.nan, teacher_entropy=math.nan),
                           SampleDifficulty("b", teacher_kl=0.5, teacher_entropy=2.0)], "teacher_kl")
    assert [r.id for r in ranked] == ["b", "a"]  # NaN ranks as hardest


def test_a_teacher_pass_without_teacher_is_refused(student, suite_tokenizer, records):
    with pytest.raises(ConfigError, match="need the teacher model"):
        measure_difficulty(student, suite_tokenizer, records[:2], decoding=DECODING, batch_size=2, need_teacher=True,
                           progress=False, **LIMITS)


# --------------------------------------------------------------------------------------- measurers
def _natural(sid: str):
    return [(0, int(x), x) if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", sid) if x]


def naive_order(diffs, signals, k=60):
    """Ordinal ranks per signal (value ascending, higher = harder; NaN last; ties by natural id), RRF with
    exact fractions, then score descending with ties by natural id."""
    scores = {d.id: Fraction(0) for d in diffs}
    for s in signals:
        def key(d, s=s):
            v = getattr(d, s)
            return (1, 0.0, _natural(d.id)) if v is None or math.isnan(v) else (0, v, _natural(d.id))
        for rank, d in enumerate(sorted(diffs, key=key), start=1):
            scores[d.id] += Fraction(1, k + rank)
    return sorted(scores, key=lambda i: (-scores[i], _natural(i)))


def _synthetic(n=40, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = SampleDifficulty(f"s{i}", rouge_l=rng.choice([0.0, 25.0, 50.0, 100.0]), loss=rng.choice([1.0, 2.0, 3.5]),
                             teacher_kl=rng.choice([0.1, 0.2, 0.3, math.nan]),
                             teacher_entropy=rng.choice([1.0, 1.5, 2.5]))
        out.append(d)
    return out


@pytest.mark.parametrize("measurer, signals", [("teacher_kl", ["teacher_kl"]),
                                               ("teacher_entropy", ["teacher_entropy"]),
                                               ("rrf_teacher", ["rouge_l", "loss", "teacher_kl", "teacher_entropy"])])
def test_teacher_measurers_match_a_naive_rrf(measurer, signals):
    diffs = _synthetic()
    flipped = [SampleDifficulty(d.id, -d.rouge_l, d.loss, None, d.teacher_kl, d.teacher_entropy) for d in diffs]
    for k in (60, 3):
        ranked = rank_samples(diffs, measurer, k=k)
        # rouge_l is easier when higher: negate it so that the naive ranking sorts every signal ascending
        assert [r.id for r in ranked] == naive_order(flipped, signals, k)
        assert [r.id for r in rank_samples(list(reversed(diffs)), measurer, k=k)] == [r.id for r in ranked]
    ranked = {r.id: r for r in rank_samples(diffs, measurer)}
    d = diffs[0]
    assert ranked[d.id].teacher_kl is d.teacher_kl and ranked[d.id].teacher_entropy == d.teacher_entropy
    assert all(r.teacher_kl_rank is not None and r.teacher_entropy_rank is not None and r.rouge_rank is not None
               for r in ranked.values())


def test_the_student_measurers_ignore_the_teacher_signals():
    diffs = _synthetic(seed=1)
    bare = [SampleDifficulty(d.id, d.rouge_l, d.loss) for d in diffs]
    for name in ("rrf", "rouge", "loss", "reverse", "random"):
        with_teacher, without = rank_samples(diffs, name), rank_samples(bare, name)
        assert [(r.id, r.score) for r in with_teacher] == [(r.id, r.score) for r in without]
        assert all(r.teacher_kl_rank is None for r in without)


def test_teacher_measurer_names_needs_and_typos():
    assert {"teacher_kl", "teacher_entropy", "rrf_teacher"} <= set(MEASURERS.names())
    assert measurer_needs("teacher_kl") == {"teacher_kl"} and measurer_needs("teacher_entropy") == {"teacher_entropy"}
    assert measurer_needs("rrf_teacher") == {"rouge_l", "loss", "teacher_kl", "teacher_entropy"}
    assert [n for n in MEASURERS.names() if measurer_needs_teacher(n)] == ["teacher_kl", "teacher_entropy",
                                                                          "rrf_teacher"]
    with pytest.raises(UnknownNameError, match="did you mean.*teacher_kl"):
        rank_samples(_synthetic(4), "teacher_kll")
    with pytest.raises(UnknownNameError, match="did you mean.*rrf_teacher"):
        rank_samples(_synthetic(4), "rrf_teachr")
    with pytest.raises(ConfigError, match="needs the teacher_kl signal"):
        rank_samples([SampleDifficulty("a", 1.0, 1.0)], "rrf_teacher")
