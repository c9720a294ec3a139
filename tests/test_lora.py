"""LoRA students (peft): adapters train, the fused loss sees a frozen plain head, checkpoints hold
the adapters only, and final folders are merged normal models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from pocl.models import (LMHead, apply_lora, check_fused_head, hidden_states, is_peft_model, load_training_weights,
                         save_model_folder, save_training_weights)
from tests.conftest import make_llama


def _lora_student(tok, seed=0):
    return apply_lora(make_llama(tok, hidden=16, layers=1, seed=seed), r=4, alpha=8)


def test_only_adapters_train_and_the_head_stays_plain(suite_tokenizer):
    model = _lora_student(suite_tokenizer)
    assert is_peft_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    head = LMHead.from_model(model, len(suite_tokenizer))
    assert not head.weight.requires_grad
    ok, _ = check_fused_head(model, head)
    assert ok


def test_fused_loss_trains_the_adapters(suite_tokenizer):
    from pocl.losses import fused_kd_loss, select_response_tokens

    torch.manual_seed(0)
    model = _lora_student(suite_tokenizer)
    for n, p in model.named_parameters():  # B starts at zero; make it non-zero so A gets a gradient too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(2, len(suite_tokenizer), (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    hidden, targets = select_response_tokens(hidden_states(model, ids, torch.ones_like(ids)), labels)
    head = LMHead.from_model(model, len(suite_tokenizer))
    out = fused_kd_loss(hidden, head.weight, head.bias, None, None, None, targets, divergence=None, temperature=1.0,
                        alpha=0.0, normalizer=float(targets.numel()), chunk_size=4)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert head.weight.grad is None


def test_checkpoint_holds_adapters_and_restores_them(tmp_path, suite_tokenizer):
    model = _lora_student(suite_tokenizer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    save_training_weights(model, suite_tokenizer, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "ckpt").glob("model*.safetensors"))  # no full copy of the frozen base
    fresh = _lora_student(suite_tokenizer)  # same base (seed 0), new random adapters
    load_training_weights(fresh, tmp_path / "ckpt")
    ids = torch.randint(2, len(suite_tokenizer), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_final_folder_is_a_merged_plain_model(tmp_path, suite_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _lora_student(suite_tokenizer)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    before = {n: p.clone() for n, p in model.named_parameters()}
    save_model_folder(model, suite_tokenizer, tmp_path / "final")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # not merged in place
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not is_peft_model(plain)
    ids = torch.randint(2, len(suite_tokenizer), (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()


def test_lora_distillation_resumes_exactly_and_writes_plain_final(tmp_path, tiny_pair, tiny_data):
    from transformers import AutoModelForCausalLM

    from pocl.pipeline import distill, prepare_run
    from pocl.pipeline import kd_stages
    from pocl.training.trainer import DistillTrainer
    from tests.conftest import tiny_config

    lora = {"lora_r": 4, "lora_alpha": 8.0}
    ref = distill(tiny_config(tmp_path / "a", tiny_pair, tiny_data, model=lora, train={"save_every": 2}))
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, model=lora, train={"save_every": 2})

    def crash(trainer):
        if trainer.state.global_step == 5:
            raise RuntimeError("simulated crash")

    inputs = prepare_run(cfg)
    trainer = DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                             train_data=inputs.train_data, dev_data=inputs.dev_data, stages=kd_stages(cfg),
                             vocab_size=inputs.vocab_size, fingerprints=inputs.fingerprints, step_callbacks=[crash])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step-00000004"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    resumed = distill(cfg)
    a = AutoModelForCausalLM.from_pretrained(ref.final_dir)
    b = AutoModelForCausalLM.from_pretrained(resumed.final_dir)  # plain models: adapters merged
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[1])
    assert any(not torch.equal(x, base.state_dict()[n]) for n, x in a.state_dict().items())  # it trained
