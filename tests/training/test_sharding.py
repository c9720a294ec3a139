"""``train.parallelism`` in one process: the choice, the decoder layers FSDP2 shards, and a
single-process fsdp2 run, whose checkpoints are sharded (DCP) and resume exactly. The multi-process
behaviour is in test_fsdp.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pocl.errors import ConfigError, ModelError
from pocl.training import checkpoint as ckpt
from pocl.training.sharding import (
    FullyShardedStudent,
    Replicated,
    decoder_layers,
    make_parallelism,
)
from tests.conftest import tiny_config
from tests.training.test_trainer import _train_losses, _trainer, _weights, crash_at


def _config(**train):
    return SimpleNamespace(train=SimpleNamespace(parallelism="ddp", **train), model=SimpleNamespace(lora_r=0))


def test_the_parallelism_is_chosen_by_name_and_lora_is_refused_with_fsdp2():
    acc = SimpleNamespace(num_processes=1)
    cfg = _config()
    assert isinstance(make_parallelism(cfg, acc), Replicated)
    cfg.train.parallelism = "fsdp2"
    assert isinstance(make_parallelism(cfg, acc), FullyShardedStudent)
    cfg.model.lora_r = 8
    with pytest.raises(ConfigError, match="fsdp2 with model.lora_r > 0.*--parallelism ddp"):
        make_parallelism(cfg, acc)


def test_an_unknown_parallelism_is_refused_with_a_suggestion():
    from pocl.config import DistillConfig

    with pytest.raises(ConfigError, match="parallelism.*must be one of ddp, fsdp2.*fsdp2"):
        DistillConfig.from_dict({"train": {"parallelism": "fsdp"}})


def test_decoder_layers_are_the_blocks_the_model_keeps_whole():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert decoder_layers(llama) == list(llama.model.layers)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    assert decoder_layers(gpt2) == list(gpt2.transformer.h)
    with pytest.raises(ModelError, match="_no_split_modules.*fsdp2"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_one_process_fsdp2_run_is_the_ddp_run_and_resumes_exactly_from_sharded_checkpoints(tmp_path, tiny_pair,
                                                                                             tiny_data):
    """One process has nothing to shard: the same weights as the default, bit for bit; its checkpoints are
    sharded all the same (DCP, with the AdamW state), and a crash + resume gives the uninterrupted model."""
    ref = _trainer(tiny_config(tmp_path / "a", tiny_pair, tiny_data, train={"epochs": 2, "save_every": 2})).train()
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data,
                      train={"epochs": 2, "save_every": 2, "parallelism": "fsdp2", "save_total_limit": 10})
    full = _trainer(cfg.replace(train={"output_dir": str(tmp_path / "c" / "run")})).train()
    for k, v in _weights(ref.final_dir).items():
        torch.testing.assert_close(_weights(full.final_dir)[k], v, rtol=0, atol=0, msg=k)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(7)]).train()
    folder = ckpt.latest_valid_checkpoint(tmp_path / "b" / "run" / "checkpoints")
    assert folder.name == "step-00000006"
    assert (folder / "sharded" / ".metadata").is_file() and not (folder / "model.safetensors").exists()
    assert json.loads((folder / "trainer_state.json").read_text())["sharded"]["optimizer"] is True
    resumed = _trainer(cfg).train()
    assert resumed.status == "completed"
    for k, v in _weights(ref.final_dir).items():
        torch.testing.assert_close(_weights(resumed.final_dir)[k], v, rtol=0, atol=0, msg=k)
    assert _train_losses(tmp_path / "b" / "run") == pytest.approx(_train_losses(tmp_path / "a" / "run"), abs=0)


def test_a_checkpoint_of_the_other_format_is_refused_with_the_flag_to_use(tmp_path, tiny_pair, tiny_data):
    from pocl.errors import CheckpointError

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"max_steps": 2, "save_every": 1})
    _trainer(cfg).train()
    # a completed run is not reloaded; remove final/ so the resume loads the checkpoint
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")
    sharded = cfg.replace(train={"parallelism": "fsdp2", "allow_config_change": True})
    with pytest.raises(CheckpointError, match="written with --parallelism ddp.*resume it with --parallelism ddp"):
        _trainer(sharded).train()


def test_replay_buffers_are_dealt_out_again_when_the_number_of_processes_changes():
    from pocl.training.run_store import _redistributed

    two = [{"samples": ["a0", "a1", "a2"], "fresh_steps": 3}, {"samples": ["b0", "b1"], "fresh_steps": 3}]
    assert _redistributed(two, 0, 1) == {"samples": ["a0", "a1", "a2", "b0", "b1"], "fresh_steps": 3}
    one = [{"samples": ["a0", "a1", "a2", "a3", "a4"], "fresh_steps": 2}]
    assert [_redistributed(one, r, 2)["samples"] for r in (0, 1)] == [["a0", "a2", "a4"], ["a1", "a3"]]


@pytest.mark.parametrize(("variable", "expected"), [
    ("ACCELERATE_USE_DEEPSPEED", r"DeepSpeed through accelerate is not supported .*needs CUDA GPUs: this machine "
                                 r"has none.*--parallelism fsdp2"),
    ("ACCELERATE_USE_FSDP", r"accelerate's FSDP config is not supported.*--parallelism fsdp2")])
def test_an_accelerate_launch_with_a_sharding_config_is_refused_before_accelerate_starts(variable, expected,
                                                                                        monkeypatch):
    """What `accelerate launch --config_file zero3.yaml -m pocl distill ...` sets in the environment: refused
    with pocl's own error (accelerate would otherwise fail on the missing deepspeed package, or wrap the
    student its own way)."""
    from pocl.config import DistillConfig
    from pocl.launch import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=expected):
        make_accelerator(DistillConfig.from_dict({}))
