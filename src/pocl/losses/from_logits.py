"""The chunked KD loss path from ``[N, V]`` logits (heads that are not a plain linear layer, on-policy
code): one chunk's softmaxes and mixtures alive at a time, the gradient computed in the forward pass.
Also the logits-side argument checks and teacher slicing that the dense reference shares.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pocl.losses.divergences import Divergence
from pocl.losses.options import (KDLossOutput, LogitFn, LossOptions, as_float, check_number, check_targets,
                                 make_options, resolve_vocab)
from pocl.losses.terms import combine, requires_grad, token_terms, token_terms_and_grad, values_only, zero_scalar
from pocl.losses.topk import TopKTeacher, checked_topk

__all__ = [
    "check_logits",
    "chunked_kd_loss_from_logits",
    "teacher_logits_chunk",
]


def teacher_logits_chunk(t_logits: Tensor | None, t_topk: TopKTeacher | None, start: int, end: int,
                          opts: LossOptions) -> Tensor | TopKTeacher | None:
    """The teacher side of tokens ``[start, end)`` from ``[N, Vt]`` logits or the cached rows."""
    if not opts.use_teacher:
        return None
    if t_topk is not None:
        return t_topk.rows(start, end)
    with torch.no_grad():
        return as_float(t_logits[start:end, :opts.vocab_size], opts.teacher_logit_fn)


class _ChunkedLogitsKD(torch.autograd.Function):
    """Chunked loss over tokens from ``[N, Vs]`` student logits; gradient computed in forward."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, t_topk, targets, opts):
        n, v = s_logits.shape[0], opts.vocab_size
        device = s_logits.device
        acc = torch.promote_types(s_logits.dtype, torch.float32)
        # Columns >= vocab_size (padding) get zero gradient.
        grad = torch.zeros_like(s_logits)
        loss = zero_scalar(device, acc)
        ce_sum = zero_scalar(device, acc)
        div_sum = zero_scalar(device, acc)
        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            leaf = s_logits[start:end, :v].detach().requires_grad_(True)
            t_chunk = teacher_logits_chunk(t_logits, t_topk, start, end, opts)
            with torch.enable_grad():
                s_float = as_float(leaf, opts.student_logit_fn)
            # The divergence's kernel when it has one (see fused.py); else autograd through token_terms.
            fast = token_terms_and_grad(s_float, t_chunk, targets[start:end], opts)
            if fast is not None:
                ce, div, grad_logits = fast
                chunk_ce = ce.sum()
                chunk_div = None if div is None else div.sum()
                chunk_loss = combine(chunk_ce, chunk_div, opts)
                (grad[start:end, :v],) = torch.autograd.grad(s_float, [leaf], grad_outputs=grad_logits)
                del grad_logits
            else:
                with torch.enable_grad():
                    ce, div = token_terms(s_float, t_chunk, targets[start:end], opts)
                    chunk_ce = ce.sum()
                    chunk_div = None if div is None else div.sum()
                    chunk_loss = combine(chunk_ce, chunk_div, opts)
                (grad[start:end, :v],) = torch.autograd.grad(chunk_loss, [leaf])
            del s_float
            loss += chunk_loss.detach()
            ce_sum += chunk_ce.detach()
            if chunk_div is not None:
                div_sum += chunk_div.detach()
            del leaf, t_chunk, ce, div, chunk_ce, chunk_div, chunk_loss
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, div_sum)
        return loss, ce_sum, div_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def check_logits(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                  alpha: float, teacher_topk: TopKTeacher | None) -> int | None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V]; got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    check_targets(targets, n)
    if check_number("alpha", alpha) > 0.0:
        if teacher_topk is not None:
            if teacher_logits is not None:
                raise ValueError("give the teacher as teacher_logits or as teacher_topk, not both")
            return None
        if teacher_logits is None:
            raise ValueError("teacher_logits are required when alpha > 0")
        if teacher_logits.dim() != 2 or teacher_logits.shape[0] != n:
            raise ValueError(f"teacher_logits must be [{n}, V]; got "
                             f"{tuple(teacher_logits.shape)}")
        return teacher_logits.shape[1]
    return None


def chunked_kd_loss_from_logits(student_logits: Tensor, teacher_logits: Tensor | None,
                                targets: Tensor, *, divergence: Divergence | str | None,
                                temperature: float, alpha: float, normalizer: float,
                                vocab_size: int | None = None, chunk_size: int = 512,
                                temperature_scaling: str = "t2",
                                student_logit_fn: LogitFn | None = None,
                                teacher_logit_fn: LogitFn | None = None,
                                teacher_topk: TopKTeacher | None = None) -> KDLossOutput:
    """KD loss from ``[N, Vs]`` student and ``[N, Vt]`` teacher logits, chunked over tokens.

    Same math and options as :func:`fused_kd_loss` (the first ``vocab_size`` columns of each
    are compared; ``teacher_topk`` replaces ``teacher_logits`` with a cached teacher). Only one
    chunk's float32 copies, softmaxes and mixtures are alive at a time; the gradient w.r.t.
    ``student_logits`` (one ``[N, Vs]`` buffer in its dtype) is computed in the forward pass. Use
    it for heads that are not a plain linear layer, or when logits exist anyway (on-policy
    generation).
    """
    teacher_cols = check_logits(student_logits, teacher_logits, targets, alpha, teacher_topk)
    v = resolve_vocab(vocab_size, student_logits.shape[1], teacher_cols)
    opts = make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=chunk_size,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    if not opts.use_teacher:
        teacher_logits = teacher_topk = None
    n = student_logits.shape[0]
    teacher_topk = checked_topk(teacher_topk, n, opts)
    if requires_grad(student_logits):
        loss, ce_sum, div_sum = _ChunkedLogitsKD.apply(student_logits, teacher_logits, teacher_topk,
                                                       targets, opts)
    else:
        def chunk_logits(start: int, end: int) -> tuple[Tensor, Tensor | None]:
            return (as_float(student_logits[start:end, :v], opts.student_logit_fn),
                    teacher_logits_chunk(teacher_logits, teacher_topk, start, end, opts))

        loss, ce_sum, div_sum = values_only(n, student_logits.device, student_logits.dtype, chunk_logits, targets,
                                             opts)
    return KDLossOutput(loss, ce_sum.detach(), div_sum.detach(), n)
