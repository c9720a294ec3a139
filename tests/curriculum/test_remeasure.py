"""Re-measuring between stages (curriculum.remeasure, pocl.curriculum.remeasure): stage s keeps its size,
contains stage s-1, and adds the easiest of the remaining samples as ranked by the student at the end of
stage s-1 (checked against a measurement of that checkpoint's student); a crash inside a re-measured
stage resumes into the uninterrupted run without measuring again."""

from __future__ import annotations

import json

import pytest
import torch

from pocl.config import DistillConfig
from pocl.curriculum.difficulty import (
    measure_difficulty,
    rank_samples,
    ranking_decoding,
)
from pocl.curriculum.ranking_stamps import GENERATION_SEED
from pocl.data import get_template, load_records
from pocl.pipeline import distill
from tests.conftest import tiny_config
from tests.training.test_trainer import _weights, crash_at

CURRICULUM = {"curriculum": "pocl", "num_stages": 3, "stage_epochs": 1, "rank_max_new_tokens": 6,
              "rank_batch_size": 16, "remeasure": True}


def _state(run_dir, step=None):
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    folder = ckpts[-1] if step is None else run_dir / "checkpoints" / f"step-{step:08d}"
    return json.loads((folder / "trainer_state.json").read_text())["state"]


def test_each_stage_adds_the_easiest_remaining_samples_for_the_current_student(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, curriculum=CURRICULUM, train={"save_total_limit": 5})
    result = distill(cfg)
    run = tmp_path / "run"
    initial = [json.loads(line)["id"] for line in (run / "ranking.jsonl").read_text().splitlines()]
    chosen = _state(run)["remeasured"]
    assert sorted(chosen) == ["1", "2"]
    sizes = [s["num_samples"] for s in result.summary["stages"]]
    assert sizes == [16, 32, 48]
    stage1 = initial[:16]
    assert chosen["1"][:16] == stage1 and len(chosen["1"]) == 32 and len(set(chosen["1"])) == 32
    assert chosen["2"][:32] == chosen["1"] and len(set(chosen["2"])) == 48
    # Stage 2's new samples: the easiest of the other 32 for the student at the end of stage 1 (its checkpoint).
    ranked = [json.loads(line) for line in (run / "rankings" / "stage-2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in ranked[:16]] == chosen["1"][16:] and len(ranked) == 32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    end_of_stage1 = min((run / "checkpoints").iterdir())  # one checkpoint per stage end
    assert _state(run, int(end_of_stage1.name.split("-")[1]))["stage_index"] == 1
    student = AutoModelForCausalLM.from_pretrained(end_of_stage1, dtype=torch.float32)
    records = [r for r in load_records(str(tiny_data[0])).records if r.id not in set(stage1)]
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    naive = rank_samples(measure_difficulty(
        student, tok, records, template=get_template(cfg.data.template, tok), max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length, truncation_side=cfg.data.truncation_side,
        decoding=ranking_decoding(cfg.curriculum), batch_size=16, seed=GENERATION_SEED, progress=False), "rrf", k=60)
    assert [r.id for r in naive] == [r["id"] for r in ranked]
    # ... and it is not the initial student's order of those samples.
    assert [i for i in initial if i not in set(stage1)] != [r["id"] for r in ranked]
    assert [r["index"] for r in result.summary["remeasure"]] == [1, 2]
    assert [r["measured_samples"] for r in result.summary["remeasure"]] == [32, 16]


def test_a_crash_inside_a_remeasured_stage_resumes_without_measuring_again(tmp_path, tiny_pair, tiny_data):
    ref = distill(tiny_config(tmp_path / "a", tiny_pair, tiny_data, curriculum=CURRICULUM, train={"save_every": 1}))
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, curriculum=CURRICULUM, train={"save_every": 1})
    from pocl.curriculum.remeasure import StageRemeasure
    from pocl.pipeline import (
        curriculum_stages,
        load_stage_teachers,
        make_trainer,
        prepare_run,
    )

    inputs = prepare_run(cfg)
    stages, _ = curriculum_stages(cfg, inputs)
    inputs = load_stage_teachers(cfg, inputs, stages)
    hook = StageRemeasure(cfg, records=inputs.train_records, tokenizer=inputs.tokenizer, teacher=inputs.teacher)
    trainer = make_trainer(cfg, inputs, stages, stage_hooks=[hook])
    trainer.step_callbacks.append(crash_at(4))  # stage 2 runs steps 3-6
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    resumed = distill(tiny_config(tmp_path / "b", tiny_pair, tiny_data, curriculum=CURRICULUM,
                                  train={"save_every": 1}))
    assert [r["index"] for r in resumed.summary["remeasure"]] == [2]  # stage 2's samples came from the checkpoint
    assert _state(tmp_path / "b" / "run")["remeasured"] == _state(tmp_path / "a" / "run")["remeasured"]
    for k, v in _weights(ref.final_dir).items():
        torch.testing.assert_close(_weights(resumed.final_dir)[k], v, rtol=0, atol=0, msg=k)


def test_remeasure_is_off_by_default_and_keeps_old_hashes():
    base = DistillConfig.from_dict({"curriculum": {"curriculum": "pocl"}})
    assert base.curriculum.remeasure is False
    assert DistillConfig.from_dict({"curriculum": {"curriculum": "pocl", "remeasure": True}}).training_hash() != \
        base.training_hash()
