"""The trainer on tiny random-initialised models: pinned loss curve, resume == uninterrupted,
gradient-accumulation invariance, stages, non-finite steps, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pocl.errors import CheckpointError
from pocl.pipeline import distill, prepare_run
from pocl.training.metrics import read_metrics
from pocl.training.stages import Stage
from pocl.training.trainer import DistillTrainer, NonFiniteLossError
from tests.conftest import tiny_config


def _trainer(cfg, stages=None, inputs=None, **kw):
    from pocl.pipeline import kd_stages

    inputs = inputs or prepare_run(cfg)
    return DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                          train_data=inputs.train_data, dev_data=inputs.dev_data, stages=stages or kd_stages(cfg),
                          vocab_size=inputs.vocab_size, fused=inputs.fused, fingerprints=inputs.fingerprints, **kw)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def crash_at(step):
    """A step callback that raises RuntimeError("simulated crash") once the run reaches global ``step``."""
    def crash(trainer):
        if trainer.state.global_step == step:
            raise RuntimeError("simulated crash")

    return crash


def _train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


# Pinned on the CPU build of torch 2.13; after an intended change of the numerics, re-pin by pasting the
# losses this test computes (and say why in the commit). Six optimizer steps of the tiny pair, FKL,
# alpha 0.5, T 1, the live teacher (the cached one is compared with the live one in
# tests/training/test_teacher_cache.py).
PINNED_LOSSES = [3.107421, 3.104847, 3.045965, 3.040193, 2.969669, 2.992580]


def test_pinned_loss_curve(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"epochs": 1}, loss={"teacher_cache": "off"})
    result = distill(cfg)
    assert result.status == "completed"
    losses = _train_losses(cfg.train.output_dir and tmp_path / "run")
    assert len(losses) == 6  # 48 samples / batch 8
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4, abs=1e-5)
    assert losses[-1] < losses[0]


def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_pair, tiny_data):
    full = tiny_config(tmp_path / "a", tiny_pair, tiny_data, train={"epochs": 2, "save_every": 2})
    ref = distill(full)
    ref_weights = _weights(ref.final_dir)

    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, train={"epochs": 2, "save_every": 2})

    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(7)]).train()
    # checkpoints at steps 2, 4, 6 (6 = end of epoch 1 too); resume continues from 6
    resumed = _trainer(cfg).train()
    assert resumed.status == "completed"
    got = _weights(resumed.final_dir)
    assert got.keys() == ref_weights.keys()
    for k in got:
        torch.testing.assert_close(got[k], ref_weights[k], rtol=0, atol=0, msg=k)
    # the metrics file of the resumed run equals the uninterrupted one (no duplicated steps)
    assert _train_losses(tmp_path / "b" / "run") == pytest.approx(_train_losses(tmp_path / "a" / "run"), abs=0)


def test_stop_request_saves_and_resumes_mid_stage_two(tmp_path, tiny_pair, tiny_data):
    stages = [Stage("s1", epochs=1, temperature=1.0, alpha=0.7), Stage("s2", epochs=2, temperature=2.0, alpha=1.0)]
    ref = _trainer(tiny_config(tmp_path / "a", tiny_pair, tiny_data), stages).train()

    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data)

    def stop_in_stage_two(trainer):
        if trainer.state.stage_index == 1 and trainer.state.stage_step == 3:
            trainer.request_stop()

    first = _trainer(cfg, stages, step_callbacks=[stop_in_stage_two]).train()
    assert first.status == "interrupted" and first.final_dir is None
    second = _trainer(cfg, stages).train()
    assert second.status == "completed"
    a, b = _weights(ref.final_dir), _weights(second.final_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    s = second.summary["stages"]
    assert [x["name"] for x in s] == ["s1", "s2"] and [x["steps"] for x in s] == [6, 12]
    assert [x["temperature"] for x in s] == [1.0, 2.0]


def test_gradient_accumulation_invariance(tmp_path, tiny_pair, tiny_data):
    """One window of 8 samples as 1 x 8, 4 x 2 or 8 x 1 micro-batches: the same accumulated
    gradient and loss (the normaliser is the window's token count, not each micro-batch's)."""
    results = []
    for micro, sort in ((8, False), (2, True), (1, False)):
        cfg = tiny_config(tmp_path / f"m{micro}", tiny_pair, tiny_data,
                          train={"micro_batch_size": micro, "sort_micro_batches": sort})
        trainer = _trainer(cfg)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
        captured = {}

        def capture():  # replaces optimizer.step: keep the accumulated gradients, change nothing
            captured.update({n: p.grad.clone() for n, p in trainer.student.named_parameters()})

        trainer.optimizer.step = capture
        stats = trainer._train_step(trainer.stages[0], trainer.window(0, 0))
        results.append((stats["loss"], captured))
    (loss_a, grads_a), *others = results
    for loss_b, grads_b in others:
        assert loss_b == pytest.approx(loss_a, rel=1e-6)
        for k in grads_a:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-8, msg=k)


def test_learning_rate_restarts_each_stage(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, optim={"lr": 1e-2, "min_lr": 1e-4})
    stages = [Stage("s1", max_steps=3, alpha=0.5), Stage("s2", max_steps=3, alpha=1.0, temperature=2.0)]
    _trainer(cfg, stages).train()
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(1e-2) and lrs[3] == pytest.approx(1e-2)  # fresh schedule in stage 2
    assert lrs[2] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4)  # cosine reaches min_lr
    assert [r["temperature"] for r in recs] == [1.0] * 3 + [2.0] * 3


def test_stage_subset_and_unknown_ids(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    inputs = prepare_run(cfg)
    ids = inputs.train_data.ids[:10]
    trainer = _trainer(cfg, [Stage("easy", sample_ids=tuple(ids), epochs=1)], inputs=inputs)
    seen = set()
    for step in range(2):
        seen.update(inputs.train_data[i].id for i in trainer.window(0, step))
    assert seen == set(ids)  # 10 samples, batch 8: two windows cover the subset exactly once
    with pytest.raises(Exception, match="not in the training data"):
        _trainer(cfg, [Stage("bad", sample_ids=("nope",), epochs=1)], inputs=inputs)


def test_windows_reshuffle_every_epoch_and_are_deterministic(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    inputs = prepare_run(cfg)
    t = _trainer(cfg, inputs=inputs)
    epoch0 = [t.window(0, s) for s in range(6)]
    epoch1 = [t.window(0, s) for s in range(6, 12)]
    assert sorted(sum(epoch0, [])) == list(range(48)) == sorted(sum(epoch1, []))
    assert epoch0 != epoch1
    assert epoch0 == [_trainer(cfg, inputs=inputs).window(0, s) for s in range(6)]


def test_nonfinite_steps_are_skipped_then_run_stops(tmp_path, tiny_pair, tiny_data):
    # The live teacher (no cache): the test poisons the teacher's weights in the middle of the run.
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_nonfinite_steps": 2, "save_every": 1},
                      loss={"teacher_cache": "off"})
    inputs = prepare_run(cfg)
    trainer = _trainer(cfg, inputs=inputs)
    before = {k: v.clone() for k, v in inputs.student.state_dict().items()}

    def poison(t):  # from step 2 on the teacher produces NaN logits
        if t.state.global_step == 1:
            with torch.no_grad():
                t.teacher.get_output_embeddings().weight.fill_(float("nan"))

    trainer.step_callbacks.append(poison)
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.skipped_steps == 2
    after = inputs.student.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 1 was a real update
    assert not (tmp_path / "run" / "final").exists()
    # every checkpoint written holds finite weights only
    from pocl.training import checkpoint as ckpt

    for _, folder in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in _weights(folder).values())


def test_resume_refuses_changed_config(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_steps": 2, "save_every": 1})
    distill(cfg)
    changed = cfg.replace(loss={"divergence": "rkl"})
    with pytest.raises(CheckpointError, match=r"loss.divergence: 'fkl' -> 'rkl'"):
        distill(changed)
    # an explicit override resumes anyway (and then has nothing left to do)
    ok = distill(changed.replace(train={"allow_config_change": True}))
    assert ok.status == "completed"


def test_outputs_are_hf_folders_and_metrics(tmp_path, tiny_pair, tiny_data):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"tensorboard": True, "eval_every": 3,
                                                             "dev_rouge_max_new_tokens": 4})
    result = distill(cfg)
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert model.config.hidden_size == 16
    assert (run / "best" / "manifest.json").exists() and (run / "summary.json").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    recs = read_metrics(run / "metrics.jsonl")
    dev = [r for r in recs if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [3, 6]
    for r in dev:
        assert math.isfinite(r["dev_ce"]) and r["dev_kd"] >= 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_steps"] == 6
    # by default best/ is chosen by dev ROUGE-L (spec section 3), a real value, higher is better
    assert summary["selection_metric"] == "dev_rouge_l" and summary["selection_direction"] == "higher is better"
    best = max(dev, key=lambda r: (r["dev_rouge_l"], -r["step"]))
    assert summary["best_metric"] == best["dev_rouge_l"] >= 0 and summary["best_step"] == best["step"]


def test_dev_rouge_l_selects_the_best_model(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={
        "eval_every": 2, "dev_rouge_samples": 4, "dev_rouge_max_new_tokens": 4, "selection_metric": "dev_rouge_l"})
    result = distill(cfg)
    dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [2, 4, 6]
    assert all(0.0 <= r["dev_rouge_l"] <= 100.0 for r in dev)
    best = max(dev, key=lambda r: (r["dev_rouge_l"], -r["step"]))  # the first of equal scores is kept
    assert result.summary["selection_metric"] == "dev_rouge_l"
    assert result.summary["best_metric"] == best["dev_rouge_l"] and result.summary["best_step"] == best["step"]
    manifest = json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())
    assert manifest["step"] == best["step"] and manifest["dev_rouge_l"] == best["dev_rouge_l"]


def test_dev_rouge_l_by_default_on_every_dev_sample(tmp_path, tiny_pair, tiny_data, monkeypatch):
    """No flag: dev ROUGE-L is computed on all 16 dev samples (0 = all); summary.json says how many, and
    the saved config keeps 0 (a run resumed by a trainer built directly has the same config)."""
    import yaml

    import pocl.evaluation.runner as runner

    seen = []
    real = runner.evaluate_records

    def counting(model, tokenizer, records, **kw):
        seen.append(len(records))
        return real(model, tokenizer, records, **kw)

    monkeypatch.setattr(runner, "evaluate_records", counting)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"eval_every": 3, "dev_rouge_max_new_tokens": 4})
    assert cfg.train.dev_rouge_samples == 0 and cfg.train.selection_metric == "dev_rouge_l"
    result = distill(cfg)
    assert seen == [16, 16]  # two evaluations, every dev sample
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["dev_rouge_samples"] == 0 and saved["train"]["selection_metric"] == "dev_rouge_l"
    assert result.summary["dev_rouge_samples"] == 16
    assert result.best_dir is not None
    manifest = json.loads((result.best_dir / "manifest.json").read_text())
    assert manifest["selection_metric"] == "dev_rouge_l" and manifest["step"] == result.summary["best_step"]
    assert "by dev_rouge_l, higher is better" in (tmp_path / "run" / "summary.md").read_text()


def test_dev_ce_is_still_choosable_and_generates_nothing(tmp_path, tiny_pair, tiny_data, monkeypatch):
    import pocl.evaluation.runner as runner

    def forbidden(*a, **k):
        raise AssertionError("dev answers were generated")

    monkeypatch.setattr(runner, "evaluate_records", forbidden)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"eval_every": 2, "selection_metric": "dev_ce"})
    result = distill(cfg)
    dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [2, 4, 6] and not any("dev_rouge_l" in r for r in dev)
    best = min(dev, key=lambda r: (r["dev_ce"], r["step"]))
    assert result.summary["selection_metric"] == "dev_ce" and result.summary["selection_direction"] == "lower is better"
    assert result.summary["best_metric"] == best["dev_ce"] and result.summary["best_step"] == best["step"]


def test_no_dev_set_writes_no_best_model(tmp_path, tiny_pair, tiny_data, capsys):
    from pocl.cli import main

    teacher, student = tiny_pair
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(teacher), "--student", str(student), "--train-file", str(tiny_data[0]),
                 "--max-length", "48", "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4",
                 "--max-steps", "2", "--output-dir", str(out), "--no-progress", "--no-tensorboard"])
    printed = capsys.readouterr().out
    assert code == 0 and (out / "final").is_dir() and not (out / "best").exists()
    assert "best model: no dev set" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_metric"] is None and summary["best_step"] is None and "no dev set" in summary["best_note"]
    assert "best model: no dev set" in (out / "summary.md").read_text()


def test_best_rouge_is_kept_across_a_resume_and_old_negated_checkpoints_are_converted(tmp_path, tiny_pair,
                                                                                      tiny_data, monkeypatch):
    """Stop mid-run, resume: best/ and summary.json as uninterrupted. A checkpoint of an older pocl (dev
    ROUGE-L stored negated, no selection_metric) resumes with the real value."""
    from types import SimpleNamespace

    import pocl.evaluation.runner as runner
    from pocl.training import checkpoint as ckpt

    def weight_rouge(model, tokenizer, records, **kw):
        # The tiny random student scores ROUGE-L 0 everywhere; a deterministic function of its weights
        # (reproduced exactly by a resume) gives values that differ from step to step.
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
        return SimpleNamespace(rouge_l=abs(total * 1e4) % 100.0)

    monkeypatch.setattr(runner, "evaluate_records", weight_rouge)

    def run(out, **kw):
        cfg = tiny_config(out, tiny_pair, tiny_data, train={
            "epochs": 2, "eval_every": 2, "save_every": 2, "dev_rouge_samples": 8, "dev_rouge_max_new_tokens": 4})
        inputs = prepare_run(cfg)
        return _trainer(cfg, inputs=inputs, dev_records=inputs.dev_records, **kw).train()

    ref = run(tmp_path / "a")
    dev = [r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl") if r["split"] == "dev"]
    best = max(dev, key=lambda r: (r["dev_rouge_l"], -r["step"]))
    assert (ref.summary["best_metric"], ref.summary["best_step"]) == (best["dev_rouge_l"], best["step"])
    assert best["dev_rouge_l"] > 0 and len({r["dev_rouge_l"] for r in dev}) == len(dev)

    for name, legacy in (("b", False), ("c", True)):
        def stop(trainer):
            if trainer.state.global_step == 6:
                trainer.request_stop()

        assert run(tmp_path / name, step_callbacks=[stop]).status == "interrupted"
        if legacy:  # rewrite the newest checkpoint as an older version wrote it
            folder = ckpt.latest_valid_checkpoint(tmp_path / name / "run" / "checkpoints")
            path = folder / "trainer_state.json"
            saved = json.loads(path.read_text())
            state = saved["state"]
            assert state.pop("selection_metric") == "dev_rouge_l" and state["best_metric"] > 0
            for key in ("best_metric", "stage_best_metric"):
                state[key] = None if state[key] is None else -state[key]
            path.write_text(json.dumps(saved))
            extra = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items()
                     if k not in ("format", "files")}
            ckpt.write_manifest(folder, extra)
        resumed = run(tmp_path / name)
        assert resumed.status == "completed"
        assert (resumed.summary["best_metric"], resumed.summary["best_step"]) == (best["dev_rouge_l"], best["step"])
        assert resumed.summary["stages"][0]["best_in_stage"] == best["dev_rouge_l"]
        a, b = _weights(ref.best_dir), _weights(resumed.best_dir)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_plateau_follows_the_direction_of_rouge(tmp_path, tiny_pair, tiny_data):
    """Dev ROUGE-L (higher is better) decides best/ and the plateau: a falling ROUGE-L is no improvement."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"eval_every": 1})
    stages = [Stage("s1", epochs=3, plateau_patience=2), Stage("s2", max_steps=2, temperature=2.0)]
    trainer = _trainer(cfg, stages)
    curve = iter([10.0, 20.0, 15.0, 19.0, 5.0, 5.0])  # best at eval 2; evals 3 and 4 are lower

    def scripted(stage):
        value = next(curve)
        return {"dev_loss": 1.0, "dev_ce": 1.0 / value, "dev_kd": 0.0, "dev_tokens": 1, "dev_rouge_l": value}

    trainer.evaluate = scripted
    result = trainer.train()
    s1, s2 = result.summary["stages"]
    assert s1["steps"] == 4 and s1["advanced_early"] and s1["best_in_stage"] == 20.0
    assert s2["best_in_stage"] == 5.0
    assert result.summary["best_metric"] == 20.0 and result.summary["best_step"] == 2
    assert json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())["dev_rouge_l"] == 20.0


def test_plateau_advances_to_the_next_stage(tmp_path, tiny_pair, tiny_data):
    """A scripted dev curve: stage 1 improves once, then stalls for `patience` evaluations."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"eval_every": 1, "selection_metric": "dev_ce"})
    stages = [Stage("s1", epochs=3, plateau_patience=2), Stage("s2", max_steps=2, temperature=2.0)]
    trainer = _trainer(cfg, stages)
    curve = iter([5.0, 4.0, 4.5, 4.2, 9.9, 9.9])  # best at eval 2; evals 3 and 4 do not improve

    def scripted(stage):
        value = next(curve)
        return {"dev_loss": value, "dev_ce": value, "dev_kd": 0.0, "dev_tokens": 1}

    trainer.evaluate = scripted
    result = trainer.train()
    s1, s2 = result.summary["stages"]
    assert s1["steps"] == 4 and s1["planned_steps"] == 18 and s1["advanced_early"]
    assert s2["steps"] == 2 and not s2["advanced_early"]
    assert result.summary["best_metric"] == 4.0 and result.summary["best_step"] == 2


def test_trainer_without_dev_records_selects_by_dev_ce_and_says_so(tmp_path, tiny_pair, tiny_data):
    """DistillTrainer built directly with dev data but no dev records cannot compute dev ROUGE-L: best/ is
    chosen by dev CE, with the reason in summary.json and summary.md."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"eval_every": 3})
    result = _trainer(cfg).train()
    dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert result.summary["selection_metric"] == "dev_ce" and "dev_records" in result.summary["selection_note"]
    assert result.summary["best_metric"] == min(r["dev_ce"] for r in dev)
    assert "no dev ROUGE-L was computed" in (tmp_path / "run" / "summary.md").read_text()


def test_a_run_that_selected_by_dev_ce_is_not_resumed_silently_by_dev_rouge_l(tmp_path, tiny_pair, tiny_data):
    """A run started when dev CE was the default resumes with --selection-metric dev_ce; without it the
    resume is refused and says what changed."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_steps": 4, "save_every": 2, "eval_every": 2,
                                                             "selection_metric": "dev_ce"})

    def stop(trainer):
        if trainer.state.global_step == 2:
            trainer.request_stop()

    inputs = prepare_run(cfg)
    assert _trainer(cfg, inputs=inputs, step_callbacks=[stop]).train().status == "interrupted"
    new_default = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_steps": 4, "save_every": 2,
                                                                     "eval_every": 2})
    with pytest.raises(CheckpointError, match=r"train.selection_metric: 'dev_ce' -> 'dev_rouge_l'"):
        distill(new_default)
    resumed = distill(cfg)
    assert resumed.status == "completed" and resumed.summary["selection_metric"] == "dev_ce"
    dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [2, 4] and resumed.summary["best_metric"] == min(r["dev_ce"] for r in dev)
