"""The fused KD loss path: from hidden states and LM-head weights, logits existing one chunk of tokens at
a time, gradients computed chunk by chunk in the forward pass (the Liger-Kernel fused-linear pattern).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pocl.losses.divergences import Divergence
from pocl.losses.options import (
    KDLossOutput,
    LogitFn,
    LossOptions,
    check_number,
    check_targets,
    linear_logits,
    make_options,
    resolve_vocab,
)
from pocl.losses.terms import (
    combine,
    has_closed_form,
    requires_grad,
    token_terms,
    token_terms_and_grad,
    values_only,
    zero_scalar,
)
from pocl.losses.topk import TopKTeacher, checked_topk

__all__ = [
    "fused_kd_loss",
]


def _teacher_chunk(t_hidden: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None,
                   t_topk: TopKTeacher | None, start: int, end: int,
                   opts: LossOptions) -> Tensor | TopKTeacher | None:
    """The teacher side of tokens ``[start, end)``: logits from the head, or the cached rows."""
    if not opts.use_teacher:
        return None
    if t_topk is not None:
        return t_topk.rows(start, end)
    assert t_hidden is not None and t_weight is not None
    v = opts.vocab_size
    with torch.no_grad():  # the teacher is a constant
        return linear_logits(t_hidden[start:end], t_weight[:v],
                              None if t_bias is None else t_bias[:v], opts.teacher_logit_fn)


class _FusedLinearKD(torch.autograd.Function):
    """Chunked loss over tokens with gradients computed in forward (Liger's fused-linear idea).

    forward returns ``(loss, ce_sum, div_sum)``; only ``loss`` is differentiable. The saved
    gradients are w.r.t. student hidden [N, H], weight [Vs, H] and bias [Vs]. The teacher is
    either ``t_hidden``/``t_weight``/``t_bias`` or a cached ``t_topk``.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_topk, targets, opts):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        n, v = s_hidden.shape[0], opts.vocab_size
        device = s_hidden.device
        # Leaves for the per-chunk autograd. Slicing to the shared vocabulary first avoids
        # computing (and differentiating) padded rows at all; their gradient is zero.
        w_leaf = s_weight.detach()[:v].requires_grad_(need_w)
        b_leaf = None if s_bias is None else s_bias.detach()[:v].requires_grad_(need_b)
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        # Accumulate weight/bias gradients over chunks in at least float32 (bf16 sums of
        # many chunks lose precision); cast back to the parameter dtype at the end.
        acc = torch.promote_types(s_weight.dtype, torch.float32)
        grad_w = torch.zeros(s_weight.shape, dtype=acc, device=device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=acc, device=device) if need_b else None
        loss = zero_scalar(device, acc)
        ce_sum = zero_scalar(device, acc)
        div_sum = zero_scalar(device, acc)

        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            t_logits = _teacher_chunk(t_hidden, t_weight, t_bias, t_topk, start, end, opts)
            if opts.student_logit_fn is None and has_closed_form(t_logits, opts):
                # A plain linear head and a kernel: the head's backward is written out, so the weight
                # gradient is accumulated in place (addmm) and no autograd graph is built.
                ce, div, chunk_ce, chunk_div, chunk_loss = _linear_kernel_chunk(
                    s_hidden[start:end].detach(), w_leaf.detach(), None if b_leaf is None else b_leaf.detach(),
                    t_logits, targets[start:end], opts, grad_h=None if grad_h is None else grad_h[start:end],
                    grad_w=None if grad_w is None else grad_w[:v], grad_b=None if grad_b is None else grad_b[:v])
                h_leaf = s_logits = None
            else:
                h_leaf = s_hidden[start:end].detach().requires_grad_(need_h)
                leaves = [x for x, need in ((h_leaf, need_h), (w_leaf, need_w), (b_leaf, need_b))
                          if need]
                with torch.enable_grad():
                    s_logits = linear_logits(h_leaf, w_leaf, b_leaf, opts.student_logit_fn)
                # The divergence's kernel (closed-form gradient w.r.t. the logits) when it has one; else
                # autograd through the reference function (token_terms).
                fast = token_terms_and_grad(s_logits, t_logits, targets[start:end], opts)
                if fast is not None:
                    ce, div, grad_logits = fast
                    chunk_ce = ce.sum()
                    chunk_div = None if div is None else div.sum()
                    chunk_loss = combine(chunk_ce, chunk_div, opts)
                    grads = (iter(torch.autograd.grad(s_logits, leaves, grad_outputs=grad_logits))
                             if leaves else iter(()))
                    del grad_logits
                else:
                    with torch.enable_grad():
                        ce, div = token_terms(s_logits, t_logits, targets[start:end], opts)
                        chunk_ce = ce.sum()
                        chunk_div = None if div is None else div.sum()
                        chunk_loss = combine(chunk_ce, chunk_div, opts)
                    grads = iter(torch.autograd.grad(chunk_loss, leaves)) if leaves else iter(())
                if need_h:
                    grad_h[start:end] = next(grads)
                if need_w:
                    grad_w[:v] += next(grads)
                if need_b:
                    grad_b[:v] += next(grads)
            loss += chunk_loss.detach()
            ce_sum += chunk_ce.detach()
            if chunk_div is not None:
                div_sum += chunk_div.detach()
            # Drop this chunk's graph before the next chunk allocates its own.
            del s_logits, t_logits, ce, div, chunk_ce, chunk_div, chunk_loss, h_leaf

        if grad_w is not None:
            grad_w = grad_w.to(s_weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(s_bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(ce_sum, div_sum)
        return loss, ce_sum, div_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The loss is linear in the upstream gradient: rescale the stored gradients.
        out = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*out, None, None, None, None, None, None)


def _linear_kernel_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, t_logits: Tensor | None,
                         targets: Tensor, opts: LossOptions, *, grad_h: Tensor | None, grad_w: Tensor | None,
                         grad_b: Tensor | None):
    """One chunk through a plain linear head and a divergence kernel, its backward written out.

    ``hidden [n, H]``, ``weight [V, H]``, ``bias [V]``: the chunk's student inputs (detached);
    ``grad_h [n, H]`` (this chunk's rows) is written, ``grad_w [V, H]`` and ``grad_b [V]`` are accumulated
    into (each None when not needed). The matrix products are the ones autograd's linear backward runs,
    in the same dtypes (``torch.mm`` follows autocast as ``F.linear`` does); the weight gradient is
    added in place with ``addmm_`` when the dtypes allow it, instead of a new ``[V, H]`` tensor per chunk.

    Returns ``(ce [n], div [n] or None, ce sum, div sum or None, chunk loss)``.
    """
    with torch.no_grad():
        raw = torch.nn.functional.linear(hidden, weight, bias)
        ce, div, grad_logits = token_terms_and_grad(raw, t_logits, targets, opts)
        # The gradient arrives at the head's output in its dtype (autograd's cast back from float32).
        g = grad_logits.to(raw.dtype)
        del grad_logits
        if grad_h is not None:
            grad_h.copy_(torch.mm(g, weight))
        if grad_w is not None:
            if not torch.is_autocast_enabled(g.device.type) and g.dtype == hidden.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), hidden)
            else:
                grad_w += torch.mm(g.t(), hidden)
        if grad_b is not None:
            grad_b += g.sum(0)
    chunk_ce = ce.sum()
    chunk_div = None if div is None else div.sum()
    return ce, div, chunk_ce, chunk_div, combine(chunk_ce, chunk_div, opts)


def _values_only_linear(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_topk, targets,
                        opts: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked values without any gradient work (evaluation, frozen student)."""
    v = opts.vocab_size
    with torch.no_grad():
        w = s_weight[:v]
        b = None if s_bias is None else s_bias[:v]

    def chunk_logits(start: int, end: int) -> tuple[Tensor, Tensor | None]:
        t_logits = _teacher_chunk(t_hidden, t_weight, t_bias, t_topk, start, end, opts)
        return linear_logits(s_hidden[start:end], w, b, opts.student_logit_fn), t_logits

    return values_only(s_hidden.shape[0], s_hidden.device, s_weight.dtype, chunk_logits, targets, opts)


def fused_kd_loss(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                  teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
                  teacher_bias: Tensor | None, targets: Tensor, *,
                  divergence: Divergence | str | None, temperature: float, alpha: float,
                  normalizer: float, vocab_size: int | None = None, chunk_size: int = 512,
                  temperature_scaling: str = "t2", student_logit_fn: LogitFn | None = None,
                  teacher_logit_fn: LogitFn | None = None,
                  teacher_topk: TopKTeacher | None = None) -> KDLossOutput:
    """KD loss from final hidden states and LM-head weights, never forming full logits.

    For each chunk of ``chunk_size`` tokens: ``logits = hidden @ W[:vocab_size].T
    (+ b[:vocab_size])`` (equal to keeping the first ``vocab_size`` columns of the full
    logits), upcast to float32, ``*_logit_fn`` applied, then CE and divergence
    (:func:`token_terms`). When the student needs gradients they are computed per chunk in the
    forward pass and returned by a custom autograd Function; peak memory is
    O(chunk_size · vocab_size) plus the gradient buffers ([N, H] and the weight's shape).

    Args:
        student_hidden: ``[N, H]`` final hidden states of the selected positions
            (:func:`select_response_tokens`).
        student_weight: ``[Vs, H]`` LM-head weight (may be a tied embedding Parameter).
        student_bias: ``[Vs]`` or None.
        teacher_hidden: ``[N, Ht]``; may be None when ``alpha == 0``.
        teacher_weight: ``[Vt, Ht]``; may be None when ``alpha == 0``.
        teacher_bias: ``[Vt]`` or None.
        targets: ``[N]`` int64 next-token ids in ``[0, vocab_size)``.
        divergence: a :class:`Divergence` (or a registry name); required when ``alpha > 0``.
        temperature: T > 0, applied to both models' logits for the divergence.
        alpha: weight of the KD term in [0, 1]; 0 is pure CE (the teacher is not evaluated).
        normalizer: response tokens in the whole accumulation window (> 0).
        vocab_size: shared vocabulary (first columns of both); required when Vs != Vt.
        chunk_size: tokens per chunk.
        temperature_scaling: ``"t2"`` (multiply the divergence by T²) or ``"none"``.
        student_logit_fn / teacher_logit_fn: elementwise differentiable transform of the
            float32 logits (e.g. Gemma's tanh soft-capping).
        teacher_topk: a cached teacher (:class:`TopKTeacher`, N rows) instead of
            ``teacher_hidden``/``teacher_weight`` (which must then be None): the divergence is
            taken on its k + 1 buckets; CE is unchanged.

    Returns:
        :class:`KDLossOutput`. The loss connects to the student inputs even when N == 0.
    """
    if student_hidden.dim() != 2 or student_weight.dim() != 2:
        raise ValueError(
            "student_hidden must be [N, H] and student_weight [V, H]; got "
            f"{tuple(student_hidden.shape)} and {tuple(student_weight.shape)}")
    n, h = student_hidden.shape
    if student_weight.shape[1] != h:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} does not match hidden size {h}")
    if student_bias is not None and tuple(student_bias.shape) != (student_weight.shape[0],):
        raise ValueError(f"student_bias must be [{student_weight.shape[0]}]; got "
                         f"{tuple(student_bias.shape)}")
    check_targets(targets, n)
    use_teacher = check_number("alpha", alpha) > 0.0
    teacher_rows = None
    if use_teacher and teacher_topk is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher as teacher_hidden/teacher_weight or as teacher_topk, not both")
    elif use_teacher:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight are required when alpha > 0")
        if teacher_hidden.dim() != 2 or teacher_weight.dim() != 2:
            raise ValueError(
                "teacher_hidden must be [N, Ht] and teacher_weight [Vt, Ht]; got "
                f"{tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
        if teacher_hidden.shape[0] != n:
            raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} tokens, the student "
                             f"{n}")
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} does not match "
                             f"teacher hidden size {teacher_hidden.shape[1]}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
            raise ValueError(f"teacher_bias must be [{teacher_weight.shape[0]}]; got "
                             f"{tuple(teacher_bias.shape)}")
        teacher_rows = teacher_weight.shape[0]
    v = resolve_vocab(vocab_size, student_weight.shape[0], teacher_rows)
    opts = make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=chunk_size,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    if not use_teacher:
        teacher_hidden = teacher_weight = teacher_bias = teacher_topk = None
    teacher_topk = checked_topk(teacher_topk, n, opts)

    if requires_grad(student_hidden, student_weight, student_bias):
        loss, ce_sum, div_sum = _FusedLinearKD.apply(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, teacher_topk, targets, opts)
    else:
        loss, ce_sum, div_sum = _values_only_linear(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, teacher_topk, targets, opts)
    return KDLossOutput(loss, ce_sum.detach(), div_sum.detach(), n)
