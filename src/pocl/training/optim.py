"""AdamW with decay only on matrices, and warm-up + cosine/linear/constant learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from pocl.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on parameters with >= 2 dims, none on biases and norm weights.

    The dimension rule catches every bias and every LayerNorm/RMSNorm weight regardless of naming
    conventions (``ln_f``, ``norm``, ``layernorm``, ``RMSNorm.weight``...). A parameter that is
    tied (the same tensor reached under two names) is listed once.
    """
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """True when torch's fused AdamW kernel takes every parameter: floating point, on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (:func:`parameter_groups`), at ``lr`` or ``cfg.lr``.

    torch's fused AdamW kernel where it applies (:func:`fused_adamw_supported`): the same update, one pass
    over each parameter instead of a dozen elementwise ops, 8x faster on this CPU for a 128k-vocabulary
    student's embedding and head (benchmarks/results/optimizer_step.json); elsewhere the default one."""
    groups = parameter_groups(model, cfg.weight_decay)
    fused = fused_adamw_supported([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=fused or None)


def reset_optimizer(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Make ``optimizer`` equivalent to a freshly built one: empty moment estimates and step counts,
    learning rate back to ``lr``. (Reusing the object keeps wrappers such as accelerate's intact.)"""
    optimizer.state.clear()
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1; cosine then falls to ``min_ratio`` exactly at the
    last step; linear likewise; constant stays at 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    lr: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of a stage of ``total_steps`` (:func:`lr_lambda`) peaking at ``lr`` or
    ``cfg.lr``; the warm-up is ``warmup_steps`` or ``warmup_ratio`` of the stage, shorter than it."""
    peak = lr or cfg.lr
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    warmup = min(warmup, max(0, total_steps - 1))
    min_ratio = min(1.0, cfg.min_lr / peak)

    def fn(step: int) -> float:
        """The multiplier of the peak learning rate at ``step``."""
        return lr_lambda(step, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.lr_schedule,
                         min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
