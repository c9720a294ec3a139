"""The KD loss engine: token selection, temperature, the T² rule, normalisation, chunking.

Per training step the loss is::

    L = [ (1 − α) · Σ_tokens CE(y | x; q)  +  α · s(T) · Σ_tokens D(p^(T), q^(T)) ] / normalizer

* CE is the student's next-token cross-entropy at T = 1 on the reference token.
* p^(T) = softmax(z_teacher / T) and q^(T) = softmax(z_student / T): the temperature is
  applied to both models.
* s(T) = T² for every divergence (``temperature_scaling="t2"``, the default) or 1 (``"none"``).
* Both terms are token *sums* divided by ONE ``normalizer``: the number of response tokens in
  the whole gradient-accumulation window, computed by the caller (see
  :func:`count_target_tokens`). Summing the losses of the micro-batches therefore gives exactly
  the loss (and the gradients) of the full batch.

Three implementations share one per-token function (:func:`pocl.losses.terms.token_terms`), so they cannot
drift apart:

* :func:`fused_kd_loss` — from hidden states and LM-head weights. Logits exist only one chunk of
  tokens at a time; peak memory grows with ``chunk_size × vocab``, not ``tokens × vocab``.
  Gradients are computed chunk by chunk inside the forward pass (the Liger-Kernel
  fused-linear pattern) and returned by a custom :class:`torch.autograd.Function`.
* :func:`chunked_kd_loss_from_logits` — the same when the caller already has ``[N, V]`` logits
  (heads that are not a plain linear layer, on-policy code). Only one chunk's softmaxes and
  mixtures are alive at a time; the ``[N, V]`` gradient buffer is unavoidable.
* :func:`dense_kd_loss` — the plain autograd reference, memory-unbounded; used by the tests and
  benchmarks.

The teacher is always treated as a constant: no gradient ever flows into teacher tensors. It is
given as hidden states + LM head, as logits, or as a cached :class:`TopKTeacher` (its k largest
logits and the exact log-mass of the other tokens, made by :func:`teacher_top_k`): the divergence is
then taken on the k + 1 buckets, exactly the full-vocabulary loss when k = V (docs/losses.md,
"A cached teacher").

This module is the engine's public face; the code lives in one module per job:

* :mod:`pocl.losses.tokens` — token selection and counting;
* :mod:`pocl.losses.options` — argument checks, options, the result type, the T² rule;
* :mod:`pocl.losses.topk` — the cached teacher;
* :mod:`pocl.losses.terms` — the shared per-token math;
* :mod:`pocl.losses.fused`, :mod:`pocl.losses.from_logits`, :mod:`pocl.losses.dense` — the three paths;
* :mod:`pocl.losses.chunking` — the automatic chunk size.
"""

from __future__ import annotations

from pocl.losses.chunking import AUTO_CHUNK_BYTES, auto_chunk_size  # noqa: F401 (AUTO_CHUNK_BYTES: kept importable here)
from pocl.losses.dense import dense_kd_loss
from pocl.losses.from_logits import chunked_kd_loss_from_logits
from pocl.losses.fused import fused_kd_loss
from pocl.losses.options import TEMPERATURE_SCALINGS, KDLossOutput, LogitFn, temperature_scale  # noqa: F401 (LogitFn: kept importable here)
from pocl.losses.tokens import count_target_tokens, select_response_tokens
from pocl.losses.topk import TopKTeacher, teacher_top_k

__all__ = [
    "TEMPERATURE_SCALINGS",
    "KDLossOutput",
    "TopKTeacher",
    "chunked_kd_loss_from_logits",
    "count_target_tokens",
    "dense_kd_loss",
    "fused_kd_loss",
    "select_response_tokens",
    "teacher_top_k",
    "temperature_scale",
    "auto_chunk_size",
]
