"""The ranking file: round trip, corruption detection, and the reuse rules of load_or_compute_ranking."""

from __future__ import annotations

import dataclasses
import json

import pytest

import pocl.curriculum.measurement as measurement
from pocl.config import CurriculumConfig
from pocl.curriculum import load_or_compute_ranking, meta_path, rank_samples, read_ranking, difficulties_from_ranking
from pocl.data import Record, generate_suite
from pocl.errors import CheckpointError
from tests.conftest import make_llama

SETTINGS = {"template": "alpaca", "use_prompt_field": None, "max_length": 40, "max_prompt_length": 24,
            "truncation_side": "left"}


@pytest.fixture(scope="module")
def student(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=16, layers=1, seed=2)


@pytest.fixture(scope="module")
def records():
    rows = generate_suite(n_train=12, n_dev=0, n_test=0, seed=2)["train"]
    return [Record(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"]) for r in rows]


def curriculum(**kw):
    return CurriculumConfig(**{"rank_max_new_tokens": 4, "rank_batch_size": 8, **kw})


def no_model():
    raise AssertionError("the model was loaded although nothing had to be measured")


class Calls:
    """Counts the measurer's generated batches and loss passes (and can forbid them). The ranking pass
    generates one batch per call (each batch is kept in the partial file as it ends): 12 samples in
    batches of 8 are 2 generate calls."""

    def __init__(self, monkeypatch, forbid=False):
        self.generate = self.loss = 0
        real_gen, real_loss = measurement.generate, measurement._response_losses

        def gen(*a, **k):
            assert not forbid, "generate called"
            self.generate += 1
            return real_gen(*a, **k)

        def loss(*a, **k):
            assert not forbid, "loss pass run"
            self.loss += 1
            return real_loss(*a, **k)

        monkeypatch.setattr(measurement, "generate", gen)
        monkeypatch.setattr(measurement, "_response_losses", loss)


def compute(path, records, tokenizer, model, *, fingerprint="student-a", settings=SETTINGS, seed=0, **cur):
    return load_or_compute_ranking(path, records=records, tokenizer=tokenizer, model=model,
                                   model_fingerprint=fingerprint, curriculum=curriculum(**cur),
                                   data_settings=settings, seed=seed, progress=False)


@pytest.fixture
def ranked(tmp_path, records, suite_tokenizer, student):
    path = tmp_path / "ranking.jsonl"
    ranking, info = compute(path, records, suite_tokenizer, student)
    return path, ranking, info


def test_first_run_computes_and_the_file_round_trips(ranked, records, monkeypatch, suite_tokenizer):
    path, ranking, info = ranked
    assert info["action"] == "computed" and not info["reused"] and "no ranking file at" in info["reason"]
    assert info["measured"] == ["loss", "rouge_l"]
    assert meta_path(path).name == "ranking.meta.json" and meta_path(path).exists()
    back, meta = read_ranking(path)
    assert back == ranking
    assert [r.rank for r in back] == list(range(1, len(records) + 1))
    assert sorted(r.id for r in back) == sorted(r.id for r in records)
    assert meta["signals"] == ["rouge_l", "loss"] and meta["counts"]["samples"] == len(records)
    assert meta["order_inputs"] == {"measurer": "rrf", "rrf_k": 60, "seed": None}
    assert meta["signals_inputs"]["generation"]["rank_temperature"] == 0.01
    assert {"generate_seconds", "loss_seconds"} <= set(meta["timings"])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in ranking] and all(x["generation"] is not None for x in lines)
    # the stored order is what rank_samples gives from the stored signals
    assert rank_samples(difficulties_from_ranking(back), "rrf") == back


def test_second_run_reuses_without_loading_the_model(ranked, records, suite_tokenizer, monkeypatch):
    path, ranking, _ = ranked
    Calls(monkeypatch, forbid=True)
    again, info = compute(path, records, suite_tokenizer, no_model)
    assert info["action"] == "reused" and info["reused"] and again == ranking
    # a different training seed does not matter to rrf (generations use a fixed seed)
    _, info = compute(path, records, suite_tokenizer, no_model, seed=123)
    assert info["action"] == "reused"


@pytest.mark.parametrize("damage", ["truncate", "edit", "no_meta", "bad_meta"])
def test_read_ranking_detects_damage(ranked, damage, records, suite_tokenizer, student, monkeypatch):
    path, _, _ = ranked
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "edit":
        i = blob.index(b'"rank": 1')
        path.write_bytes(blob[:i] + b'"rank": 2' + blob[i + 9:])  # same size, other content
    elif damage == "no_meta":
        meta_path(path).unlink()
    else:
        meta_path(path).write_text("{ not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_ranking(path)
    calls = Calls(monkeypatch)
    ranking, info = compute(path, records, suite_tokenizer, student)
    assert info["action"] == "computed" and "is corrupt" in info["reason"]
    assert calls.generate == 2 and calls.loss == 1
    assert read_ranking(path)[0] == ranking  # the recomputed file is sound again


def test_another_student_invalidates(ranked, records, suite_tokenizer, student, monkeypatch):
    path, _, _ = ranked
    calls = Calls(monkeypatch)
    _, info = compute(path, records, suite_tokenizer, student, fingerprint="student-b")
    assert info["action"] == "computed" and calls.generate == 2
    assert "the student changed (fingerprint student-a -> student-b)" in info["reason"]


def test_changed_data_invalidates_and_names_the_sample(ranked, records, suite_tokenizer, student, monkeypatch):
    path, _, _ = ranked
    changed = list(records)
    changed[5] = dataclasses.replace(changed[5], output=changed[5].output + " 7")
    calls = Calls(monkeypatch)
    _, info = compute(path, changed, suite_tokenizer, student)
    assert info["action"] == "computed" and calls.generate == 2
    assert f"the data changed (12 samples: 1 changed, e.g. '{records[5].id}')" in info["reason"]
    _, info = compute(path, changed[:-1], suite_tokenizer, student)
    assert "the data changed (12 samples in the ranking file vs 11 now; 1 removed" in info["reason"]


def test_changed_settings_invalidate(ranked, records, suite_tokenizer, student, monkeypatch):
    path, _, _ = ranked
    calls = Calls(monkeypatch)
    _, info = compute(path, records, suite_tokenizer, student, rank_temperature=0.1)
    assert info["action"] == "computed" and calls.generate == 2
    # the setting, and what transformers' generate receives because of it
    assert info["reason"] == ("settings changed: rank_temperature 0.01 -> 0.1, "
                              "transformers_generate.temperature 0.01 -> 0.1")
    _, info = compute(path, records, suite_tokenizer, student, rank_temperature=0.1,
                      settings={**SETTINGS, "max_length": 36})
    assert info["reason"] == "data settings changed: max_length 40 -> 36"


def test_order_only_change_reranks_without_generating(ranked, records, suite_tokenizer, monkeypatch):
    path, ranking, _ = ranked
    Calls(monkeypatch, forbid=True)
    by_loss, info = compute(path, records, suite_tokenizer, no_model, measurer="loss")
    assert info["action"] == "reranked" and info["reused"] and info["measured"] == []
    assert "measurer rrf -> loss" in info["reason"]
    assert [r.id for r in by_loss] == [r.id for r in rank_samples(difficulties_from_ranking(ranking), "loss")]
    assert [r.id for r in by_loss] != [r.id for r in ranking]
    back, meta = read_ranking(path)
    assert back == by_loss and meta["order_inputs"]["measurer"] == "loss"
    assert meta["signals"] == ["rouge_l", "loss"]  # the ROUGE-L signal is kept for later
    again, info = compute(path, records, suite_tokenizer, no_model, measurer="rrf")
    assert info["action"] == "reranked" and again == ranking
    _, info = compute(path, records, suite_tokenizer, no_model, measurer="rrf", rrf_k=10)
    assert info["action"] == "reranked" and "rrf_k 60 -> 10" in info["reason"]


def test_missing_signal_is_measured_alone(tmp_path, records, suite_tokenizer, student, monkeypatch):
    path = tmp_path / "r.jsonl"
    calls = Calls(monkeypatch)
    by_loss, info = compute(path, records, suite_tokenizer, student, measurer="loss")
    assert calls.generate == 0 and calls.loss == 1 and info["measured"] == ["loss"]
    assert all(r.rouge_l is None and r.rouge_rank is None for r in by_loss)
    fused, info = compute(path, records, suite_tokenizer, student, measurer="rrf")
    assert info["action"] == "completed" and info["measured"] == ["rouge_l"]
    assert "has no rouge_l signal (it was made for measurer 'loss')" in info["reason"]
    assert calls.generate == 2 and calls.loss == 1
    assert all(r.rouge_l is not None for r in fused)
    assert [r.loss for r in sorted(fused, key=lambda r: r.id)] == [r.loss for r in sorted(by_loss, key=lambda r: r.id)]


def test_random_measures_nothing_and_depends_on_the_seed(tmp_path, records, suite_tokenizer, monkeypatch):
    path = tmp_path / "r.jsonl"
    Calls(monkeypatch, forbid=True)
    one, info = compute(path, records, suite_tokenizer, no_model, measurer="random", seed=1)
    assert info["action"] == "computed" and info["measured"] == []
    assert all(r.loss is None and r.rouge_l is None and r.score is None for r in one)
    _, info = compute(path, records, suite_tokenizer, no_model, measurer="random", seed=1)
    assert info["action"] == "reused"
    two, info = compute(path, records, suite_tokenizer, no_model, measurer="random", seed=2)
    assert info["action"] == "reranked" and "seed 1 -> 2" in info["reason"]
    assert [r.id for r in one] != [r.id for r in two]


def test_prepare_curriculum_ranks_then_builds_the_stages(tmp_path, records, suite_tokenizer, student):
    from pocl.config import DistillConfig
    from pocl.curriculum import prepare_curriculum, ranking_path

    config = DistillConfig.from_dict({
        "data": {"max_length": 40, "max_prompt_length": 24},
        "loss": {"divergence": "srkl", "skew": 0.1},
        "train": {"output_dir": str(tmp_path / "run"), "progress": False},
        "curriculum": {"curriculum": "pocl", "rank_max_new_tokens": 4}})
    stages, ranking, info = prepare_curriculum(config, records=records, tokenizer=suite_tokenizer, model=student,
                                               model_fingerprint="fp")
    assert ranking_path(config) == tmp_path / "run" / "ranking.jsonl" and (tmp_path / "run" / "ranking.jsonl").exists()
    assert info["action"] == "computed"
    assert [len(s.sample_ids) for s in stages] == [3, 6, 9, 12]
    assert list(stages[-1].sample_ids) == [r.id for r in ranking]
    assert [s.skew for s in stages] == [0.1, 0.1, 0.1, 0.12]
