"""The ranking file with the teacher measurers: the teacher stamp (same teacher reused, another teacher
re-measures only the teacher signals), the student-only files unchanged, the resumable teacher pass,
and the pipeline's pass-through."""

from __future__ import annotations

import json

import pytest

from pocl.config import CurriculumConfig
from pocl.curriculum import (
    difficulties_from_ranking,
    load_or_compute_ranking,
    measurement,
    rank_samples,
    read_ranking,
)
from pocl.curriculum.ranking import partial_path
from pocl.curriculum.ranking_file import LINE_KEYS
from pocl.data import Record, generate_suite
from pocl.errors import ConfigError
from tests.conftest import make_llama

SETTINGS = {"template": "alpaca", "use_prompt_field": None, "max_length": 40, "max_prompt_length": 24,
            "truncation_side": "left"}


@pytest.fixture(scope="module")
def student(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=16, layers=1, seed=2)


@pytest.fixture(scope="module")
def teachers(suite_tokenizer):
    return make_llama(suite_tokenizer, hidden=32, layers=2, seed=1), make_llama(suite_tokenizer, hidden=32, layers=2,
                                                                                seed=5)


@pytest.fixture(scope="module")
def records():
    rows = generate_suite(n_train=12, n_dev=0, n_test=0, seed=2)["train"]
    return [Record(id=r["id"], instruction=r["instruction"], input=r["input"], output=r["output"]) for r in rows]


REAL = measurement.generate, measurement._response_losses, measurement.joint_batch_signals


class Interrupted(Exception):
    """Stands for the process dying in the middle of the pass."""


def no_model():
    raise AssertionError("a model was loaded although nothing had to be measured with it")


class Calls:
    """Counts the passes: generate calls, loss passes and teacher batches (``fail_after`` teacher
    batches raise, standing for a killed process)."""

    def __init__(self, monkeypatch, fail_after: int | None = None):
        self.generate = self.loss = self.teacher = 0
        real_gen, real_loss, real_joint = REAL

        def gen(*a, **k):
            self.generate += 1
            return real_gen(*a, **k)

        def loss(*a, **k):
            self.loss += 1
            return real_loss(*a, **k)

        def joint(*a, **k):
            if fail_after is not None and self.teacher >= fail_after:
                raise Interrupted("simulated interruption")
            self.teacher += 1
            return real_joint(*a, **k)

        monkeypatch.setattr(measurement, "generate", gen)
        monkeypatch.setattr(measurement, "_response_losses", loss)
        monkeypatch.setattr(measurement, "joint_batch_signals", joint)


def compute(path, records, tokenizer, model, *, teacher=None, teacher_fp=None, **cur):
    curriculum = CurriculumConfig(**{"rank_max_new_tokens": 4, "rank_batch_size": 4, **cur})
    return load_or_compute_ranking(path, records=records, tokenizer=tokenizer, model=model,
                                   model_fingerprint="student-a", curriculum=curriculum, data_settings=SETTINGS,
                                   seed=0, progress=False, teacher=teacher, teacher_fingerprint=teacher_fp)


def _by_id(ranking, *names):
    return {r.id: tuple(getattr(r, n) for n in names) for r in ranking}


def test_the_teacher_stamp_decides_what_is_measured_again(tmp_path, records, suite_tokenizer, student, teachers,
                                                          monkeypatch):
    path = tmp_path / "ranking.jsonl"
    teacher_a, teacher_b = teachers
    calls = Calls(monkeypatch)
    # a student-only ranking: its files do not mention any teacher, even when one is at hand
    fused, info = compute(path, records, suite_tokenizer, student, teacher=teacher_a, teacher_fp="teacher-a")
    assert info["measured"] == ["loss", "rouge_l"] and calls.teacher == 0
    meta = json.loads(path.with_name("ranking.meta.json").read_text())
    assert "teacher" not in json.dumps({k: v for k, v in meta.items() if k != "jsonl"})
    assert set(meta["counts"]) == {"samples", "with_rouge_l", "with_loss"} and meta["signals"] == ["rouge_l", "loss"]
    assert all(set(json.loads(x)) == {*LINE_KEYS, "sample_hash"} for x in path.read_text().splitlines())
    _, info = compute(path, records, suite_tokenizer, no_model)  # and it is reused without a teacher
    assert info["action"] == "reused"

    # rrf_teacher on that file: only the joint teacher pass runs
    both, info = compute(path, records, suite_tokenizer, student, teacher=teacher_a, teacher_fp="teacher-a",
                         measurer="rrf_teacher")
    assert info["action"] == "completed" and info["measured"] == ["teacher_entropy", "teacher_kl"]
    assert info["batches"] == {"teacher": {"measured": 3, "reused": 0}}
    assert (calls.generate, calls.loss, calls.teacher) == (3, 1, 3)
    assert _by_id(both, "loss", "rouge_l") == _by_id(fused, "loss", "rouge_l")
    assert [r.id for r in both] == [r.id for r in rank_samples(difficulties_from_ranking(both), "rrf_teacher")]
    back, meta = read_ranking(path)
    assert back == both and meta["teacher_inputs"] == {"teacher": "teacher-a"}
    assert meta["signals"] == ["rouge_l", "loss", "teacher_kl", "teacher_entropy"]
    assert all(json.loads(x)["teacher_kl"] is not None for x in path.read_text().splitlines())
    assert {"loss_seconds", "generate_seconds", "teacher_seconds"} <= set(meta["timings"])

    # the same teacher: reused, neither model loaded
    again, info = compute(path, records, suite_tokenizer, no_model, teacher=no_model, teacher_fp="teacher-a",
                          measurer="rrf_teacher")
    assert info["action"] == "reused" and again == both
    # another teacher: its signals are measured again, the student's are reused
    other, info = compute(path, records, suite_tokenizer, student, teacher=teacher_b, teacher_fp="teacher-b",
                          measurer="rrf_teacher")
    assert info["action"] == "completed" and info["measured"] == ["teacher_entropy", "teacher_kl"]
    assert "the teacher changed (fingerprint teacher-a -> teacher-b)" in info["reason"]
    assert (calls.generate, calls.loss, calls.teacher) == (3, 1, 6)
    assert _by_id(other, "loss", "rouge_l", "generation") == _by_id(both, "loss", "rouge_l", "generation")
    assert _by_id(other, "teacher_kl") != _by_id(both, "teacher_kl")
    assert read_ranking(path)[1]["teacher_inputs"] == {"teacher": "teacher-b"}
    # a student-only measurer re-ranks; the teacher signals and their stamp are kept for later
    by_rrf, info = compute(path, records, suite_tokenizer, no_model, measurer="rrf")
    assert info["action"] == "reranked" and [r.id for r in by_rrf] == [r.id for r in fused]
    assert read_ranking(path)[1]["teacher_inputs"] == {"teacher": "teacher-b"}
    _, info = compute(path, records, suite_tokenizer, no_model, teacher=no_model, teacher_fp="teacher-b",
                      measurer="teacher_entropy")
    assert info["action"] == "reranked"


def test_a_teacher_measurer_without_teacher_is_a_config_error(tmp_path, records, suite_tokenizer, student):
    for measurer in ("teacher_kl", "teacher_entropy", "rrf_teacher"):
        with pytest.raises(ConfigError, match=r"curriculum\.measurer: '" + measurer + "' ranks with the teacher"):
            compute(tmp_path / "r.jsonl", records, suite_tokenizer, student, measurer=measurer)
    assert not (tmp_path / "r.jsonl").exists()


def test_an_interrupted_teacher_pass_resumes(tmp_path, records, suite_tokenizer, student, teachers, monkeypatch):
    teacher_a, teacher_b = teachers
    whole, _ = compute(tmp_path / "whole.jsonl", records, suite_tokenizer, student, teacher=teacher_a,
                       teacher_fp="teacher-a", measurer="teacher_kl")
    path = tmp_path / "ranking.jsonl"
    Calls(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        compute(path, records, suite_tokenizer, student, teacher=teacher_a, teacher_fp="teacher-a",
                measurer="teacher_kl")
    lines = partial_path(path).read_text().splitlines()[1:]
    assert [(e["signal"], e["batch"]) for e in map(json.loads, lines)] == [("teacher", 0), ("teacher", 1)]
    calls = Calls(monkeypatch)
    ranking, info = compute(path, records, suite_tokenizer, student, teacher=teacher_a, teacher_fp="teacher-a",
                            measurer="teacher_kl")
    assert calls.teacher == 1 and calls.loss == 0 and calls.generate == 0
    assert info["batches"] == {"teacher": {"measured": 1, "reused": 2}}
    assert "resumed an interrupted measurement (2 of 3 teacher batches" in info["reason"]
    assert ranking == whole and not partial_path(path).exists()

    # the batches of an interrupted pass with another teacher are not used
    Calls(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        compute(tmp_path / "b.jsonl", records, suite_tokenizer, student, teacher=teacher_b, teacher_fp="teacher-b",
                measurer="teacher_kl")
    calls = Calls(monkeypatch)
    ranking, info = compute(tmp_path / "b.jsonl", records, suite_tokenizer, student, teacher=teacher_a,
                            teacher_fp="teacher-a", measurer="teacher_kl")
    assert calls.teacher == 3 and info["batches"] == {"teacher": {"measured": 3, "reused": 0}}
    assert ranking == whole


def test_the_pipeline_passes_the_teacher_to_the_measurer(tmp_path, records, suite_tokenizer, student, teachers):
    from pocl.config import DistillConfig
    from pocl.pipeline import RunInputs, curriculum_stages

    def run(teacher, fingerprint):
        config = DistillConfig.from_dict({
            "data": {"max_length": 40, "max_prompt_length": 24},
            "train": {"output_dir": str(tmp_path / "run"), "progress": False},
            "model": {"cpu": True},
            "curriculum": {"curriculum": "pocl", "measurer": "teacher_kl", "rank_max_new_tokens": 4}})
        inputs = RunInputs(tokenizer=suite_tokenizer, teacher=teacher, student=student, train_data=records,
                           dev_data=None, vocab_size=len(suite_tokenizer), fused=True,
                           fingerprints={"teacher": fingerprint, "student_init": "student-a"}, train_records=records,
                           dev_records=None)
        return curriculum_stages(config, inputs)

    with pytest.raises(ConfigError, match=r"curriculum\.measurer"):
        run(None, None)  # e.g. --method sft: no teacher is loaded
    stages, info = run(teachers[0], "teacher-a")
    assert info["measured"] == ["teacher_entropy", "teacher_kl"] and len(stages) == 4
    ranking, meta = read_ranking(tmp_path / "run" / "ranking.jsonl")
    assert meta["teacher_inputs"] == {"teacher": "teacher-a"} and all(r.teacher_kl is not None for r in ranking)


class _FakeDist:
    """Two 'processes' as threads: barrier and gather as accelerate's, rank 0 the main process."""

    def __init__(self, barrier, slots, rank):
        self.barrier_, self.slots, self.rank, self.world, self.is_main = barrier, slots, rank, 2, rank == 0

    def barrier(self):
        self.barrier_.wait()

    def gather(self, items):
        self.slots[self.rank] = items
        self.barrier_.wait()
        out = list(self.slots)
        self.barrier_.wait()
        return out


def test_sharded_processes_share_the_teacher_pass_through_the_journal(tmp_path, records, suite_tokenizer, student,
                                                                       teachers):
    """Each of two 'processes' measures every other teacher batch; the rounds are gathered through the
    journal, so both return every sample's values (those of one process), and only the main process
    appends to the partial file."""
    import copy
    import threading

    from pocl.curriculum.ranking_journal import PartialMeasurement
    from pocl.data import get_template

    template = get_template("alpaca", suite_tokenizer)
    kw = {"template": template, "max_length": 40, "max_prompt_length": 24, "decoding": None, "batch_size": 4,
              "need_rouge": False, "need_loss": False, "progress": False}
    whole = measurement.measure_difficulty(student, suite_tokenizer, records, teacher=teachers[0], **kw)
    path = tmp_path / "ranking.partial.jsonl"
    barrier, slots, results, errors = threading.Barrier(2, timeout=60), [None, None], [None, None], []

    def worker(rank):
        try:
            journal = PartialMeasurement(path, "stamp", _FakeDist(barrier, slots, rank), teacher_hash="teacher-a")
            results[rank] = (measurement.measure_difficulty(
                copy.deepcopy(student), suite_tokenizer, records, teacher=copy.deepcopy(teachers[0]), shard=(rank, 2),
                journal=journal, **kw), journal)
            journal.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for measured, journal in results:
        pairs = [(d.teacher_kl, d.teacher_entropy) for d in measured]
        assert pairs == [(d.teacher_kl, d.teacher_entropy) for d in whole]
        assert journal.measured["teacher"] == 3
    entries = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    assert sorted(e["batch"] for e in entries) == [0, 1, 2] and {e["teacher_hash"] for e in entries} == {"teacher-a"}
