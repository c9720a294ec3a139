"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pocl.config import OptimConfig
from pocl.training.optim import build_optimizer, build_scheduler, lr_lambda, parameter_groups, reset_optimizer


def test_no_decay_on_biases_and_norms_and_tied_weights_once(suite_tokenizer):
    from tests.conftest import make_llama

    model = make_llama(suite_tokenizer, hidden=16, layers=1, tie=True)
    groups = parameter_groups(model, 0.01)
    decay, no_decay = groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.ndim < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    all_params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in all_params}) == len(all_params) == len(list(model.parameters()))

    lin = nn.Linear(3, 4)
    d, nd = parameter_groups(lin, 0.1)
    assert d["params"] == [lin.weight] and nd["params"] == [lin.bias]


def test_cosine_schedule_endpoints_and_warmup():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2)
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1] == pytest.approx(2e-3 / 3)
    assert lrs[2] == pytest.approx(1e-3)  # peak right after warm-up
    assert lrs[-1] == pytest.approx(1e-5)  # min_lr exactly at the last step
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay
    mid = lr_lambda(6, total_steps=10, warmup_steps=2, schedule="cosine", min_ratio=0.01)
    progress = (6 - 2) / 7
    assert mid == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_linear_and_constant_schedules():
    assert lr_lambda(9, total_steps=10, warmup_steps=0, schedule="linear", min_ratio=0.0) == 0.0
    assert lr_lambda(5, total_steps=10, warmup_steps=0, schedule="constant", min_ratio=0.0) == 1.0
    assert lr_lambda(0, total_steps=1, warmup_steps=0, schedule="cosine", min_ratio=0.1) == 1.0


def test_reset_optimizer_equals_a_fresh_one():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    cfg = OptimConfig(lr=1e-2)
    opt = build_optimizer(model, cfg)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reset_optimizer(opt, 1e-2)
    fresh_model = nn.Linear(4, 3)
    fresh_model.load_state_dict(state)
    fresh = build_optimizer(fresh_model, cfg)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh_model, fresh)):
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(a, b)
