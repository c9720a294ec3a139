"""POCL plugged into TRL's real GKDTrainer (trl.experimental.gkd in TRL 1.x): the exact order of every
stage, temperature / beta / lmbda per stage (and the temperature that reaches the JSD loss), resume
mid-stage."""

from __future__ import annotations

import pytest
import torch

from pocl.curriculum import ranked_ids, read_ranking
from pocl.integrations import GKD_KNOBS, PoclCollator, PoclCurriculum

from ._support import (
    ACCUM,
    LR,
    MICRO,
    curriculum_config,
    expected_stream,
    per_step,
    record_steps,
)

gkd = pytest.importorskip("trl.experimental.gkd")

BETAS = [0.1, 0.2, 0.3, 0.4]


def make_gkd(out, tiny_pair, tokenizer, dataset, ranking_file, **args):
    from transformers import AutoModelForCausalLM

    teacher_dir, student_dir = tiny_pair
    values = {"output_dir": str(out), "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
              "learning_rate": LR, "lr_scheduler_type": "cosine", "seed": 0, "report_to": "none", "use_cpu": True,
              "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "max_new_tokens": 4,
              "lmbda": 0.0, "beta": 0.5, "temperature": 1.0, "max_length": 64}
    values.update(args)
    trainer = gkd.GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                             teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
                             args=gkd.GKDConfig(**values), train_dataset=dataset, processing_class=tokenizer,
                             data_collator=PoclCollator(tokenizer, max_length=64, max_prompt_length=48))
    loss_temperatures = []
    original = trainer.generalized_jsd_loss

    def recording(*a, **kw):
        loss_temperatures.append((trainer.state.global_step, kw.get("temperature")))
        return original(*a, **kw)

    trainer.generalized_jsd_loss = recording
    cfg = curriculum_config(stage_epochs=1.5, on_policy_fraction_start=0.0, on_policy_fraction_end=0.3)
    curriculum = PoclCurriculum(ranking_file, dataset, config=cfg, stage_values=[{"beta": b} for b in BETAS])
    callback = curriculum.attach(trainer)
    seen = record_steps(trainer, GKD_KNOBS)
    return trainer, callback, seen, loss_temperatures


def test_gkd_trains_the_curriculum_with_temperature_beta_lmbda_per_stage(tmp_path, tiny_pair, suite_tokenizer,
                                                                          train_dataset, ranking_file):
    trainer, callback, seen, temps = make_gkd(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file)
    assert callback.knobs == GKD_KNOBS
    trainer.train()
    ranked = ranked_ids(read_ranking(ranking_file)[0])
    steps = [2, 3, 5, 6]
    expected = expected_stream(ranked, [4, 8, 12, 16], steps, seed=0)
    ids, first = per_step(seen)
    assert [ids[k] for k in range(sum(steps))] == [e for _, e in expected]
    for step, (stage, _) in enumerate(expected):
        rec = first[step]
        assert rec["temperature"] == pytest.approx(1.0 + stage / 3)
        assert rec["beta"] == BETAS[stage]
        assert rec["lmbda"] == pytest.approx(0.1 * stage)  # on-policy fraction 0 -> 0.3
    # the divergence itself runs at the stage's temperature (TRL's GKDTrainer alone would use 1.0)
    by_step = dict(temps)
    assert [round(by_step[k], 4) for k in (0, 2, 5, 10)] == [1.0, 1.3333, 1.6667, 2.0]
    assert [h["step"] for h in callback.history] == [0, 2, 5, 10]


@pytest.mark.slow
def test_gkd_resume_mid_stage_reproduces_order_and_weights(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                           ranking_file):
    # lmbda 0 -> 0.3: on-policy sampling happens; TRL restores python/torch RNG from the checkpoint.
    full, _, seen_full, _ = make_gkd(tmp_path / "a", tiny_pair, suite_tokenizer, train_dataset, ranking_file,
                                     save_strategy="steps", save_steps=7)
    full.train()
    resumed, callback, seen_res, _ = make_gkd(tmp_path / "b", tiny_pair, suite_tokenizer, train_dataset,
                                              ranking_file)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-7"))
    ids_full, first_full = per_step(seen_full)
    ids_res, first_res = per_step(seen_res)
    assert sorted(ids_res) == list(range(7, 16))
    assert {k: ids_full[k] for k in ids_res} == ids_res
    for k in ids_res:
        assert {x: first_res[k][x] for x in (*GKD_KNOBS, "lr")} == pytest.approx(
            {x: first_full[k][x] for x in (*GKD_KNOBS, "lr")})
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in callback.history] == [0, 2, 5, 10]
