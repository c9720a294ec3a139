"""The shared per-token loss math: CE and divergence of one chunk (:func:`token_terms`, the single
place where the formulas live), the combination of token sums into the loss (:func:`combine`, and its
derivative :func:`term_weights`), the same chunk with its gradient w.r.t. the student logits in closed form
when the divergence has a kernel (:func:`token_terms_and_grad`, :mod:`pocl.losses.kernels`), and the
gradient-free chunk loop that evaluation and frozen students use (:func:`values_only`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from pocl.losses.divergences import LOG_PROB_FLOOR
from pocl.losses.kernels import chunk_terms, has_kernel
from pocl.losses.options import LossOptions
from pocl.losses.topk import TopKTeacher

__all__ = [
    "combine",
    "has_closed_form",
    "requires_grad",
    "term_weights",
    "token_terms",
    "token_terms_and_grad",
    "values_only",
    "zero_scalar",
]


def _bucket_log_probs(student_logits: Tensor, teacher: TopKTeacher,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """Both models' log-probabilities at temperature T on the buckets of a cached teacher.

    Bucket j < k is the token ``teacher.token_ids[:, j]``; bucket k (present when k < V) holds the
    total probability of the other V − k tokens, exact for both models: the teacher's from its
    stored tail logsumexp, the student's from its full logits.

    Args:
        student_logits: ``[n, V]`` float (differentiable).
        teacher: the cached teacher of these ``n`` positions.

    Returns:
        ``(student_logp, teacher_logp)``, both ``[n, k + 1]`` (``[n, k]`` when k = V).
    """
    scaled = student_logits / temperature
    ids = teacher.token_ids
    student_buckets = scaled.gather(-1, ids)
    teacher_buckets = teacher.logits.to(scaled.dtype) / temperature
    if ids.shape[-1] < scaled.shape[-1]:
        # The student's tail is the logsumexp of its logits outside the teacher's top k, computed
        # directly: 1 − Σ top-k probabilities would cancel catastrophically when the top k hold
        # nearly all the mass. The top-k entries are set to the floor rather than −inf, and −inf
        # logits are lifted to it, so that a tail of masked (−inf) logits gives finite values and
        # gradients instead of NaN; exp(floor − max) is exactly 0 next to any ordinary logit.
        rest = scaled.clamp(min=LOG_PROB_FLOOR).scatter(-1, ids, LOG_PROB_FLOOR)
        student_buckets = torch.cat([student_buckets, torch.logsumexp(rest, -1, keepdim=True)], -1)
        teacher_buckets = torch.cat(
            [teacher_buckets, teacher.tail_at(temperature).to(scaled.dtype).unsqueeze(-1)], -1)
    return torch.log_softmax(student_buckets, dim=-1), torch.log_softmax(teacher_buckets, dim=-1)


def token_terms(student_logits: Tensor, teacher: Tensor | TopKTeacher | None, targets: Tensor,
                 opts: LossOptions) -> tuple[Tensor, Tensor | None]:
    """Per-token CE (T = 1) and divergence (temperature T) of one chunk.

    THE single place where the loss math lives; all three code paths call it.

    Args:
        student_logits: ``[n, V]`` float (already trimmed and transformed).
        teacher: ``[n, V]`` float logits, a :class:`TopKTeacher` of the ``n`` positions (the
            divergence is then taken on its k + 1 buckets), or None when ``not opts.use_teacher``.
        targets: ``[n]`` int64 token ids in ``[0, V)``.

    Returns:
        ``(ce [n], divergence [n] or None)``: the true, unscaled values.
    """
    # At alpha = 1 the CE has weight 0 and is only logged; when the divergence does not reuse its
    # T = 1 log-softmax (T != 1, or a cached teacher), keep it out of the autograd graph: its
    # backward would be a full [n, V] pass multiplied by zero (the last POCL stage: T = 2, alpha = 1).
    ce_logged_only = opts.alpha == 1.0 and (opts.temperature != 1.0 or isinstance(teacher, TopKTeacher))
    with torch.no_grad() if ce_logged_only else contextlib.nullcontext():
        student_logp = torch.log_softmax(student_logits, dim=-1)
        ce = -student_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not opts.use_teacher:
        return ce, None
    assert teacher is not None and opts.divergence is not None
    if isinstance(teacher, TopKTeacher):
        return ce, opts.divergence(*_bucket_log_probs(student_logits, teacher, opts.temperature))
    if opts.temperature != 1.0:
        # Temperature softens both models; the T = 1 log-softmax above serves CE only.
        student_logp = torch.log_softmax(student_logits / opts.temperature, dim=-1)
        teacher_logp = torch.log_softmax(teacher / opts.temperature, dim=-1)
    else:
        teacher_logp = torch.log_softmax(teacher, dim=-1)
    return ce, opts.divergence(student_logp, teacher_logp)


def combine(ce_sum: Tensor, div_sum: Tensor | None, opts: LossOptions) -> Tensor:
    """The loss contribution of token sums: [(1−α)·ce + α·s(T)·div] / normalizer."""
    loss = (1.0 - opts.alpha) * ce_sum
    if div_sum is not None:
        loss = loss + (opts.alpha * opts.scale) * div_sum
    return loss / opts.normalizer


def term_weights(opts: LossOptions) -> tuple[float, float]:
    """∂ combine / ∂ ce_sum and ∂ combine / ∂ div_sum: ``((1−α)/normalizer, α·s(T)/normalizer)``."""
    return (1.0 - opts.alpha) / opts.normalizer, (opts.alpha * opts.scale) / opts.normalizer


def has_closed_form(teacher: Tensor | TopKTeacher | None, opts: LossOptions) -> bool:
    """True when :func:`token_terms_and_grad` computes this chunk (a divergence kernel, or no teacher)."""
    return not opts.use_teacher or (isinstance(teacher, Tensor) and has_kernel(opts.divergence))


def token_terms_and_grad(student_logits: Tensor, teacher: Tensor | TopKTeacher | None, targets: Tensor,
                         opts: LossOptions) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """:func:`token_terms` plus the gradient of ``combine(ce.sum(), div.sum(), opts)`` w.r.t.
    ``student_logits``, in closed form: the CE's ``softmax − onehot`` and the divergence kernel's
    gradient (:mod:`pocl.losses.kernels`), no autograd graph.

    Returns ``(ce [n], div [n] or None, grad [n, V])`` (values detached, as :func:`token_terms`
    computes them, except that the divergence is the kernel's value of the same formula), or None when
    this chunk has no kernel (a divergence without one, or a cached top-k teacher): the caller then
    differentiates :func:`token_terms` with autograd.
    """
    if not has_closed_form(teacher, opts):
        return None
    ce_w, div_w = term_weights(opts)
    ce, div, grad = chunk_terms(opts.divergence if opts.use_teacher else None, student_logits.detach(),
                                teacher if opts.use_teacher else None, opts.temperature, targets, ce_w, div_w)
    return ce, div, grad.to(student_logits.dtype)


def zero_scalar(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def values_only(n: int, device: torch.device, dtype: torch.dtype,
                 chunk_logits: Callable[[int, int], tuple[Tensor, Tensor | None]], targets: Tensor,
                 opts: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked (loss, CE sum, divergence sum) without any gradient work (evaluation, frozen student).
    ``chunk_logits(start, end)``: the float32 student and teacher logits of tokens ``start:end``;
    ``dtype``: the student's (the sums are kept in it, at least float32)."""
    acc = torch.promote_types(dtype, torch.float32)
    loss = zero_scalar(device, acc)
    ce_sum = zero_scalar(device, acc)
    div_sum = zero_scalar(device, acc)
    with torch.no_grad():
        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            s_logits, t_logits = chunk_logits(start, end)
            ce, div = token_terms(s_logits, t_logits, targets[start:end], opts)
            c, d = ce.sum(), None if div is None else div.sum()
            loss += combine(c, d, opts)
            ce_sum += c
            if d is not None:
                div_sum += d
    return loss, ce_sum, div_sum
