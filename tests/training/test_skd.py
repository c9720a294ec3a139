"""--method skd in the trainer: speculative samples on the on-policy path (pocl.training.onpolicy), the
counts in the state, metrics and summary, resume bit for bit, with and without the curriculum. The sampler
itself is tested against a naive one-sequence implementation in tests/training/test_speculative.py."""

from __future__ import annotations

import json

import pytest
import torch

from pocl.config import DistillConfig
from pocl.errors import ConfigError
from pocl.training.metrics import read_metrics
from pocl.training.onpolicy import generated_sample, step_uniforms
from pocl.training.speculative import speculative_generate
from pocl.training.stages import stream_seed
from tests.conftest import tiny_config
from tests.training.test_trainer import _trainer, _weights, crash_at

SKD = {"method": "skd", "divergence": "fkl", "alpha": 1.0, "on_policy_max_new_tokens": 8, "skd_top_k": 5,
       "skd_gamma": 3}


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_skd_settings_are_checked_and_other_methods_keep_their_hash(tmp_path):
    with pytest.raises(ConfigError, match="skd_fraction"):
        DistillConfig.from_dict({"loss": {"method": "skd", "skd_fraction": 1.5}})
    with pytest.raises(ConfigError, match="on_policy_fraction"):
        DistillConfig.from_dict({"loss": {"method": "skd", "on_policy_fraction": 0.5}})
    with pytest.raises(ConfigError, match="skd_gamma"):
        DistillConfig.from_dict({"loss": {"method": "skd", "skd_gamma": 0}})
    kd = DistillConfig.from_dict({"loss": {"method": "kd"}}).training_hash()
    assert DistillConfig.from_dict({"loss": {"method": "kd", "skd_top_k": 3}}).training_hash() == kd
    skd = DistillConfig.from_dict({"loss": {"method": "skd"}}).training_hash()
    assert DistillConfig.from_dict({"loss": {"method": "skd", "skd_top_k": 3}}).training_hash() != skd


def test_an_skd_step_trains_on_the_samplers_sequences(tmp_path, tiny_pair, tiny_data):
    """The samples of a speculative step are speculative_generate's answers to the window's prompts, with the
    step's own seed, laid out like every generated sample; the run counts what was drafted and kept."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss=SKD)
    trainer = _trainer(cfg)
    local = [trainer.train_data[i] for i in trainer.window(0, 0)]
    assert trainer.on_policy.kind(0, 0) == "fresh"
    got = trainer._on_policy_samples(local, "fresh", 0, 0)
    seed = stream_seed(cfg.train.seed, "fresh", 0, trainer.stages[0].name, 0, 0)
    gens, stats = speculative_generate(trainer.student, trainer.teacher, trainer.tokenizer,
                                       [list(s.input_ids[:s.prompt_length]) for s in local],
                                       trainer.on_policy.speculative_settings(), seed=seed % (1 << 31),
                                       batch_size=cfg.train.micro_batch_size)
    want = [generated_sample(s, g, eos_token_id=trainer.tokenizer.eos_token_id, max_length=cfg.data.max_length)
            for s, g in zip(local, gens)]
    assert [s.input_ids for s in got] == [s.input_ids for s in want]
    assert [s.labels for s in got] == [s.labels for s in want]
    assert trainer.state.skd == {"drafted": stats.drafted, "accepted": stats.accepted, "replaced": stats.replaced,
                                 "blocks": stats.blocks}
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # top-5 of 483 tokens: some kept, some not


def test_skd_fraction_decides_which_steps_are_speculative(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss=dict(SKD, skd_fraction=0.5), train={"epochs": 2})
    result = _trainer(cfg).train()
    recs = _train_records(tmp_path / "run")
    expected = [float(step_uniforms(cfg.train.seed, 0, "kd", i)[0] < 0.5) for i in range(len(recs))]
    assert [r.get("on_policy_steps", 0.0) for r in recs] == expected and 0 < sum(expected) < len(expected)
    assert result.summary["on_policy_steps"] == sum(expected)
    assert result.summary["skd"]["drafted"] > 0


def test_a_crashed_skd_run_resumes_bit_for_bit(tmp_path, tiny_pair, tiny_data):
    train = {"epochs": 2, "save_every": 2}
    ref = _trainer(tiny_config(tmp_path / "a", tiny_pair, tiny_data, loss=SKD, train=train)).train()
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, loss=SKD, train=train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(7)]).train()
    resumed = _trainer(cfg).train()
    for k, v in _weights(ref.final_dir).items():
        torch.testing.assert_close(_weights(resumed.final_dir)[k], v, rtol=0, atol=0, msg=k)
    assert resumed.summary["skd"] == ref.summary["skd"]
    assert [r["loss"] for r in _train_records(tmp_path / "b" / "run")] == \
        [r["loss"] for r in _train_records(tmp_path / "a" / "run")]


@pytest.mark.parametrize("curriculum", ["none", "pocl"])
def test_pocl_distill_method_skd_from_the_command_line(tmp_path, tiny_pair, tiny_data, curriculum):
    from pocl.cli import main

    teacher, student = tiny_pair
    out = tmp_path / "run"
    code = main(["distill", "--method", "skd", "--curriculum", curriculum, "--teacher", str(teacher),
                 "--student", str(student), "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]),
                 "--max-length", "48", "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4",
                 "--no-progress", "--no-tensorboard", "--log-every", "1", "--output-dir", str(out),
                 "--on-policy-max-new-tokens", "8", "--skd-top-k", "100", "--rank-max-new-tokens", "6",
                 "--dev-rouge-max-new-tokens", "4",
                 *(["--num-stages", "2", "--stage-epochs", "1"] if curriculum == "pocl" else ["--epochs", "1"])])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "skd"
    assert summary["on_policy_steps"] == summary["global_steps"] > 0
    assert summary["skd"]["drafted"] >= summary["skd"]["accepted"] > 0
    recs = _train_records(out)
    assert all(0 <= r["skd_acceptance"] <= 1 for r in recs)
    assert recs[-1]["skd_acceptance"] == summary["skd"]["accepted"] / summary["skd"]["drafted"]
    assert (out / "final" / "model.safetensors").is_file()
