"""The difficulty measurer: the loss signal against a naive per-sample computation, the generations and
their ROUGE-L, and the measurers built on the signals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pocl.curriculum.difficulty as difficulty
import pocl.curriculum.measurement as measurement
from pocl.curriculum import MEASURERS, SampleDifficulty, measure_difficulty, measurer_needs, rank_samples
from pocl.data import Record, generate_suite, tokenize_records
from pocl.errors import ConfigError, DataError, UnknownNameError
from pocl.generation import DecodingConfig, Generation
from tests.conftest import make_llama

DECODING = DecodingConfig(temperature=0.01, max_new_tokens=5)
LIMITS = dict(max_length=40, max_prompt_length=24)


@pytest.fixture(scope="module")
def student(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=16, layers=1, seed=2, tie=False)


@pytest.fixture(scope="module")
def records():
    rows = generate_suite(n_train=14, n_dev=0, n_test=0, seed=1)["train"]
    recs = [Record(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"]) for r in rows]
    # a long input (prompt truncated on the left) and a multi-reference sample
    recs.append(Record(id="long-1", instruction="Repeat the text twice.", input=" ".join(["red dog"] * 20),
                       output="red dog " * 10))
    recs.append(Record(id="multi-2", instruction="Add the two numbers.", input="2 + 3", output=("5", "five")))
    return recs


def naive_losses(model, tokenizer, records):
    data = tokenize_records(records, tokenizer, "alpaca", **LIMITS)
    out = []
    with torch.no_grad():
        for s in data:
            ids = torch.tensor([s.input_ids])
            logits = model(input_ids=ids).logits[0]
            labels = torch.tensor(s.labels)
            targets = labels[1:]
            mask = targets != -100
            out.append(F.cross_entropy(logits[:-1][mask].double(), targets[mask]).item())
    return out


@pytest.mark.parametrize("fused", [None, False])
def test_loss_matches_naive_per_sample_computation(student, suite_tokenizer, records, monkeypatch, fused):
    monkeypatch.setattr(measurement, "generate", lambda *a, **k: pytest.fail("generate called"))
    student.train()
    got = measure_difficulty(student, suite_tokenizer, records, template="alpaca", decoding=DECODING, batch_size=5,
                             need_rouge=False, progress=False, chunk_size=7, fused=fused, **LIMITS)
    assert student.training  # mode restored
    assert [d.id for d in got] == [r.id for r in records]
    student.eval()
    expected = naive_losses(student, suite_tokenizer, records)
    assert [d.loss for d in got] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert all(d.rouge_l is None and d.generation is None for d in got)
    assert len(set(round(x, 6) for x in expected)) > len(records) // 2  # the check is not vacuous


def test_generation_respects_max_new_tokens_and_rouge_is_rouge_score(student, suite_tokenizer, records, monkeypatch):
    from rouge_score import rouge_scorer

    seen: list[Generation] = []
    real = measurement.generate

    def spy(*args, **kwargs):
        gens = real(*args, **kwargs)
        seen.extend(gens)
        return gens

    monkeypatch.setattr(measurement, "generate", spy)
    got = measure_difficulty(student, suite_tokenizer, records, decoding=DecodingConfig(temperature=0.01,
                             max_new_tokens=3, no_repeat_ngram_size=6), batch_size=4, need_loss=False,
                             progress=False, **LIMITS)
    assert len(seen) == len(records)
    assert all(len(g.token_ids) <= 3 for g in seen)
    assert [d.generation for d in got] == [g.text for g in seen]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for d, r in zip(got, records):
        assert d.loss is None
        assert d.rouge_l == pytest.approx(max(100 * scorer.score(ref, d.generation)["rougeL"].fmeasure
                                              for ref in r.references))


def test_rouge_signal_scores_the_returned_generations(suite_tokenizer, student, records, monkeypatch):
    """With known answers: exact answers score 100, partial ones in between, max over references."""
    from rouge_score import rouge_scorer

    answers = {r.id: ("five" if r.id == "multi-2" else r.references[0] if i % 3 == 0 else
                      (r.references[0].split() or ["x"])[0] + " zzz" if i % 3 == 1 else "nothing")
               for i, r in enumerate(records)}

    def fake_generate(model, tokenizer, prompts, decoding, *, batch_size, seed, progress, batch_plan):
        assert len(prompts) == len(records) and decoding.max_new_tokens == 5 and batch_size == 4
        assert sorted(i for _, batch in batch_plan for i in batch) == list(range(len(records)))
        progress(len(prompts))
        return [Generation([], answers[r.id], True) for r in records]

    monkeypatch.setattr(measurement, "generate", fake_generate)
    got = measure_difficulty(student, suite_tokenizer, records, decoding=DECODING, batch_size=4, need_loss=False,
                             progress=False, **LIMITS)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for d, r in zip(got, records):
        expected = max(100 * scorer.score(ref, answers[r.id])["rougeL"].fmeasure for ref in r.references)
        assert d.rouge_l == pytest.approx(expected)
    by_id = {d.id: d.rouge_l for d in got}
    assert by_id["multi-2"] == 100.0  # the second reference matches
    assert by_id[records[0].id] == 100.0
    assert 0 < by_id[records[1].id] < 100


def test_need_rouge_false_never_generates_and_timings_are_reported(student, suite_tokenizer, records, monkeypatch):
    monkeypatch.setattr(measurement, "generate", lambda *a, **k: pytest.fail("generate called"))
    timings: dict = {}
    measure_difficulty(student, suite_tokenizer, records[:3], decoding=DECODING, batch_size=2, need_rouge=False,
                       progress=False, timings=timings, **LIMITS)
    assert set(timings) == {"loss_seconds"}


def test_rows_without_reference_are_refused(student, suite_tokenizer):
    with pytest.raises(DataError, match="no reference"):
        measure_difficulty(student, suite_tokenizer, [Record(id="x", instruction="Say hi.")], decoding=DECODING,
                           batch_size=2, progress=False, **LIMITS)


# --------------------------------------------------------------------------------------- measurers
def _diffs():
    return [SampleDifficulty("a", 10.0, 3.0), SampleDifficulty("b", 90.0, 2.0), SampleDifficulty("c", 50.0, 1.0),
            SampleDifficulty("d", 50.0, 4.0)]


def test_single_signal_measurers():
    assert [r.id for r in rank_samples(_diffs(), "loss")] == ["c", "b", "a", "d"]
    assert [r.id for r in rank_samples(_diffs(), "rouge")] == ["b", "c", "d", "a"]
    loss_only = [SampleDifficulty(d.id, None, d.loss) for d in _diffs()]
    ranked = rank_samples(loss_only, "loss", k=60)
    assert ranked[0].score == pytest.approx(1 / 61) and ranked[0].rouge_rank is None and ranked[0].loss_rank == 1


def test_random_measurer_is_seeded_and_needs_nothing():
    bare = [SampleDifficulty(f"s{i}") for i in range(30)]
    one = [r.id for r in rank_samples(bare, "random", seed=1)]
    assert one == [r.id for r in rank_samples(list(reversed(bare)), "random", seed=1)]
    assert one != [r.id for r in rank_samples(bare, "random", seed=2)]
    assert sorted(one) == sorted(d.id for d in bare)
    assert measurer_needs("random") == frozenset()
    assert measurer_needs("rrf") == measurer_needs("reverse") == {"rouge_l", "loss"}
    assert measurer_needs("loss") == {"loss"} and measurer_needs("rouge") == {"rouge_l"}


def test_measurer_names_are_exact_and_signals_are_checked():
    assert sorted(MEASURERS.names()) == ["loss", "random", "reverse", "rouge", "rrf", "rrf_teacher", "teacher_entropy",
                                         "teacher_kl"]
    with pytest.raises(UnknownNameError, match="did you mean"):
        rank_samples(_diffs(), "rf")
    with pytest.raises(ConfigError, match="needs the rouge_l signal"):
        rank_samples([SampleDifficulty("a", None, 1.0)], "rrf")


def test_sharded_measurement_gathers_to_the_single_process_result(student, suite_tokenizer, records):
    """Each of 3 'processes' measures its share of the batches; merged, that is the one-process pass
    exactly (same batch composition and seeds), which the distributed ranking pass relies on."""
    decoding = DecodingConfig(temperature=1.0, max_new_tokens=4)  # real sampling: seeds must line up
    kw = dict(template="alpaca", decoding=decoding, batch_size=3, progress=False, **LIMITS)
    whole = measure_difficulty(student, suite_tokenizer, records, **kw)
    parts = [measure_difficulty(student, suite_tokenizer, records, shard=(r, 3), **kw) for r in range(3)]
    for part in parts:  # each part measured a strict subset
        assert 0 < sum(d.loss is not None for d in part) < len(records)
    merged = difficulty.gather_difficulties(parts)
    assert [(d.id, d.loss, d.rouge_l, d.generation) for d in merged] == \
        [(d.id, d.loss, d.rouge_l, d.generation) for d in whole]
