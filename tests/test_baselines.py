"""The CE-only baselines: SeqKD (train on the teacher's answers) and SFT, end to end on the tiny pair."""

from __future__ import annotations

import json

import pytest

import pocl.baselines as baselines
from pocl.data import IGNORE_INDEX
from pocl.errors import ConfigError
from pocl.pipeline import distill, prepare_run
from pocl.training.teacher_signal import LiveTeacher
from pocl.training.trainer import DistillTrainer
from tests.conftest import tiny_config


def _seqkd_run(cfg):
    """pocl.pipeline.distill with loss.method seqkd; then the cached teacher answers are reused."""
    result = distill(cfg)
    inputs, again = baselines.apply_method(cfg, prepare_run(cfg))
    assert again["action"] == "reused"
    return result, inputs, result.summary["seqkd"]


def test_seqkd_end_to_end_trains_on_cached_teacher_answers(tmp_path, tiny_pair, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"method": "seqkd", "seqkd_max_new_tokens": 6,
                                                            "seqkd_batch_size": 16, "alpha": 0.5})
    result, inputs, info = _seqkd_run(cfg)
    assert result.status == "completed" and info["action"] == "generated" and info["samples"] == 48
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / baselines.SEQKD_FILE).read_text().splitlines()]
    meta = json.loads((run / "seqkd_teacher.meta.json").read_text())
    assert [d["id"] for d in lines] == inputs.train_data.ids and meta["stamp_inputs"]["generation"]["do_sample"] is False
    eos = inputs.tokenizer.eos_token_id
    for sample, d in zip(inputs.train_data, lines):
        response = d["token_ids"] + ([eos] if d["stopped_at_eos"] else [])
        response = response[: cfg.data.max_length - sample.prompt_length]
        assert sample.input_ids[sample.prompt_length:] == response  # the teacher's tokens, not re-tokenised
        assert sample.labels == [IGNORE_INDEX] * sample.prompt_length + response
    # greedy teacher answers: the same as generating them again
    teacher_gens = baselines.teacher_responses(tmp_path / "other.jsonl", teacher=inputs.teacher,
                                               tokenizer=inputs.tokenizer, samples=prepare_run(cfg).train_data,
                                               decoding=baselines.seqkd_decoding(cfg.loss), batch_size=16,
                                               teacher_fingerprint="x")[0]
    assert [g.token_ids for g in teacher_gens] == [d["token_ids"] for d in lines]
    # CE only: alpha 0 in the stage (whatever loss.alpha says), the teacher is never evaluated in training
    assert [s["alpha"] for s in result.summary["stages"]] == [0.0] and result.summary["method"] == "seqkd"

    # the cache is reused when its stamp matches, regenerated (with the reason) when it does not
    def no_generation(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(baselines, "generate", no_generation)
    again = baselines.apply_method(cfg, prepare_run(cfg))[1]
    assert again["action"] == "reused"
    monkeypatch.undo()
    changed = baselines.apply_method(cfg.replace(loss={"seqkd_max_new_tokens": 3}), prepare_run(cfg))[1]
    assert changed["action"] == "generated" and "max_new_tokens 6 -> 3" in changed["reason"]


def test_seqkd_trainer_refuses_reference_data(tmp_path, tiny_pair, tiny_data):
    """The trainer's guard: seqkd on the references would silently be SFT."""
    from pocl.pipeline import kd_stages

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"method": "seqkd"})
    inputs = prepare_run(cfg)
    with pytest.raises(ConfigError, match="not the teacher's answers"):
        DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                       train_data=inputs.train_data, dev_data=inputs.dev_data, stages=kd_stages(cfg),
                       vocab_size=inputs.vocab_size)


def test_seqkd_with_the_pocl_curriculum(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"method": "seqkd", "seqkd_max_new_tokens": 4},
                      curriculum={"curriculum": "pocl", "num_stages": 2, "stage_epochs": 1,
                                  "rank_max_new_tokens": 4, "rank_batch_size": 16})
    result, inputs, _ = _seqkd_run(cfg)
    assert [s["alpha"] for s in result.summary["stages"]] == [0.0, 0.0]
    assert [s["temperature"] for s in result.summary["stages"]] == [1.0, 2.0]
    # the measurer scored the student against the teacher's answers (the records carry them)
    gens = {json.loads(line)["id"]: json.loads(line)["text"]
            for line in (tmp_path / "run" / baselines.SEQKD_FILE).read_text().splitlines()}
    assert all(r.output == gens[r.id] for r in inputs.train_records if gens[r.id].strip())


def test_sft_end_to_end_never_evaluates_the_teacher(tmp_path, tiny_pair, tiny_data, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"method": "sft", "alpha": 0.9},
                      curriculum={"curriculum": "pocl", "num_stages": 2, "stage_epochs": 1,
                                  "rank_max_new_tokens": 4, "rank_batch_size": 16})

    def no_teacher(self, batch):
        raise AssertionError("the teacher was evaluated")

    monkeypatch.setattr(LiveTeacher, "side", no_teacher)
    result = distill(cfg)
    assert result.status == "completed" and result.summary["method"] == "sft"
    assert [s["alpha"] for s in result.summary["stages"]] == [0.0, 0.0]
    assert baselines.apply_method(cfg, None)[1] == {}  # nothing to prepare for sft
    assert [s.alpha for s in baselines.method_stages(cfg, [])] == []
