"""POCL plugged into the real ``transformers.Trainer``: the exact samples of every optimizer step, the
knobs and the optimizer/LR reset per stage, resume mid-stage, plateau advance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from pocl.curriculum import ranked_ids, read_ranking
from pocl.errors import ConfigError
from pocl.integrations import PoclCollator, PoclCurriculum, dataset_ids

from ._support import (
    LR,
    STEP,
    cosine,
    curriculum_config,
    expected_stream,
    per_step,
    record_steps,
    training_args,
)


class AlphaTrainer(Trainer):
    """A custom loss that reads ``self.alpha`` and ``self.temperature`` (set by the curriculum)."""

    alpha = 0.0
    temperature = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop("prompts", None), inputs.pop("prompt_attention_mask", None)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        loss = out.loss * (1.0 + self.alpha) / self.temperature
        return (loss, out) if return_outputs else loss


def make_trainer(tmp, tiny_pair, tokenizer, dataset, ranking_file, *, cfg=None, resume_dir=None, **kw):
    _, student_dir = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = AlphaTrainer(model=model, args=training_args(resume_dir or tmp, **kw.pop("args", {})),
                           train_dataset=dataset, eval_dataset=kw.pop("eval_dataset", None),
                           data_collator=PoclCollator(tokenizer, max_length=64, max_prompt_length=48,
                                                      with_prompts=False))
    curriculum = PoclCurriculum(ranking_file, dataset, config=cfg or curriculum_config(stage_epochs=1.5), **kw)
    callback = curriculum.attach(trainer)
    seen = record_steps(trainer, ("temperature", "alpha"))
    return trainer, curriculum, callback, seen


def test_the_ids_follow_pocls_loader_rule(train_dataset):
    assert dataset_ids(train_dataset) == list(train_dataset["id"])
    no_id = train_dataset.remove_columns("id")
    assert dataset_ids(no_id) == [f"{i:06d}" for i in range(len(no_id))]
    with pytest.raises(ConfigError, match="no column"):
        dataset_ids(no_id, id_field="key")


def test_every_step_trains_the_exact_curriculum_order_with_the_stage_knobs(tmp_path, tiny_pair, suite_tokenizer,
                                                                          train_dataset, ranking_file):
    trainer, curriculum, callback, seen = make_trainer(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                       ranking_file)
    ranked = ranked_ids(read_ranking(ranking_file)[0])
    sizes = [4, 8, 12, 16]  # 16 samples, 4 equal cumulative slices
    steps = [2, 3, 5, 6]  # ceil(1.5 * size / 4)
    assert curriculum.sampler.planned_steps == steps
    assert trainer.args.max_steps == sum(steps)
    trainer.train()
    ids, first = per_step(seen)
    expected = expected_stream(ranked, sizes, steps, seed=0)
    assert sorted(ids) == list(range(sum(steps)))
    assert [ids[k] for k in range(len(expected))] == [e for _, e in expected]
    starts = [0, 2, 5, 10]
    for step, (stage, batch) in enumerate(expected):
        assert set(batch) <= set(ranked[:sizes[stage]])  # cumulative easiest slices
        rec = first[step]
        assert rec["temperature"] == pytest.approx(1.0 + stage / 3)
        assert rec["alpha"] == pytest.approx(0.7 + 0.1 * stage)
        j = step - starts[stage]
        assert rec["lr"] == pytest.approx(cosine(j, steps[stage]))  # a fresh cosine per stage
        assert (rec["opt_state"] == 0) == (j == 0)  # AdamW state cleared at each stage start only
    # every epoch of a stage is a permutation of its samples, and epochs are reshuffled
    stage4 = [i for s, b in expected if s == 3 for i in b]
    assert len(stage4) == 24 and sorted(stage4[:16]) == sorted(ranked)  # epoch 1: each sample once
    assert len(set(stage4[16:])) == 8  # half of epoch 2, no repeats
    assert stage4[:8] != stage4[16:24]  # reshuffled
    assert [h["step"] for h in callback.history] == starts
    assert trainer.optimizer.param_groups[0]["lr"] < LR  # the last stage's schedule ran


def test_advance_by_steps_and_user_stage_values(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file):
    values = [{"alpha": 0.0}, {"alpha": 0.25}, {}, {"temperature": 5.0}]
    trainer, _, _, seen = make_trainer(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                       ranking_file, advance="steps", stage_steps=[1, 2, 1, 3],
                                       stage_values=values)
    trainer.train()
    ids, first = per_step(seen)
    ranked = ranked_ids(read_ranking(ranking_file)[0])
    expected = expected_stream(ranked, [4, 8, 12, 16], [1, 2, 1, 3], seed=0)
    assert [ids[k] for k in range(7)] == [e for _, e in expected]
    assert [(first[k]["alpha"], round(first[k]["temperature"], 4)) for k in range(7)] == [
        (0.0, 1.0), (0.25, 1.3333), (0.25, 1.3333), (0.9, 1.6667), (1.0, 5.0), (1.0, 5.0), (1.0, 5.0)]


@pytest.mark.slow
def test_resume_mid_stage_reproduces_the_uninterrupted_run(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                           ranking_file):
    full, _, _, seen_full = make_trainer(tmp_path / "a", tiny_pair, suite_tokenizer, train_dataset, ranking_file,
                                         args={"save_strategy": "steps", "save_steps": 6})
    full.train()
    # checkpoint-6 lies inside stage 3 (steps 5..9); a second run resumes from it
    resumed, _, callback, seen_resumed = make_trainer(tmp_path / "b", tiny_pair, suite_tokenizer, train_dataset,
                                                      ranking_file)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    ids_full, first_full = per_step(seen_full)
    ids_res, first_res = per_step(seen_resumed)
    assert sorted(ids_res) == list(range(6, 16))
    assert {k: ids_full[k] for k in ids_res} == ids_res
    for k in ids_res:
        for key in ("temperature", "alpha", "lr"):
            assert first_res[k][key] == pytest.approx(first_full[k][key])
    assert first_res[6]["opt_state"] > 0  # mid-stage: the checkpoint's AdamW state, not a fresh one
    assert first_res[10]["opt_state"] == 0  # the next stage still starts fresh
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in callback.history] == [0, 2, 5, 10]


class PlateauTrainer(AlphaTrainer):
    """Evaluations report a metric that never improves after the first one."""

    def evaluate(self, *args, **kwargs):
        metrics = {"eval_score": 1.0}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def test_plateau_ends_stages_early_and_samples_match_their_stage(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                                 ranking_file):
    _, student_dir = tiny_pair
    trainer = PlateauTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                             args=training_args(tmp_path, eval_strategy="steps", eval_steps=1),
                             train_dataset=train_dataset, eval_dataset=train_dataset,
                             data_collator=PoclCollator(suite_tokenizer, max_length=64, max_prompt_length=48,
                                                        with_prompts=False))
    curriculum = PoclCurriculum(ranking_file, train_dataset, config=curriculum_config(stage_epochs=4),
                                advance="plateau", metric="score", greater_is_better=True, patience=1)
    callback = curriculum.attach(trainer)
    seen = record_steps(trainer, ("temperature", "alpha"))
    planned = list(curriculum.sampler.planned_steps)
    assert planned == [4, 8, 12, 16]
    trainer.train()
    steps = curriculum.sampler.steps
    assert steps[:3] != planned[:3] and all(a < b for a, b in zip(steps[:3], planned[:3]))
    assert steps[3] == planned[3]  # the last stage never ends early
    ids, first = per_step(seen)
    assert len(ids) == sum(steps)
    ranked = ranked_ids(read_ranking(ranking_file)[0])
    for k, batch in ids.items():
        stage = curriculum.sampler.stage_at(k)
        assert batch == [train_dataset["id"][i] for i in curriculum.sampler.step_samples(k)]
        assert set(batch) <= set(ranked[:4 * (stage + 1)])
        assert first[k]["alpha"] == pytest.approx(0.7 + 0.1 * stage)  # knobs of the stage the samples belong to
    assert [h["step"] for h in callback.history] == curriculum.sampler.starts()
    assert len(ids[0]) == STEP


def test_refusals(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file):
    with pytest.raises(ConfigError, match="stage_steps"):
        PoclCurriculum(ranking_file, train_dataset, advance="steps")
    with pytest.raises(ConfigError, match="not in the ranking"):
        PoclCurriculum(ranked_ids(read_ranking(ranking_file)[0])[:8], train_dataset)
    with pytest.raises(ConfigError, match="evaluations"):
        make_trainer(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file, advance="plateau", patience=2)
    with pytest.raises(ConfigError, match="reduce_lr_on_plateau"):
        make_trainer(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file,
                     args={"lr_scheduler_type": "reduce_lr_on_plateau", "eval_strategy": "steps"},
                     eval_dataset=train_dataset)


def plateau_trainer(out, tiny_pair, tokenizer, dataset, ranking_file, **args):
    _, student_dir = tiny_pair
    trainer = PlateauTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                             args=training_args(out, eval_strategy="steps", eval_steps=1, **args),
                             train_dataset=dataset, eval_dataset=dataset,
                             data_collator=PoclCollator(tokenizer, max_length=64, max_prompt_length=48,
                                                        with_prompts=False))
    curriculum = PoclCurriculum(ranking_file, dataset, config=curriculum_config(stage_epochs=4), advance="plateau",
                                metric="score", greater_is_better=True, patience=2)
    curriculum.attach(trainer)
    return trainer, curriculum, record_steps(trainer, ("temperature", "alpha"))


@pytest.mark.slow
def test_resume_after_a_plateau_end_keeps_the_shortened_stages(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                               ranking_file):
    full, cur_full, seen_full = plateau_trainer(tmp_path / "a", tiny_pair, suite_tokenizer, train_dataset,
                                                ranking_file, save_strategy="steps", save_steps=9)
    full.train()
    assert cur_full.sampler.steps[:3] != cur_full.sampler.planned_steps[:3]
    resumed, cur_res, seen_res = plateau_trainer(tmp_path / "b", tiny_pair, suite_tokenizer, train_dataset,
                                                 ranking_file)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-9"))
    assert cur_res.sampler.steps == cur_full.sampler.steps  # the stored plateau ends, then the same later ones
    ids_full, first_full = per_step(seen_full)
    ids_res, first_res = per_step(seen_res)
    assert min(ids_res) == 9 and {k: ids_full[k] for k in ids_res} == ids_res
    assert all(first_res[k]["alpha"] == first_full[k]["alpha"] for k in ids_res)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flag", ["ignore_data_skip", "restore_callback_states_from_checkpoint"])
def test_resume_flags_that_would_break_the_order_are_refused(tmp_path, tiny_pair, suite_tokenizer, train_dataset,
                                                             ranking_file, flag):
    with pytest.raises(ConfigError, match=flag):
        make_trainer(tmp_path, tiny_pair, suite_tokenizer, train_dataset, ranking_file, args={flag: True})

