"""Progressive distillation: a stage names its own teacher (pocl.training.stage_teachers,
pocl.pipeline.load_stage_teachers). The stage really trains against that teacher (the same weights as a
run whose only teacher it is), every teacher gets its own cache, a crashed run resumes into the
uninterrupted one, and a resume with another teacher for a stage, or a teacher with another tokenizer,
is refused."""

from __future__ import annotations

import json

import pytest
import torch

from pocl.errors import PoclError
from pocl.pipeline import distill
from pocl.training.metrics import read_metrics
from pocl.training.stages import Stage
from tests.conftest import make_llama, save_model, tiny_config
from tests.training.test_trainer import _weights, crash_at


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, suite_tokenizer):
    """A third tiny model with the run's tokenizer: 1 layer, 24 wide (between the student and the teacher)."""
    root = tmp_path_factory.mktemp("assistant")
    return save_model(make_llama(suite_tokenizer, hidden=24, layers=1, seed=7), suite_tokenizer, root / "assistant")


def _stages(*teachers, epochs=1):
    return [Stage(f"s{i + 1}", epochs=epochs, temperature=1.0 + i, alpha=0.7 + 0.3 * i, teacher=t)
            for i, t in enumerate(teachers)]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_a_stage_trains_against_the_teacher_it_names(tmp_path, tiny_pair, tiny_data, assistant):
    """Every stage naming the assistant gives, bit for bit, the run whose model.teacher is the assistant;
    its cache is in its own folder and the main teacher (used by no stage) gets none."""
    named = distill(tiny_config(tmp_path / "named", tiny_pair, tiny_data),
                    stages=_stages(str(assistant), str(assistant)))
    only = distill(tiny_config(tmp_path / "only", (assistant, tiny_pair[1]), tiny_data), stages=_stages(None, None))
    _same_weights(named.final_dir, only.final_dir)
    cache = tmp_path / "named" / "run" / "teacher_cache"
    assert not (cache / "train").exists()
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("teacher-")]
    assert (folder / "train").is_dir() and (folder / "dev").is_dir()
    summary = json.loads((tmp_path / "named" / "run" / "summary.json").read_text())
    assert [s["teacher"] for s in summary["stages"]] == [str(assistant)] * 2
    assert summary["fingerprints"]["stage_teachers"].keys() == {str(assistant)}
    assert summary["teacher_cache"]["stage_teachers"][str(assistant)]["train"]
    # A run with one teacher keeps its old stage records and fingerprints (no teacher key).
    plain = json.loads((tmp_path / "only" / "run" / "summary.json").read_text())
    assert "teacher" not in plain["stages"][0] and "stage_teachers" not in plain["fingerprints"]


def test_runs_share_one_teacher_cache_dir_with_a_progressive_run(tmp_path, tiny_pair, tiny_data, assistant):
    """A --teacher-cache-dir shared by a progressive run (its assistant's cache in teacher-HASH/) and a plain
    run: the plain run accepts the folder and reuses the main teacher's cache the first run wrote. Found on
    the GPU matrix of issue 20, where every run after the progressive one refused the shared folder."""
    shared = {"teacher_cache_dir": str(tmp_path / "shared")}
    distill(tiny_config(tmp_path / "progressive", tiny_pair, tiny_data, loss=shared),
            stages=_stages(str(assistant), None))
    assert sorted(p.name.startswith("teacher-") for p in (tmp_path / "shared").iterdir()) == [False, False, True]
    distill(tiny_config(tmp_path / "plain", tiny_pair, tiny_data, loss=shared), stages=_stages(None, None))
    summary = json.loads((tmp_path / "plain" / "run" / "summary.json").read_text())
    assert summary["teacher_cache"]["train"]["action"] == "reused"


def test_the_teacher_changes_between_stages(tmp_path, tiny_pair, tiny_data, assistant):
    """Assistant then teacher differs from teacher throughout and from assistant throughout, and its first
    stage equals the assistant-only run's first stage (same data, same seed): the switch happens at the
    stage boundary. Both teachers have caches."""
    mixed = distill(tiny_config(tmp_path / "mixed", tiny_pair, tiny_data), stages=_stages(str(assistant), None))
    first = distill(tiny_config(tmp_path / "first", (assistant, tiny_pair[1]), tiny_data), stages=_stages(None, None))
    teacher = distill(tiny_config(tmp_path / "teacher", tiny_pair, tiny_data), stages=_stages(None, None))

    def losses(name):
        return [r["loss"] for r in read_metrics(tmp_path / name / "run" / "metrics.jsonl") if r["split"] == "train"]

    assert losses("mixed")[:6] == losses("first")[:6]
    assert losses("mixed")[6:] != losses("first")[6:] and losses("mixed")[6:] != losses("teacher")[6:]
    assert mixed.status == first.status == teacher.status == "completed"
    cache = tmp_path / "mixed" / "run" / "teacher_cache"
    assert (cache / "train").is_dir() and len([p for p in cache.iterdir() if p.name.startswith("teacher-")]) == 1


def test_a_crashed_progressive_run_resumes_into_the_uninterrupted_one(tmp_path, tiny_pair, tiny_data, assistant):
    """Crash in stage 2 (the main teacher's), resume from the step-6 checkpoint taken in stage 1 (the assistant's):
    the same weights and losses as without the crash. Another teacher for stage 1 is then refused."""
    train = {"save_every": 2}
    stages = _stages(str(assistant), None)
    ref = distill(tiny_config(tmp_path / "ref", tiny_pair, tiny_data, train=train), stages=stages)
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, train=train)
    from pocl.pipeline import load_stage_teachers, make_trainer, prepare_run

    inputs = load_stage_teachers(cfg, prepare_run(cfg), stages)
    trainer = make_trainer(cfg, inputs, stages)
    trainer.step_callbacks.append(crash_at(9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    with pytest.raises(PoclError, match="stage"):
        distill(tiny_config(tmp_path / "b", tiny_pair, tiny_data, train=train), stages=_stages(None, None))
    resumed = distill(tiny_config(tmp_path / "b", tiny_pair, tiny_data, train=train), stages=stages)
    _same_weights(ref.final_dir, resumed.final_dir)
    assert [r["loss"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if r["split"] == "train"] == \
        [r["loss"] for r in read_metrics(tmp_path / "ref" / "run" / "metrics.jsonl") if r["split"] == "train"]


def test_a_stage_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_pair, tiny_data, suite_tokenizer):
    from pocl.data import build_suite_tokenizer

    other = build_suite_tokenizer(seed=0)
    other.add_tokens(["<extra-token>"])
    bad = save_model(make_llama(other, hidden=24, layers=1, seed=7), other, tmp_path / "bad")
    with pytest.raises(PoclError, match="stage teacher"):
        distill(tiny_config(tmp_path, tiny_pair, tiny_data), stages=_stages(str(bad), None))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_stage_teachers_from_the_command_line(tmp_path, tiny_pair, tiny_data, assistant):
    """--stage-teachers ASSISTANT - with --curriculum pocl: stage 1 uses the assistant, stage 2 the teacher."""
    from pocl.cli import main

    teacher, student = tiny_pair
    out = tmp_path / "run"
    code = main(["distill", "--curriculum", "pocl", "--num-stages", "2", "--stage-epochs", "1",
                 "--stage-teachers", str(assistant), "-", "--teacher", str(teacher), "--student", str(student),
                 "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]), "--max-length", "48",
                 "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4", "--no-progress",
                 "--no-tensorboard", "--output-dir", str(out), "--rank-max-new-tokens", "6",
                 "--dev-rouge-max-new-tokens", "4"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s.get("teacher") for s in summary["stages"]] == [str(assistant), None]
