"""The divergence kernels' math (pure tensor code): the value AND the analytical gradient w.r.t. the student's
logits. :mod:`pocl.losses.kernels` compiles and runs them.

The registry's functions in :mod:`pocl.losses.divergences` are the *definition* of every divergence;
the loss engine used to differentiate them with autograd on each ``[chunk, V]`` block, which
materialises many ``[n, V]`` temporaries (two log-softmaxes, exps, mixtures, the divergence) and then
autograd's backward through all of them. A kernel here computes, for one chunk,

    (student_logits [n, V], teacher_logits [n, V], temperature) -> (D [n], dD/d student_logits [n, V])

in one go with a closed-form gradient (no autograd graph), in float32 whatever the input dtype (float64
inputs stay float64). The tests (``tests/losses/test_kernels.py``) hold every kernel to the reference
function: value, and gradient against ``torch.autograd.grad`` of the reference.

Notation: z = logits / T, log q = log_softmax(z_student), log p = log_softmax(z_teacher); ``a`` and ``b``
are log q and log p clamped at :data:`~pocl.losses.divergences.LOG_PROB_FLOOR`, exactly as the
references clamp them. For any D(log q, log p), with g = ∂D/∂log q (elementwise),

    ∂D/∂z = g − q · Σ_v g,        ∂D/∂logits = (∂D/∂z) / T

(the log-softmax Jacobian). Per divergence (m is the mixture, L = log m in log space):

* fkl   D = Σ p (b − a);                   g = −p ⊙ [log q ≥ floor]      ->  ∂D/∂z = q Σ p' − p'
* rkl   D = Σ q (a − b);                   ∂D/∂z = q ⊙ (a − b − D)
* tvd   D = ½ Σ |p − q|;                   ∂D/∂z = ½ q ⊙ (s − Σ s q),  s = sign(q − p)
* jsd(λ) m = (1−λ) p + λ q, D = λ KL(q‖m) + (1−λ) KL(p‖m);
                                           g = λ q ⊙ (a − L)  ->  ∂D/∂z = λ q ⊙ (a − L − KL(q‖m))
  (the p-term's and the mixture's derivatives cancel: λ q (a − L) + λ q − r·m with r m = λ q).
  ``gjsd(β)`` is the same with λ = 1 − β (and fkl / rkl at β = 0 / 1, as its reference).
* skl(α) m = α p + (1−α) q, D = KL(p‖m);   g = −p ⊙ r,  r = (1−α) q / m   ->  ∂D/∂z = q Σ p r − p r
* srkl(α) m = (1−α) p + α q, D = KL(q‖m);  g = q ⊙ (a − L + 1 − r),  r = α q / m
                                           ->  ∂D/∂z = q ⊙ (a − L − D + Σ q r) − q r
  (using Σ q = 1).
* taid(t)  log P = log_softmax((1−t) a + t b) (a detached: the target is a constant of the gradient; −inf
           where log p is), D = KL(P‖q);   g = −P ⊙ [log q ≥ floor]   ->  ∂D/∂z = q Σ P' − P'  (as fkl)

Parameters at the ends of their range reduce as the references do (jsd λ ∈ {0, 1}, skl/srkl skew 1:
exactly 0; skew 0: fkl / rkl).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pocl.losses.divergences import (
    LOG_PROB_FLOOR,
    Divergence,
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    taid_interpolated_kl,
    total_variation,
)

__all__ = [
    "CORES",
    "INTO_BY_LABEL",
    "KERNELS",
    "TERMS",
    "TERMS_BY_LABEL",
    "RawKernel",
    "bind",
    "has_kernel",
    "terms_label",
]


# A raw kernel: (student_logits, teacher_logits, temperature [0-dim tensor], params tensor) -> (D, grad),
# all inputs already in the compute dtype. ``params`` is a 1-d tensor of constants (tensors, not Python
# floats, so that one compiled graph serves every temperature and parameter value).
RawKernel = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# The kernels (pure tensor code: eager as is, or compiled)
# --------------------------------------------------------------------------------------------
# A core: (log q [n, V], log p [n, V], params) -> (D [n], ∂D/∂z [n, V]), z = logits / T. The callers
# divide by T (the chain rule to the raw logits) and, in the terms kernels, scale by the loss weight.

def _fkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    p = b.exp()
    value = (p * (b - a)).sum(-1)
    # The clamp of log q passes no gradient below the floor (where q is exactly 0).
    pm = torch.where(lq >= LOG_PROB_FLOOR, p, torch.zeros_like(p))
    return value, lq.exp() * pm.sum(-1, keepdim=True) - pm


def _rkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    q = a.exp()
    diff = a - b
    value = (q * diff).sum(-1)
    return value, q * (diff - value.unsqueeze(-1))


def _tvd(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    p, q = lp.exp(), lq.exp()
    value = 0.5 * (p - q).abs().sum(-1)
    sign = torch.sign(q - p)
    return value, 0.5 * q * (sign - (sign * q).sum(-1, keepdim=True))


def _mixture_jsd(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log w_p, log w_q (mixture m = w_p p + w_q q), c_q, c_p (D = c_q KL(q‖m) + c_p KL(p‖m)),
    # with c_q = w_q and c_p = w_p (jsd: w_q = λ; gjsd: w_p = β).
    log_wp, log_wq, c_q, c_p = params[0], params[1], params[2], params[3]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(b + log_wp, a + log_wq)
    q = a.exp()
    a_m = a - log_m
    kl_q = (q * a_m).sum(-1)
    kl_p = (b.exp() * (b - log_m)).sum(-1)
    return c_q * kl_q + c_p * kl_p, c_q * q * (a_m - kl_q.unsqueeze(-1))


def _skew_fkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log α, log(1 − α); m = α p + (1 − α) q; D = KL(p‖m).
    log_wp, log_wq = params[0], params[1]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(b + log_wp, a + log_wq)
    p = b.exp()
    value = (p * (b - log_m)).sum(-1)
    pr = p * (a + log_wq - log_m).exp()          # p ⊙ r, r = (1 − α) q / m
    return value, lq.exp() * pr.sum(-1, keepdim=True) - pr


def _skew_rkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log α, log(1 − α); m = (1 − α) p + α q; D = KL(q‖m).
    log_wq, log_wp = params[0], params[1]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(a + log_wq, b + log_wp)
    q = a.exp()
    a_m = a - log_m
    value = (q * a_m).sum(-1)
    qr = q * (a + log_wq - log_m).exp()          # q ⊙ r, r = α q / m
    return value, q * (a_m - value.unsqueeze(-1) + qr.sum(-1, keepdim=True)) - qr


def _taid(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: t. The target P interpolates the (detached) student and the teacher in log space; D = KL(P‖q).
    t = params[0]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    target = torch.log_softmax((1.0 - t) * a + t * b, dim=-1)
    target = torch.where(torch.isneginf(lp), torch.full_like(target, float("-inf")), target)
    log_target = target.clamp(min=LOG_PROB_FLOOR)
    p_t = log_target.exp()
    value = (p_t * (log_target - a)).sum(-1)
    pm = torch.where(lq >= LOG_PROB_FLOOR, p_t, torch.zeros_like(p_t))
    return value, lq.exp() * pm.sum(-1, keepdim=True) - pm


Core = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

#: The divergence cores by kernel name.
CORES: dict[str, Core] = {
    "fkl": _fkl, "rkl": _rkl, "tvd": _tvd, "jsd": _mixture_jsd, "skl": _skew_fkl, "srkl": _skew_rkl,
    "taid": _taid,
}


def _named(fn: Callable, name: str) -> Callable:
    # One code object per kernel: torch.compile keeps its compiled graphs (and counts recompilations
    # against its limit) per code object, and every closure made by one factory would otherwise share one.
    fn.__code__ = fn.__code__.replace(co_name=name)
    fn.__name__ = fn.__qualname__ = name
    return fn


def _raw(core: Core, name: str) -> RawKernel:
    """The divergence alone: (s, t, T, params) -> (D, ∂D/∂s)."""
    def raw(s: Tensor, t: Tensor, temperature: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        value, grad_z = core(torch.log_softmax(s / temperature, dim=-1),
                             torch.log_softmax(t / temperature, dim=-1), params)
        return value, grad_z / temperature
    return _named(raw, f"kernel_{name}")


#: The raw kernels by name.
KERNELS: dict[str, RawKernel] = {name: _raw(core, name) for name, core in CORES.items()}


# A chunk's terms: (student_logits, teacher_logits, temperature, params, targets [n] int64, weights [2])
# -> (CE [n], D [n], weights[0] * dCE/dlogits + weights[1] * dD/dlogits [n, V]).
TermsKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _terms(name: str, unit_temperature: bool, ce_gradient: bool) -> TermsKernel:
    """The divergence ``name`` ("zero": none) plus the cross-entropy at T = 1 and the weighted sum of both
    gradients, so that one compiled graph reads the chunk's logits once for everything (the loss engine's
    whole per-chunk math).

    Two variants are chosen in Python, because inductor cannot see a tensor's value: at T = 1 the student's
    log-softmax serves the CE and the divergence (one softmax fewer), and with a CE weight of 0 (α = 1)
    the CE's gradient ``softmax − onehot`` is not computed at all (only its value, which is logged).
    Measured on JSD over [512, 128 000] float32, one thread, one call: 1.34 s for the general variant (T = 2
    with a CE weight), 0.90 s at T = 1 and α = 1 (benchmarks/results/loss_kernels.json, "terms_kernel").
    """
    core = CORES.get(name)

    def terms(s: Tensor, t: Tensor, temperature: Tensor, params: Tensor, targets: Tensor,
              weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_p1 = torch.log_softmax(s, dim=-1)
        index = targets.unsqueeze(-1)
        ce = -log_p1.gather(-1, index).squeeze(-1)
        if core is None:
            div, grad = s.new_zeros(s.shape[:-1]), None
        elif unit_temperature:
            div, grad_z = core(log_p1, torch.log_softmax(t, dim=-1), params)
            grad = weights[1] * grad_z
        else:
            div, grad_z = core(torch.log_softmax(s / temperature, dim=-1),
                               torch.log_softmax(t / temperature, dim=-1), params)
            grad = (weights[1] / temperature) * grad_z
        if ce_gradient:
            ce_grad = weights[0] * log_p1.exp()  # d CE / d logits = softmax - onehot
            grad = ce_grad if grad is None else grad + ce_grad
            grad = grad.scatter_add(-1, index, (-weights[0]).expand(index.shape).to(grad.dtype))
        elif grad is None:
            grad = torch.zeros_like(s)
        return ce, div, grad

    tag = f"{name}_{'t1' if unit_temperature else 'tn'}_{'ce' if ce_gradient else 'noce'}"
    return _named(terms, f"terms_{tag}")


#: The per-chunk terms kernels by (raw kernel name or "zero" for cross-entropy only, T == 1, CE weight != 0).
TERMS: dict[tuple[str, bool, bool], TermsKernel] = {
    (name, unit, ce): _terms(name, unit, ce)
    for name in (*CORES, "zero") for unit in (True, False) for ce in (True, False)
}


def bind(divergence: Divergence) -> tuple[str, tuple[float, ...]] | None:
    """(raw kernel name, its constants) for ``divergence``; ("zero", ()) when it is identically 0;
    None when the divergence has no kernel (it keeps the autograd path)."""
    fn, prm = divergence.spec.fn, divergence.params
    if fn is forward_kl:
        return "fkl", ()
    if fn is reverse_kl:
        return "rkl", ()
    if fn is total_variation:
        return "tvd", ()
    if fn is jensen_shannon:
        lam = prm["lam"]
        if lam <= 0.0 or lam >= 1.0:
            return "zero", ()
        w_p = 1.0 - lam   # the reference: log_mixture(p, q, weight_a = 1 − λ)
        return "jsd", (math.log(w_p), math.log1p(-w_p), lam, 1.0 - lam)
    if fn is generalized_jsd:
        beta = prm["beta"]
        if beta <= 0.0:
            return "fkl", ()
        if beta >= 1.0:
            return "rkl", ()
        return "jsd", (math.log(beta), math.log1p(-beta), 1.0 - beta, beta)
    if fn is skew_forward_kl:
        skew = prm["skew"]
        if skew >= 1.0:
            return "zero", ()
        if skew <= 0.0:
            return "fkl", ()
        return "skl", (math.log(skew), math.log1p(-skew))
    if fn is skew_reverse_kl:
        skew = prm["skew"]
        if skew >= 1.0:
            return "zero", ()
        if skew <= 0.0:
            return "rkl", ()
        return "srkl", (math.log(skew), math.log1p(-skew))
    if fn is taid_interpolated_kl:
        return "taid", (float(prm["t"]),)
    return None


def terms_label(key: tuple[str, bool, bool]) -> str:
    return f"terms:{key[0]}:{int(key[1])}:{int(key[2])}"


TERMS_BY_LABEL: dict[str, TermsKernel] = {terms_label(key): fn for key, fn in TERMS.items()}


def _into(terms: TermsKernel) -> Callable:
    """``terms`` writing its gradient into ``out`` (a row block of a preallocated ``[n, V]`` tensor): the
    compiled graph then stores the gradient in place, with no per-block result to concatenate."""
    def into(s: Tensor, t: Tensor, temperature: Tensor, params: Tensor, targets: Tensor, weights: Tensor,
             out: Tensor) -> tuple[Tensor, Tensor]:
        ce, div, grad = terms(s, t, temperature, params, targets, weights)
        out.copy_(grad)
        return ce, div
    return _named(into, f"{terms.__name__}_into")


INTO_BY_LABEL: dict[str, Callable] = {f"{label}:into": _into(fn) for label, fn in TERMS_BY_LABEL.items()}


def has_kernel(divergence: Divergence | None) -> bool:
    """True when ``divergence`` (matched by its reference function, so aliases count) has a kernel."""
    return divergence is not None and bind(divergence) is not None
