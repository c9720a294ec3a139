"""What every KD loss path shares before the per-token math: the argument checks, the resolved
options (:class:`LossOptions`), the result type (:class:`KDLossOutput`), the T² rule
(:func:`temperature_scale`) and how raw logits become the float logits the loss sees
(:func:`as_float`, :func:`linear_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from pocl.errors import ConfigError
from pocl.losses.divergences import Divergence, make_divergence

__all__ = [
    "TEMPERATURE_SCALINGS",
    "KDLossOutput",
    "LogitFn",
    "LossOptions",
    "as_float",
    "check_number",
    "check_targets",
    "linear_logits",
    "make_options",
    "resolve_vocab",
    "temperature_scale",
]


LogitFn = Callable[[Tensor], Tensor]

#: Accepted values of ``temperature_scaling``.
TEMPERATURE_SCALINGS: tuple[str, ...] = ("t2", "none")

@dataclass
class KDLossOutput:
    """Result of a KD loss call.

    Attributes:
        loss: scalar; ``[(1−α)·ce_sum + α·s(T)·divergence_sum] / normalizer``; differentiable
            w.r.t. the student inputs when they require grad.
        ce_sum: detached scalar, Σ over the tokens of the student's CE at T = 1.
        divergence_sum: detached scalar, Σ over the tokens of the true divergence at
            temperature T, *not* multiplied by T² (0 when α = 0).
        num_tokens: number of tokens N in this call.
    """

    loss: Tensor
    ce_sum: Tensor
    divergence_sum: Tensor
    num_tokens: int


def temperature_scale(temperature: float, temperature_scaling: str = "t2") -> float:
    """s(T): ``T**2`` for ``"t2"``, 1 for ``"none"`` (one rule for every divergence)."""
    if temperature_scaling == "t2":
        return float(temperature) ** 2
    if temperature_scaling == "none":
        return 1.0
    raise ConfigError(
        f"temperature_scaling must be one of {', '.join(TEMPERATURE_SCALINGS)}; "
        f"got {temperature_scaling!r}")


@dataclass(frozen=True)
class LossOptions:
    divergence: Divergence | None   # None iff not use_teacher
    temperature: float
    alpha: float
    normalizer: float
    scale: float                    # s(T)
    vocab_size: int                 # shared vocabulary: columns [0, vocab_size)
    chunk_size: int
    student_logit_fn: LogitFn | None
    teacher_logit_fn: LogitFn | None

    @property
    def use_teacher(self) -> bool:
        return self.alpha > 0.0


def check_number(name: str, value: object) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"{name} must be a number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def make_options(*, divergence: Divergence | str | None, temperature: float, alpha: float,
                  normalizer: float, vocab_size: int, chunk_size: int,
                  temperature_scaling: str, student_logit_fn: LogitFn | None,
                  teacher_logit_fn: LogitFn | None) -> LossOptions:
    temperature = check_number("temperature", temperature)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}")
    alpha = check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1]; got {alpha}")
    normalizer = check_number("normalizer", normalizer)
    if normalizer <= 0:
        raise ConfigError(
            f"normalizer must be > 0 (the number of response tokens in the accumulation "
            f"window); got {normalizer}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int; got {chunk_size!r}")
    scale = temperature_scale(temperature, temperature_scaling)
    if isinstance(divergence, str):
        divergence = make_divergence(divergence)
    if alpha > 0.0:
        if divergence is None:
            raise ConfigError("a divergence is required when alpha > 0")
        if not isinstance(divergence, Divergence):
            raise ConfigError(
                f"divergence must be a pocl.losses.Divergence (see make_divergence); "
                f"got {type(divergence).__name__}")
    else:
        divergence = None  # pure CE: the teacher is never evaluated
    return LossOptions(divergence, temperature, alpha, normalizer, scale, vocab_size, chunk_size,
                    student_logit_fn, teacher_logit_fn)


def as_float(logits: Tensor, logit_fn: LogitFn | None) -> Tensor:
    """Upcast to at least float32 (float64 stays float64), then apply the logit transform.

    Upcasting first keeps elementwise transforms such as tanh soft-capping accurate.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if logit_fn is None else logit_fn(logits)


def linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                   logit_fn: LogitFn | None) -> Tensor:
    """``[n, H] @ [V, H].T (+ [V])`` in the inputs' dtype, then upcast and transform."""
    return as_float(F.linear(hidden, weight, bias), logit_fn)


def resolve_vocab(vocab_size: int | None, student_rows: int, teacher_rows: int | None) -> int:
    """The shared vocabulary size: columns ``[0, vocab_size)`` of both models are compared."""
    if vocab_size is None:
        if teacher_rows is not None and teacher_rows != student_rows:
            raise ValueError(
                f"student vocabulary ({student_rows}) and teacher vocabulary ({teacher_rows}) "
                "differ; pass vocab_size= (the shared tokenizer vocabulary) to compare the "
                "first vocab_size logits of each")
        return student_rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
    limit = student_rows if teacher_rows is None else min(student_rows, teacher_rows)
    if vocab_size > limit:
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the student ({student_rows}) or teacher "
            f"({teacher_rows}) vocabulary")
    return vocab_size


def check_targets(targets: Tensor, n: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [{n}]; got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
