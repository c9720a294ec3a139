"""On-policy distillation (GKD): generated samples, the per-step decision, the replay buffer, resume,
and POCL + GKD end to end on the tiny pair."""

from __future__ import annotations

import json

import pytest
import torch

import pocl.training.onpolicy as onpolicy
from pocl.data import IGNORE_INDEX, TokenizedSample, collate
from pocl.errors import ConfigError
from pocl.generation import Generation
from pocl.losses import count_target_tokens, select_response_tokens
from pocl.pipeline import distill, prepare_run
from pocl.training.stages import Stage
from pocl.training.trainer import DistillTrainer
from tests.conftest import tiny_config
from tests.training.test_trainer import crash_at

EOS = 2


def _sample(prompt, response=(21, 22), sid="s"):
    prompt, response = list(prompt), list(response) + [EOS]
    return TokenizedSample(sid, prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt))


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _trainer(cfg, stages=None, inputs=None, **kw):
    from pocl.pipeline import kd_stages

    inputs = inputs or prepare_run(cfg)
    return DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                          train_data=inputs.train_data, dev_data=inputs.dev_data, stages=stages or kd_stages(cfg),
                          vocab_size=inputs.vocab_size, fused=inputs.fused, fingerprints=inputs.fingerprints, **kw)


# ------------------------------------------------------------------------------------------ samples
def _check_next_token_targets(sample: TokenizedSample, response: list[int]):
    """The KD mask covers exactly the response tokens, and position i's target is token i + 1."""
    batch = collate([sample], pad_token_id=0)
    positions = torch.arange(batch["input_ids"].shape[1]).view(1, -1, 1).float()  # "hidden" = position
    selected, targets = select_response_tokens(positions, batch["labels"])
    selected = selected.view(-1).long().tolist()
    p = sample.prompt_length
    # the last prompt token predicts the first response token, ..., the one before the last predicts it
    assert selected == list(range(p - 1, p - 1 + len(response)))
    assert targets.tolist() == response
    assert targets.tolist() == [sample.input_ids[i + 1] for i in selected]  # the causal shift
    assert count_target_tokens(batch["labels"]) == len(response)


def test_generated_sample_is_laid_out_like_teacher_forced_data():
    base = _sample([5, 6, 7], sid="x")
    stopped = onpolicy.generated_sample(base, Generation([11, 12, 13], "", True), eos_token_id=EOS, max_length=20)
    assert stopped.input_ids == [5, 6, 7, 11, 12, 13, EOS]
    assert stopped.labels == [IGNORE_INDEX] * 3 + [11, 12, 13, EOS]  # aligned with input_ids, EOS a target
    assert stopped.id == "x" and stopped.prompt_length == 3 and not stopped.response_truncated
    _check_next_token_targets(stopped, [11, 12, 13, EOS])
    # the student hit max_new_tokens: no EOS
    limit = onpolicy.generated_sample(base, Generation([11, 12], "", False), eos_token_id=EOS, max_length=20)
    assert limit.input_ids == [5, 6, 7, 11, 12] and limit.response_truncated
    _check_next_token_targets(limit, [11, 12])
    # cut to max_length: no EOS either (the response did not end there)
    cut = onpolicy.generated_sample(base, Generation([11, 12, 13], "", True), eos_token_id=EOS, max_length=5)
    assert cut.input_ids == [5, 6, 7, 11, 12] and cut.labels[3:] == [11, 12]
    # an immediate EOS: one target
    empty = onpolicy.generated_sample(base, Generation([], "", True), eos_token_id=EOS, max_length=20)
    _check_next_token_targets(empty, [EOS])


def test_scripted_generation_is_trained_with_next_token_targets(tmp_path, tiny_pair, tiny_data, monkeypatch):
    """An on-policy step on a scripted student: the KD mask and the normaliser cover exactly the
    generated tokens (+ EOS when it stopped), each position's target is the next token, and the
    teacher scores those very positions. The authors' code is off by one here."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"on_policy_fraction": 1.0, "alpha": 1.0},
                      train={"max_steps": 1}, data={"dev_file": None})
    prompts_seen, scripted = [], {}

    def fake_generate(model, tokenizer, prompts, decoding, *, batch_size, seed, **kw):
        out = []
        for prompt in prompts:
            k = len(prompts_seen)
            tokens = [10 + k % 7, 20 + k % 5, 30 + k % 3][: 1 + k % 3]
            prompts_seen.append(list(prompt))
            scripted[tuple(prompt)] = (tokens, k % 2 == 0)
            out.append(Generation(tokens, "", k % 2 == 0))
        assert decoding.do_sample and decoding.temperature == 1.0 and decoding.top_p == 1.0
        assert decoding.no_repeat_ngram_size == 0 and decoding.top_k == 0
        return out

    monkeypatch.setattr(onpolicy, "generate", fake_generate)
    import pocl.training.student_loss as trainer_mod

    captured = []
    real = trainer_mod.fused_kd_loss

    def spy(hidden, w, b, t_hidden, tw, tb, targets, **kw):
        captured.append({"targets": targets.tolist(), "n_teacher": t_hidden.shape[0], "alpha": kw["alpha"],
                         "normalizer": kw["normalizer"]})
        return real(hidden, w, b, t_hidden, tw, tb, targets, **kw)

    monkeypatch.setattr(trainer_mod, "fused_kd_loss", spy)
    trainer = _trainer(cfg)
    batches = []
    real_micro = trainer._micro_loss

    def micro(batch, stage, normalizer, **kw):
        batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return real_micro(batch, stage, normalizer, **kw)

    trainer._micro_loss = micro
    window = trainer.window(0, 0)
    result = trainer.train()
    assert result.summary["on_policy_steps"] == 1
    # the prompts are those of the window's samples
    window_prompts = sorted(tuple(trainer.train_data[i].input_ids[:trainer.train_data[i].prompt_length])
                            for i in window)
    assert sorted(map(tuple, prompts_seen)) == window_prompts
    expected_total = 0
    all_targets = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            length = int(batch["attention_mask"][row].sum())
            p = int((labels[:length] == IGNORE_INDEX).sum())  # the prompt is the masked prefix
            tokens, stopped = scripted[tuple(ids[:p].tolist())]
            response = tokens + ([trainer.tokenizer.eos_token_id] if stopped else [])
            assert ids[p:length].tolist() == response and labels[p:length].tolist() == response
            sample = TokenizedSample("r", ids[:length].tolist(), labels[:length].tolist(), p)
            _check_next_token_targets(sample, response)
            expected_total += len(response)
            all_targets.extend(response)
    assert [t for c in captured for t in c["targets"]] == all_targets  # what the loss saw, in order
    assert all(c["n_teacher"] == len(c["targets"]) for c in captured)  # the teacher scored those positions
    assert all(c["normalizer"] == expected_total and c["alpha"] == 1.0 for c in captured)


# ------------------------------------------------------------------------------------------ decisions
def test_step_decisions_are_pure_and_have_the_right_rate():
    a = [onpolicy.step_uniforms(10, 0, "kd", s) for s in range(2000)]
    assert a == [onpolicy.step_uniforms(10, 0, "kd", s) for s in range(2000)]
    assert a != [onpolicy.step_uniforms(11, 0, "kd", s) for s in range(2000)]
    assert a[:50] != [onpolicy.step_uniforms(10, 1, "kd", s) for s in range(50)]
    on = sum(u < 0.3 for u, _ in a) / len(a)
    assert 0.26 < on < 0.34
    assert all(0.0 <= u < 1.0 and 0.0 <= v < 1.0 for u, v in a)


def test_generation_leaves_the_global_rng_alone(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"on_policy_fraction": 1.0,
                                                            "on_policy_max_new_tokens": 4})
    trainer = _trainer(cfg)
    local = [trainer.train_data[i] for i in trainer.window(0, 0)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = trainer._on_policy_samples(local, "fresh", 0, 0)
    assert torch.equal(torch.get_rng_state(), before)
    again = trainer._on_policy_samples(local, "fresh", 0, 0)  # same step: same seed, same answers
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    other = trainer._on_policy_samples(local, "fresh", 0, 1)
    assert [s.input_ids for s in first] != [s.input_ids for s in other]


# ------------------------------------------------------------------------------------------ replay buffer
def test_replay_buffer_capacity_sampling_and_state():
    buf = onpolicy.ReplayBuffer(4)
    buf.push([_sample([1], sid=f"a{i}") for i in range(3)])
    buf.push([_sample([1], sid=f"b{i}") for i in range(3)])
    assert len(buf) == 4 and buf.fresh_steps == 2
    assert [s.id for s in buf.samples] == ["a2", "b0", "b1", "b2"]  # oldest dropped first
    draw = buf.draw(3, seed=7)
    assert len({s.id for s in draw}) == 3 and draw == buf.draw(3, seed=7)  # without replacement, seeded
    assert {s.id for s in buf.draw(4, seed=1)} == {"a2", "b0", "b1", "b2"}
    assert len(buf.draw(9, seed=1)) == 9  # more than it holds: with replacement
    state = json.loads(json.dumps(buf.state_dict()))
    restored = onpolicy.ReplayBuffer(4)
    restored.load_state_dict(state)
    assert restored.fresh_steps == 2 and list(restored.samples) == list(buf.samples)
    assert restored.draw(3, seed=7) == draw
    small = onpolicy.ReplayBuffer(2)
    small.load_state_dict(state)
    assert [s.id for s in small.samples] == ["b1", "b2"]
    with pytest.raises(ValueError):
        onpolicy.ReplayBuffer(4).draw(1, seed=0)


def test_resume_with_replay_buffer_equals_uninterrupted_run(tmp_path, tiny_pair, tiny_data):
    loss = {"on_policy_fraction": 0.6, "on_policy_max_new_tokens": 5, "replay_buffer_size": 12,
            "replay_reuse_prob": 0.5}
    train = {"epochs": 2, "save_every": 3}
    ref = distill(tiny_config(tmp_path / "a", tiny_pair, tiny_data, loss=loss, train=train))
    s = ref.summary
    assert s["on_policy_steps"] >= 3 and s["replayed_steps"] >= 1  # both kinds of steps happen (seeded)
    assert s["on_policy_steps"] - s["replayed_steps"] >= 1

    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, loss=loss, train=train)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(8)]).train()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-00000006"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert onpolicy.REPLAY_FILE in manifest["files"]
    saved = json.loads((ckpt / onpolicy.REPLAY_FILE).read_text())["per_process"][0]
    assert saved["capacity"] == 12 and saved["samples"]
    resumed = _trainer(cfg).train()
    a, b = _weights(ref.final_dir), _weights(resumed.final_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert resumed.summary["on_policy_steps"] == s["on_policy_steps"]
    assert resumed.summary["replayed_steps"] == s["replayed_steps"]


# ------------------------------------------------------------------------------------------ config
def test_on_policy_config_validation(tmp_path, tiny_pair, tiny_data):
    from pocl.config import DistillConfig

    with pytest.raises(ConfigError, match="on_policy_fraction"):
        DistillConfig.from_dict({"loss": {"on_policy_fraction": 1.5}})
    with pytest.raises(ConfigError, match="must be 0 with method sft"):
        DistillConfig.from_dict({"loss": {"method": "sft", "on_policy_fraction": 0.5}})
    with pytest.raises(ConfigError, match="stages\\[0\\].on_policy_fraction"):
        DistillConfig.from_dict({"curriculum": {"stages": [{"on_policy_fraction": 2}]}})
    with pytest.raises(ConfigError, match="on_policy_fraction must be in"):
        Stage("s", on_policy_fraction=-0.1)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    inputs = prepare_run(cfg)
    with pytest.raises(ConfigError, match="alpha 0 and loss.on_policy_ce off"):
        _trainer(cfg, [Stage("s", alpha=0.0, on_policy_fraction=0.5)], inputs=inputs)
    # a new field at its default leaves the training hash of existing runs unchanged
    assert cfg.replace(loss={"on_policy_fraction": 0.0}).training_hash() == cfg.training_hash()
    assert cfg.replace(loss={"on_policy_fraction": 0.5}).training_hash() != cfg.training_hash()


def test_per_stage_on_policy_fraction_in_the_schedule():
    from pocl.config import CurriculumConfig
    from pocl.curriculum import baby_step_stages, format_schedule

    ids = [str(i) for i in range(20)]
    plain = baby_step_stages(ids, CurriculumConfig(), base_skew=0.1)
    assert [s.on_policy_fraction for s in plain] == [None] * 4  # the loss config's value applies
    ramp = baby_step_stages(ids, CurriculumConfig(on_policy_fraction_start=0.0, on_policy_fraction_end=0.6,
                                                  stages=[{}, {"on_policy_fraction": 0.5}]), base_skew=0.1)
    assert [s.on_policy_fraction for s in ramp] == pytest.approx([0.0, 0.5, 0.4, 0.6])
    assert "on-pol" in format_schedule(ramp)


# ------------------------------------------------------------------------------------------ end to end
def test_pocl_with_gkd_two_stages_end_to_end(tmp_path, tiny_pair, tiny_data, monkeypatch):
    """POCL + GKD: on-policy steps inside the Baby Step stages, lambda_on per stage, prompts from the
    stage's subset only."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={
        "divergence": "jsd", "on_policy_max_new_tokens": 5, "replay_buffer_size": 16}, curriculum={
        "curriculum": "pocl", "num_stages": 2, "stage_epochs": 2, "rank_max_new_tokens": 4, "rank_batch_size": 16,
        "on_policy_fraction_start": 0.5, "on_policy_fraction_end": 1.0})
    prompts = []
    real_generate = onpolicy.generate

    def recording_generate(model, tokenizer, ps, decoding, **kw):
        prompts.append([tuple(p) for p in ps])
        return real_generate(model, tokenizer, ps, decoding, **kw)

    monkeypatch.setattr(onpolicy, "generate", recording_generate)
    result = distill(cfg)
    assert result.status == "completed"
    s1, s2 = result.summary["stages"]
    assert (s1["on_policy_fraction"], s2["on_policy_fraction"]) == (0.5, 1.0)
    assert (s1["num_samples"], s2["num_samples"]) == (24, 48) and (s1["steps"], s2["steps"]) == (6, 12)
    assert 1 <= s1["on_policy_steps"] < 6 and s2["on_policy_steps"] == 12
    assert result.summary["on_policy_steps"] == s1["on_policy_steps"] + s2["on_policy_steps"]
    fresh_stage1 = s1["on_policy_steps"] - s1["replayed_steps"]
    assert len(prompts) == result.summary["on_policy_steps"] - result.summary["replayed_steps"]
    # stage 1's prompts all come from stage 1's (easiest) subset
    ranking = [json.loads(line)["id"] for line in (tmp_path / "run" / "ranking.jsonl").read_text().splitlines()]
    inputs = prepare_run(cfg)
    easy = {tuple(s.input_ids[:s.prompt_length]) for s in inputs.train_data if s.id in set(ranking[:24])}
    assert fresh_stage1 >= 1 and all(p in easy for batch in prompts[:fresh_stage1] for p in batch)
    assert any(p not in easy for batch in prompts[fresh_stage1:] for p in batch)


@pytest.mark.slow
def test_two_processes_generate_their_shares_and_agree_on_the_decisions(tmp_path, tiny_pair, tiny_data):
    import subprocess
    import sys

    teacher, student = tiny_pair
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "pocl", "distill", "--teacher", str(teacher), "--student", str(student),
           "--train-file", str(tiny_data[0]), "--max-length", "48", "--max-prompt-length", "32",
           "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "1", "--alpha", "1", "--no-progress",
           "--no-tensorboard", "--on-policy-fraction", "0.5", "--on-policy-max-new-tokens", "4",
           "--replay-buffer-size", "16", "--output-dir", str(out), "--num-processes", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # the decisions are a pure function of (seed, stage, step): replay them here
    fresh = on = replayed = 0
    for step in range(6):
        u_on, u_replay = onpolicy.step_uniforms(10, 0, "kd", step)
        if u_on < 0.5:
            on += 1
            if fresh > 0 and u_replay < 0.5:
                replayed += 1
            else:
                fresh += 1
    assert (summary["on_policy_steps"], summary["replayed_steps"]) == (on, replayed) and on > 0
    state = json.loads((out / "checkpoints" / "step-00000006" / onpolicy.REPLAY_FILE).read_text())
    assert [p["fresh_steps"] for p in state["per_process"]] == [fresh, fresh]
    assert all(len(p["samples"]) == min(4 * fresh, 16) for p in state["per_process"])  # 4 prompts per process
