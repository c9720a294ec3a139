"""Divergences between the teacher's and the student's next-token distributions.

Every divergence is a small pure function of log-probabilities::

    fn(student_logp: Tensor[N, V], teacher_logp: Tensor[N, V], **params) -> Tensor[N]

``student_logp`` is ``log q`` and ``teacher_logp`` is ``log p`` at one temperature (the engine
in :mod:`pocl.losses.engine` applies the temperature and the T² rule; the functions here know
nothing about either). Each returns one value per row (token position), summed over the
vocabulary. p is always the teacher and q the student.

The functions are registered in :data:`DIVERGENCES` (a :class:`pocl.registry.Registry`, exact
names, typo suggestions) as :class:`DivergenceSpec` entries; :func:`make_divergence` binds
parameters and validates them. See ``docs/losses.md``.

Numerics
--------
* Vocabulary entries with ``-inf`` log-probability (masked entries, probability exactly 0)
  contribute exactly 0 and never produce NaN, in values or gradients.
* Every log-probability that enters a difference or a mixture is first clamped at
  :data:`LOG_PROB_FLOOR` (``-1e4``). This makes every operand finite, so that no
  ``0 * inf`` or ``inf - inf`` can appear anywhere in the forward or backward graph (a NaN in
  the unused branch of a ``torch.where`` would still poison the gradient; keeping all operands
  finite avoids that class of bug altogether). Probabilities are ``exp`` of the *unclamped*
  values, so a masked entry still has probability exactly 0 and contributes exactly 0.
* Consequence of the floor: where the teacher has mass but the student's log-probability is
  ``-inf`` (or below ``-1e4``), KL(p‖q) is truly infinite; here it is the large finite value
  ``p · (log p + 1e4)`` and that entry's log q gets no gradient through the clamp. Ordinary
  float32 logits never reach the floor (a log-probability of ``-1e4`` needs a logit gap of
  10 000), so nothing else changes.
* Mixtures ``log(w·a + (1-w)·b)`` are computed in log space with ``logaddexp`` (the
  two-term logsumexp of log-weights plus log-probabilities), never by adding probabilities and
  taking a log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from pocl.errors import ConfigError, suggest
from pocl.registry import Registry

__all__ = [
    "DIVERGENCES",
    "LOG_PROB_FLOOR",
    "Divergence",
    "DivergenceSpec",
    "adaptive_kl",
    "forward_kl",
    "generalized_jsd",
    "jensen_shannon",
    "kl",
    "log_mixture",
    "make_divergence",
    "register_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "taid_interpolated_kl",
    "total_variation",
]

#: Lower clamp of every log-probability used inside a divergence (see module docstring).
LOG_PROB_FLOOR: float = -1.0e4


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _floor(logp: Tensor) -> Tensor:
    """Clamp log-probabilities at :data:`LOG_PROB_FLOOR` so that every operand is finite."""
    return logp.clamp(min=LOG_PROB_FLOOR)


def kl(a_logp: Tensor, b_logp: Tensor) -> Tensor:
    """KL(a‖b) = Σ_v a_v (log a_v − log b_v) per row. Shapes [N, V] -> [N].

    On floored operands: ``exp`` of a log-probability at the floor is exactly 0 (it underflows
    in every float type), and the difference of finite logs is finite, so masked (``-inf``) entries
    give ``0 * finite = 0`` in the value and in every gradient; no ``torch.where`` is needed.
    """
    return _kl_floored(_floor(a_logp), _floor(b_logp))


def log_mixture(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) elementwise, in log space. Shapes [N, V] -> [N, V].

    Computed as ``logaddexp(log w + log a, log(1−w) + log b)`` on floored operands. A weight
    of exactly 1 returns ``a`` and of exactly 0 returns ``b`` (floored), so ``log 0`` is never
    formed.
    """
    return _log_mixture_floored(_floor(a_logp), _floor(b_logp), weight_a)


# The divergences floor each operand once and then use these two: flooring is idempotent, but a
# clamp and its backward are a full pass over a [chunk, V] tensor each, and repeating them (twice
# per operand in JSD and the skew KLs) cost about a fifth of the loss step
# (benchmarks/loss_profile.py).
def _kl_floored(a_logp: Tensor, b_logp: Tensor) -> Tensor:
    return (a_logp.exp() * (a_logp - b_logp)).sum(-1)


def _log_mixture_floored(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    # Finite: logaddexp of finite operands; no floor needed on the result.
    if weight_a >= 1.0:
        return a_logp
    if weight_a <= 0.0:
        return b_logp
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


# --------------------------------------------------------------------------------------------
# The divergences (p = teacher, q = student)
# --------------------------------------------------------------------------------------------

def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Forward KL(p‖q) = Σ p (log p − log q). [N, V] x [N, V] -> [N]."""
    return kl(teacher_logp, student_logp)


def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Reverse KL(q‖p) = Σ q (log q − log p). [N, V] x [N, V] -> [N]."""
    return kl(student_logp, teacher_logp)


def jensen_shannon(student_logp: Tensor, teacher_logp: Tensor, *, lam: float = 0.9) -> Tensor:
    """Generalised JSD: m = (1−λ)p + λq; λ·KL(q‖m) + (1−λ)·KL(p‖m). [N, V] x [N, V] -> [N].

    λ = 0.5 is the symmetric Jensen–Shannon divergence; λ ∈ {0, 1} gives exactly 0.
    """
    q, p = _floor(student_logp), _floor(teacher_logp)
    log_m = _log_mixture_floored(p, q, 1.0 - lam)
    return lam * _kl_floored(q, log_m) + (1.0 - lam) * _kl_floored(p, log_m)


def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation distance ½ Σ |p − q|. [N, V] x [N, V] -> [N]."""
    # exp(-inf) = 0 exactly; abs has gradient 0 at 0 in torch, so masked entries are safe.
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, *, skew: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ a·p + (1−a)·q). [N, V] x [N, V] -> [N].

    a = 0 is the forward KL; a = 1 gives exactly 0.
    """
    q, p = _floor(student_logp), _floor(teacher_logp)
    return _kl_floored(p, _log_mixture_floored(p, q, skew))


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, *, skew: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−a)·p + a·q). [N, V] x [N, V] -> [N].

    a = 0 is the reverse KL; a = 1 gives exactly 0.
    """
    q, p = _floor(student_logp), _floor(teacher_logp)
    return _kl_floored(q, _log_mixture_floored(q, p, skew))


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, *, beta: float = 0.5) -> Tensor:
    """Generalised JSD(β) in TRL's (GKD's) convention. [N, V] x [N, V] -> [N].

    m = β·p + (1−β)·q;  JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)  for 0 < β < 1, and, as TRL's
    ``generalized_jsd_loss`` does, exactly KL(p‖q) (forward KL) at β = 0 and exactly KL(q‖p)
    (reverse KL) at β = 1. Those end points are the limits of the *scaled* divergence
    JSD_β / (β(1−β)); the unscaled JSD_β itself tends to 0 at both ends (docs/losses.md has the
    derivation). For 0 < β < 1 this equals ``jsd`` with ``lam = 1 − β``.
    """
    if beta <= 0.0:
        return kl(teacher_logp, student_logp)
    if beta >= 1.0:
        return kl(student_logp, teacher_logp)
    q, p = _floor(student_logp), _floor(teacher_logp)
    log_m = _log_mixture_floored(p, q, beta)
    return beta * _kl_floored(p, log_m) + (1.0 - beta) * _kl_floored(q, log_m)


def adaptive_kl(student_logp: Tensor, teacher_logp: Tensor, *, mu: float = 0.5) -> Tensor:
    """Adaptive KL (AKL, Wu et al. 2024): FKL and RKL weighted per token by the head/tail gap.

    The vocabulary is sorted by the teacher's probability, descending (stable sort: ties keep
    vocabulary order). The **head** is the shortest prefix whose cumulative teacher probability
    reaches ``mu``: entry k is in the head when the probability of the entries ranked above it
    is < ``mu`` (so the entry that crosses ``mu`` belongs to the head); the rest is the **tail**.
    With gaps g_head = Σ_head |p − q| and g_tail = Σ_tail |p − q| (detached, no gradient)::

        AKL = g_head / (g_head + g_tail) · KL(p‖q)  +  g_tail / (g_head + g_tail) · KL(q‖p)

    When p = q exactly (g_head + g_tail = 0) both KLs are 0 and the weights are taken as ½, ½.
    [N, V] x [N, V] -> [N].
    """
    p = teacher_logp.exp()
    q = student_logp.exp()
    with torch.no_grad():
        p_sorted, order = torch.sort(p.detach(), dim=-1, descending=True, stable=True)
        mass_above = torch.cumsum(p_sorted, dim=-1) - p_sorted
        head_sorted = mass_above < mu
        head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
        gap = (p.detach() - q.detach()).abs()
        g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)
        g_tail = torch.where(head, torch.zeros_like(gap), gap).sum(-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny),
                             torch.full_like(total, 0.5))
    q_logp, p_logp = _floor(student_logp), _floor(teacher_logp)
    return w_head * _kl_floored(p_logp, q_logp) + (1.0 - w_head) * _kl_floored(q_logp, p_logp)


def taid_interpolated_kl(student_logp: Tensor, teacher_logp: Tensor, *, t: float = 0.4) -> Tensor:
    """TAID (Shing et al., ICLR 2025): forward KL from the time-interpolated target to the student.

    The target interpolates in logit space between the detached student and the teacher,
    ``p_t = softmax((1 - t) · stopgrad(log q) + t · log p)`` (log-probabilities differ from logits by a
    per-row constant, which softmax removes, so this is the official code's logit interpolation), and the
    value is ``KL(p_t‖q)``: 0 when q = p at any t, and the gradient reaches q only through ``log q``.
    ``t`` rises over training (:mod:`pocl.training.taid`). [N, V] x [N, V] -> [N].
    """
    q = _floor(student_logp)
    target = torch.log_softmax((1.0 - t) * q.detach() + t * _floor(teacher_logp), dim=-1)
    # Masked vocabulary entries (log p = -inf) stay impossible in the target.
    target = torch.where(torch.isneginf(teacher_logp), torch.full_like(target, float("-inf")), target)
    return kl(target, student_logp)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DivergenceSpec:
    """A registered divergence.

    Attributes:
        name: canonical registry key (lower case).
        fn: ``fn(student_logp [N, V], teacher_logp [N, V], **params) -> [N]``.
        defaults: every parameter the divergence accepts, with its default value.
        description: one line for users (CLI listings, docs).
        formula: the formula as text, with p = teacher and q = student.
        bounds: inclusive ``(low, high)`` range of each parameter that has one.
        aliases: other accepted names (exact, lower case).
    """

    name: str
    fn: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    formula: str = ""
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.bounds) - set(self.defaults)
        if unknown:
            raise ValueError(f"divergence '{self.name}': bounds for unknown parameters {unknown}")
        # Read-only views: a spec is shared by every Divergence made from it.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "bounds", MappingProxyType(dict(self.bounds)))


#: All divergences, by exact (lower-case) name or alias.
DIVERGENCES: Registry[DivergenceSpec] = Registry("divergence")


def register_divergence(spec: DivergenceSpec) -> DivergenceSpec:
    """Add ``spec`` to :data:`DIVERGENCES` under its name and aliases; returns it.

    Raises ValueError, registering nothing, when the name or an alias is already taken.
    """
    # Check every name first: Registry.register would keep the name if a later alias clashed.
    for key in (spec.name, *spec.aliases):
        if key in DIVERGENCES:
            raise ValueError(f"divergence name or alias '{key}' is already registered")
    return DIVERGENCES.register(spec.name, spec, aliases=spec.aliases)


class Divergence:
    """A divergence with bound parameters: ``div(student_logp, teacher_logp) -> Tensor[N]``.

    Make one with :func:`make_divergence`. Equal when name and parameters are equal.
    """

    __slots__ = ("spec", "params")

    def __init__(self, spec: DivergenceSpec, params: Mapping[str, float]):
        self.spec = spec
        self.params: dict[str, float] = dict(params)

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return self.spec.fn(student_logp, teacher_logp, **self.params)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in sorted(self.params.items()))
        return f"Divergence({self.name!r}{args})"

    def _key(self) -> tuple[Any, ...]:
        return (self.name, tuple(sorted(self.params.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Divergence):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def make_divergence(name: str, **params: float) -> Divergence:
    """The divergence registered as ``name`` (or an alias) with ``params`` bound.

    Raises:
        pocl.errors.UnknownNameError: ``name`` is not registered (suggests the nearest names).
        pocl.errors.ConfigError: an unknown parameter name, a non-numeric value, or a value
            outside the parameter's range (e.g. ``lam`` or ``skew`` outside [0, 1]).
    """
    spec = DIVERGENCES.get(name)
    bound: dict[str, float] = dict(spec.defaults)
    for key, value in params.items():
        if key not in spec.defaults:
            valid = ", ".join(sorted(spec.defaults)) or "none"
            raise ConfigError(
                f"divergence '{spec.name}' has no parameter '{key}'"
                f"{suggest(key, spec.defaults)}; valid parameters: {valid}")
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(
                f"divergence '{spec.name}': parameter '{key}' must be a finite number, "
                f"got {value!r}")
        value = float(value)
        if key in spec.bounds:
            low, high = spec.bounds[key]
            if not low <= value <= high:
                raise ConfigError(
                    f"divergence '{spec.name}': parameter '{key}' must be in [{low}, {high}], "
                    f"got {value}")
        bound[key] = value
    return Divergence(spec, bound)


for _spec in (
    DivergenceSpec(
        name="fkl", fn=forward_kl, aliases=("forward_kl", "kl"),
        description="forward KL (mode-covering); the classic KD objective",
        formula="KL(p||q) = sum_v p (log p - log q)"),
    DivergenceSpec(
        name="rkl", fn=reverse_kl, aliases=("reverse_kl",),
        description="reverse KL (mode-seeking)",
        formula="KL(q||p) = sum_v q (log q - log p)"),
    DivergenceSpec(
        name="jsd", fn=jensen_shannon, defaults={"lam": 0.9}, bounds={"lam": (0.0, 1.0)},
        description="generalised Jensen-Shannon divergence with mixture weight lam on q",
        formula="m = (1-lam) p + lam q;  lam KL(q||m) + (1-lam) KL(p||m)"),
    DivergenceSpec(
        name="tvd", fn=total_variation,
        description="total variation distance",
        formula="1/2 sum_v |p - q|"),
    DivergenceSpec(
        name="skl", fn=skew_forward_kl, aliases=("sfkl", "skew_kl"),
        defaults={"skew": 0.1}, bounds={"skew": (0.0, 1.0)},
        description="skew forward KL (DistiLLM)",
        formula="KL(p || skew p + (1-skew) q)"),
    DivergenceSpec(
        name="srkl", fn=skew_reverse_kl, aliases=("skew_reverse_kl",),
        defaults={"skew": 0.1}, bounds={"skew": (0.0, 1.0)},
        description="skew reverse KL (DistiLLM)",
        formula="KL(q || (1-skew) p + skew q)"),
    DivergenceSpec(
        name="gjsd", fn=generalized_jsd, aliases=("generalized_jsd",),
        defaults={"beta": 0.5}, bounds={"beta": (0.0, 1.0)},
        description="generalised JSD(beta) in TRL's convention (weight beta on p); beta=0: KL(p||q), "
                    "beta=1: KL(q||p)",
        formula="m = beta p + (1-beta) q;  beta KL(p||m) + (1-beta) KL(q||m)  (0 < beta < 1)"),
    DivergenceSpec(
        name="taid", fn=taid_interpolated_kl, aliases=("taid_kl",),
        defaults={"t": 0.4}, bounds={"t": (0.0, 1.0)},
        description="TAID's objective at interpolation time t (the trainer moves t; --method taid)",
        formula="p_t = softmax((1-t) stopgrad(log q) + t log p);  KL(p_t||q)"),
    DivergenceSpec(
        name="akl", fn=adaptive_kl, aliases=("adaptive_kl",),
        defaults={"mu": 0.5}, bounds={"mu": (0.0, 1.0)},
        description="adaptive KL (Wu et al. 2024): FKL and RKL weighted by the teacher head/tail gap",
        formula="w = g_head / (g_head + g_tail) (detached);  w KL(p||q) + (1-w) KL(q||p)"),
):
    register_divergence(_spec)
del _spec
