"""The dense KD loss: the plain, unchunked autograd implementation (memory grows with N × V), the
reference the chunked paths are tested and benchmarked against.
"""

from __future__ import annotations

from torch import Tensor

from pocl.losses.divergences import Divergence
from pocl.losses.from_logits import check_logits, teacher_logits_chunk
from pocl.losses.options import KDLossOutput, LogitFn, as_float, make_options, resolve_vocab
from pocl.losses.terms import combine, token_terms, zero_scalar
from pocl.losses.topk import TopKTeacher, checked_topk

__all__ = [
    "dense_kd_loss",
]


def dense_kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, *,
                  divergence: Divergence | str | None, temperature: float, alpha: float,
                  normalizer: float, vocab_size: int | None = None,
                  temperature_scaling: str = "t2", student_logit_fn: LogitFn | None = None,
                  teacher_logit_fn: LogitFn | None = None,
                  teacher_topk: TopKTeacher | None = None) -> KDLossOutput:
    """The plain, unchunked autograd implementation of the same loss (reference).

    Shapes as :func:`chunked_kd_loss_from_logits`. Every ``[N, V]`` temporary of the whole call
    is alive at once and autograd saves several for backward: memory grows with N × V. Use it
    for tests and benchmarks, not for training on real vocabularies.
    """
    teacher_cols = check_logits(student_logits, teacher_logits, targets, alpha, teacher_topk)
    v = resolve_vocab(vocab_size, student_logits.shape[1], teacher_cols)
    opts = make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=1,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    n = student_logits.shape[0]
    teacher_topk = checked_topk(teacher_topk if opts.use_teacher else None, n, opts)
    s = as_float(student_logits[:, :v], opts.student_logit_fn)
    t = teacher_logits_chunk(teacher_logits, teacher_topk, 0, n, opts)
    ce, div = token_terms(s, t, targets, opts)
    ce_sum = ce.sum()
    div_sum = None if div is None else div.sum()
    loss = combine(ce_sum, div_sum, opts)
    zero = zero_scalar(loss.device, loss.dtype)
    return KDLossOutput(loss, ce_sum.detach(),
                        zero if div_sum is None else div_sum.detach(), student_logits.shape[0])
