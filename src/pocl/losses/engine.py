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

Three implementations share one per-token function (:func:`_token_terms`), so they cannot
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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pocl.errors import ConfigError
from pocl.losses.divergences import LOG_PROB_FLOOR, Divergence, make_divergence

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

LogitFn = Callable[[Tensor], Tensor]

#: Accepted values of ``temperature_scaling``.
TEMPERATURE_SCALINGS: tuple[str, ...] = ("t2", "none")


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------

def select_response_tokens(hidden: Tensor, labels: Tensor,
                           ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The positions that predict a response token, with their targets (causal-LM shift).

    Position ``i`` predicts ``labels[:, i + 1]``. A position is selected when its *next* label
    is not ``ignore_index``; so prompt tokens (labelled ``ignore_index``) are never targets, the
    position before the appended EOS is selected (its target is EOS), the last position (which
    predicts nothing) never is, and right padding labelled ``ignore_index`` is skipped.

    Args:
        hidden: ``[B, L, H]`` hidden states, or ``[B, L, V]`` logits (same rule).
        labels: ``[B, L]`` token ids, ``ignore_index`` where no loss is wanted (the Hugging Face
            convention: ``labels`` aligned with ``input_ids``, not yet shifted).

    Returns:
        ``(selected [N, H], targets [N])`` in batch-major, then position order. ``selected``
        is differentiable w.r.t. ``hidden``.
    """
    if hidden.dim() != 3 or labels.dim() != 2 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            "select_response_tokens expects hidden [B, L, H] and labels [B, L]; got "
            f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    next_labels = labels[:, 1:]
    mask = next_labels != ignore_index
    return hidden[:, :-1][mask], next_labels[mask]


def count_target_tokens(labels: Tensor, ignore_index: int = -100) -> int:
    """Number of positions :func:`select_response_tokens` selects from ``labels [B, L]``.

    Sum this over every micro-batch of an accumulation window (and over data-parallel ranks)
    to get the ``normalizer`` of the loss functions.
    """
    if labels.dim() != 2:
        raise ValueError(f"count_target_tokens expects labels [B, L]; got {tuple(labels.shape)}")
    return int((labels[:, 1:] != ignore_index).sum().item())


# --------------------------------------------------------------------------------------------
# Options and the shared per-token math
# --------------------------------------------------------------------------------------------

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


#: Memory budget of one loss chunk's float32 temporaries when the chunk size is chosen automatically.
AUTO_CHUNK_BYTES: int = 1 << 30
#: About this many float32 ``[chunk, V]`` tensors are alive at the peak of a fused chunk (both models'
#: logits, softmaxes, mixtures and their gradients; measured in tests/losses/test_engine.py).
_CHUNK_TEMPORARIES = 16


def auto_chunk_size(chunk_size: int, vocab_size: int, *, largest: int = 512, smallest: int = 32) -> int:
    """``chunk_size`` itself when > 0; for 0, the largest power of two in ``[smallest, largest]`` whose
    temporaries fit :data:`AUTO_CHUNK_BYTES` at this vocabulary. A fixed 512 would hold 3.3 GiB at a
    128k vocabulary, and was also slower there than 128 (benchmarks/results/scaling.md)."""
    if chunk_size > 0:
        return chunk_size
    fits = AUTO_CHUNK_BYTES // (_CHUNK_TEMPORARIES * 4 * max(vocab_size, 1))
    size = largest
    while size > smallest and size > fits:
        size //= 2
    return size


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher at N token positions reduced to its k largest logits plus the exact log-mass of
    the other V − k tokens: what the teacher-logit cache stores (:func:`teacher_top_k` makes it).

    The losses then compare the two models on k + 1 buckets (the teacher's top-k tokens and one
    tail bucket; docs/losses.md, "A cached teacher"). With k = V there is no tail and the loss is
    the full-vocabulary loss.

    Attributes:
        token_ids: ``[N, k]`` int64 vocabulary ids of the teacher's k largest logits, ascending in
            each row (so k = V is the identity order, and ties sort as in the full vocabulary).
        logits: ``[N, k]`` the teacher's logits at ``token_ids`` (after its logit transform; any
            float dtype: they are upcast in the loss).
        tail_lse: ``[N, len(temperatures)]`` float: logsumexp over the other V − k tokens of
            z / T, one column per temperature (−inf when k = V).
        temperatures: the temperature of each column of ``tail_lse``.
    """

    token_ids: Tensor
    logits: Tensor
    tail_lse: Tensor
    temperatures: tuple[float, ...]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def rows(self, start: int, end: int) -> "TopKTeacher":
        """Token positions ``[start, end)``."""
        return TopKTeacher(self.token_ids[start:end], self.logits[start:end], self.tail_lse[start:end],
                           self.temperatures)

    def to(self, device: torch.device | str) -> "TopKTeacher":
        return TopKTeacher(self.token_ids.to(device), self.logits.to(device), self.tail_lse.to(device),
                           self.temperatures)

    def tail_at(self, temperature: float) -> Tensor:
        """``[N]`` logsumexp of z / T over the tokens outside the top k, at ``temperature``."""
        for column, t in enumerate(self.temperatures):
            if math.isclose(t, temperature, rel_tol=1e-9, abs_tol=0.0):
                return self.tail_lse[:, column]
        raise ConfigError(
            f"the cached teacher has tail masses at temperatures {list(self.temperatures)} only; the loss "
            f"asks for T = {temperature} (rebuild the teacher cache with this temperature)")

    def check(self, n: int, vocab_size: int) -> None:
        """Raise ValueError unless this holds ``n`` positions with ids in ``[0, vocab_size)``."""
        k = self.token_ids.shape[-1] if self.token_ids.dim() == 2 else -1
        if (self.token_ids.dim() != 2 or self.token_ids.shape[0] != n or tuple(self.logits.shape) != (n, k)
                or tuple(self.tail_lse.shape) != (n, len(self.temperatures))):
            raise ValueError(
                f"teacher_topk must hold token_ids and logits [{n}, k] and tail_lse [{n}, "
                f"{len(self.temperatures)}] (one row per selected token); got {tuple(self.token_ids.shape)}, "
                f"{tuple(self.logits.shape)} and {tuple(self.tail_lse.shape)}")
        if self.token_ids.dtype != torch.int64:
            raise ValueError(f"teacher_topk.token_ids must be int64; got {self.token_ids.dtype}")
        if k > vocab_size or (n > 0 and (int(self.token_ids.min()) < 0
                                         or int(self.token_ids.max()) >= vocab_size)):
            raise ValueError(f"teacher_topk: k = {k} ids must lie in the shared vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class _Options:
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


def _check_number(name: str, value: object) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"{name} must be a number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _make_options(*, divergence: Divergence | str | None, temperature: float, alpha: float,
                  normalizer: float, vocab_size: int, chunk_size: int,
                  temperature_scaling: str, student_logit_fn: LogitFn | None,
                  teacher_logit_fn: LogitFn | None) -> _Options:
    temperature = _check_number("temperature", temperature)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}")
    alpha = _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1]; got {alpha}")
    normalizer = _check_number("normalizer", normalizer)
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
    return _Options(divergence, temperature, alpha, normalizer, scale, vocab_size, chunk_size,
                    student_logit_fn, teacher_logit_fn)


def _as_float(logits: Tensor, logit_fn: LogitFn | None) -> Tensor:
    """Upcast to at least float32 (float64 stays float64), then apply the logit transform.

    Upcasting first keeps elementwise transforms such as tanh soft-capping accurate.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if logit_fn is None else logit_fn(logits)


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


def _token_terms(student_logits: Tensor, teacher: Tensor | TopKTeacher | None, targets: Tensor,
                 opts: _Options) -> tuple[Tensor, Tensor | None]:
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


def _combine(ce_sum: Tensor, div_sum: Tensor | None, opts: _Options) -> Tensor:
    """The loss contribution of token sums: [(1−α)·ce + α·s(T)·div] / normalizer."""
    loss = (1.0 - opts.alpha) * ce_sum
    if div_sum is not None:
        loss = loss + (opts.alpha * opts.scale) * div_sum
    return loss / opts.normalizer


def _resolve_vocab(vocab_size: int | None, student_rows: int, teacher_rows: int | None) -> int:
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


def _check_targets(targets: Tensor, n: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have shape [{n}]; got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")


def _zero(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def _requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _checked_topk(teacher_topk: TopKTeacher | None, n: int, opts: _Options) -> TopKTeacher | None:
    """``teacher_topk`` after checking its shapes, ids and temperature (None passes through)."""
    if teacher_topk is None:
        return None
    if not isinstance(teacher_topk, TopKTeacher):
        raise ValueError(f"teacher_topk must be a pocl.losses.TopKTeacher; got {type(teacher_topk).__name__}")
    teacher_topk.check(n, opts.vocab_size)
    teacher_topk.tail_at(opts.temperature)  # raises when the cache lacks this temperature
    return teacher_topk


# --------------------------------------------------------------------------------------------
# The cached teacher: top-k logits plus the exact tail
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_top_k(teacher_hidden: Tensor, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
                  *, k: int, temperatures: Sequence[float], vocab_size: int | None = None,
                  chunk_size: int = 512, teacher_logit_fn: LogitFn | None = None) -> TopKTeacher:
    """The teacher's k largest logits and the tail logsumexp at each temperature, chunk by chunk.

    The logits are made exactly as the live loss makes them (same trimming, upcast and logit
    transform), so a cached run differs from a live one only by the bucket approximation (none
    when k >= V).

    Args:
        teacher_hidden: ``[N, H]`` hidden states of the selected positions with
            ``teacher_weight [Vt, H]`` (and ``teacher_bias [Vt]`` or None), or ``[N, Vt]`` logits
            with ``teacher_weight`` None.
        k: tokens kept per position; clipped to the vocabulary (k >= V keeps all: exact).
        temperatures: every temperature the loss will be asked for (a ``tail_lse`` column each).
        vocab_size: shared vocabulary (the first columns are used; default: all).

    Returns:
        a :class:`TopKTeacher` with ``[N, min(k, V)]`` ids and logits and ``[N, len(temperatures)]``
        tails, in the logits' float dtype (at least float32). Peak memory: O(chunk_size x V).
    """
    temps = tuple(float(t) for t in temperatures)
    if not temps or any(not math.isfinite(t) or t <= 0 for t in temps):
        raise ConfigError(f"teacher_top_k needs temperatures > 0; got {list(temperatures)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive int; got {k!r}")
    rows = teacher_hidden.shape[1] if teacher_weight is None else teacher_weight.shape[0]
    v = rows if vocab_size is None else _resolve_vocab(vocab_size, rows, None)
    k = min(k, v)
    n = teacher_hidden.shape[0]
    dtype = torch.promote_types(teacher_hidden.dtype, torch.float32)
    device = teacher_hidden.device
    ids = torch.empty(n, k, dtype=torch.int64, device=device)
    logits = torch.empty(n, k, dtype=dtype, device=device)
    tails = torch.empty(n, len(temps), dtype=dtype, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if teacher_weight is None:
            z = _as_float(teacher_hidden[start:end, :v], teacher_logit_fn)
        else:
            z = _linear_logits(teacher_hidden[start:end], teacher_weight[:v],
                               None if teacher_bias is None else teacher_bias[:v], teacher_logit_fn)
        top, idx = z.topk(k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)
        ids[start:end] = idx
        logits[start:end] = top.gather(-1, order)
        rest = z.scatter(-1, idx, float("-inf"))
        for column, t in enumerate(temps):
            tails[start:end, column] = torch.logsumexp(rest / t, dim=-1)
    return TopKTeacher(ids, logits, tails, temps)


# --------------------------------------------------------------------------------------------
# Fused path: hidden states + LM-head weights
# --------------------------------------------------------------------------------------------

def _linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                   logit_fn: LogitFn | None) -> Tensor:
    """``[n, H] @ [V, H].T (+ [V])`` in the inputs' dtype, then upcast and transform."""
    return _as_float(F.linear(hidden, weight, bias), logit_fn)


def _teacher_chunk(t_hidden: Tensor | None, t_weight: Tensor | None, t_bias: Tensor | None,
                   t_topk: TopKTeacher | None, start: int, end: int,
                   opts: _Options) -> Tensor | TopKTeacher | None:
    """The teacher side of tokens ``[start, end)``: logits from the head, or the cached rows."""
    if not opts.use_teacher:
        return None
    if t_topk is not None:
        return t_topk.rows(start, end)
    assert t_hidden is not None and t_weight is not None
    v = opts.vocab_size
    with torch.no_grad():  # the teacher is a constant
        return _linear_logits(t_hidden[start:end], t_weight[:v],
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
        loss = _zero(device, acc)
        ce_sum = _zero(device, acc)
        div_sum = _zero(device, acc)

        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            t_logits = _teacher_chunk(t_hidden, t_weight, t_bias, t_topk, start, end, opts)
            h_leaf = s_hidden[start:end].detach().requires_grad_(need_h)
            with torch.enable_grad():
                s_logits = _linear_logits(h_leaf, w_leaf, b_leaf, opts.student_logit_fn)
                ce, div = _token_terms(s_logits, t_logits, targets[start:end], opts)
                chunk_ce = ce.sum()
                chunk_div = None if div is None else div.sum()
                chunk_loss = _combine(chunk_ce, chunk_div, opts)
            leaves = [x for x, need in ((h_leaf, need_h), (w_leaf, need_w), (b_leaf, need_b))
                      if need]
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


def _values_only(n: int, device: torch.device, dtype: torch.dtype,
                 chunk_logits: Callable[[int, int], tuple[Tensor, Tensor | None]], targets: Tensor,
                 opts: _Options) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked (loss, CE sum, divergence sum) without any gradient work (evaluation, frozen student).
    ``chunk_logits(start, end)``: the float32 student and teacher logits of tokens ``start:end``;
    ``dtype``: the student's (the sums are kept in it, at least float32)."""
    acc = torch.promote_types(dtype, torch.float32)
    loss = _zero(device, acc)
    ce_sum = _zero(device, acc)
    div_sum = _zero(device, acc)
    with torch.no_grad():
        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            s_logits, t_logits = chunk_logits(start, end)
            ce, div = _token_terms(s_logits, t_logits, targets[start:end], opts)
            c, d = ce.sum(), None if div is None else div.sum()
            loss += _combine(c, d, opts)
            ce_sum += c
            if d is not None:
                div_sum += d
    return loss, ce_sum, div_sum


def _values_only_linear(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, t_topk, targets,
                        opts: _Options) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked values without any gradient work (evaluation, frozen student)."""
    v = opts.vocab_size
    with torch.no_grad():
        w = s_weight[:v]
        b = None if s_bias is None else s_bias[:v]

    def chunk_logits(start: int, end: int) -> tuple[Tensor, Tensor | None]:
        t_logits = _teacher_chunk(t_hidden, t_weight, t_bias, t_topk, start, end, opts)
        return _linear_logits(s_hidden[start:end], w, b, opts.student_logit_fn), t_logits

    return _values_only(s_hidden.shape[0], s_hidden.device, s_weight.dtype, chunk_logits, targets, opts)


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
    (:func:`_token_terms`). When the student needs gradients they are computed per chunk in the
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
    _check_targets(targets, n)
    use_teacher = _check_number("alpha", alpha) > 0.0
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
    v = _resolve_vocab(vocab_size, student_weight.shape[0], teacher_rows)
    opts = _make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=chunk_size,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    if not use_teacher:
        teacher_hidden = teacher_weight = teacher_bias = teacher_topk = None
    teacher_topk = _checked_topk(teacher_topk, n, opts)

    if _requires_grad(student_hidden, student_weight, student_bias):
        loss, ce_sum, div_sum = _FusedLinearKD.apply(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, teacher_topk, targets, opts)
    else:
        loss, ce_sum, div_sum = _values_only_linear(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, teacher_topk, targets, opts)
    return KDLossOutput(loss, ce_sum.detach(), div_sum.detach(), n)


# --------------------------------------------------------------------------------------------
# Chunked path from logits
# --------------------------------------------------------------------------------------------

def _teacher_logits_chunk(t_logits: Tensor | None, t_topk: TopKTeacher | None, start: int, end: int,
                          opts: _Options) -> Tensor | TopKTeacher | None:
    """The teacher side of tokens ``[start, end)`` from ``[N, Vt]`` logits or the cached rows."""
    if not opts.use_teacher:
        return None
    if t_topk is not None:
        return t_topk.rows(start, end)
    with torch.no_grad():
        return _as_float(t_logits[start:end, :opts.vocab_size], opts.teacher_logit_fn)


class _ChunkedLogitsKD(torch.autograd.Function):
    """Chunked loss over tokens from ``[N, Vs]`` student logits; gradient computed in forward."""

    @staticmethod
    def forward(ctx, s_logits, t_logits, t_topk, targets, opts):
        n, v = s_logits.shape[0], opts.vocab_size
        device = s_logits.device
        acc = torch.promote_types(s_logits.dtype, torch.float32)
        # Columns >= vocab_size (padding) get zero gradient.
        grad = torch.zeros_like(s_logits)
        loss = _zero(device, acc)
        ce_sum = _zero(device, acc)
        div_sum = _zero(device, acc)
        for start in range(0, n, opts.chunk_size):
            end = min(start + opts.chunk_size, n)
            leaf = s_logits[start:end, :v].detach().requires_grad_(True)
            t_chunk = _teacher_logits_chunk(t_logits, t_topk, start, end, opts)
            with torch.enable_grad():
                ce, div = _token_terms(_as_float(leaf, opts.student_logit_fn), t_chunk,
                                       targets[start:end], opts)
                chunk_ce = ce.sum()
                chunk_div = None if div is None else div.sum()
                chunk_loss = _combine(chunk_ce, chunk_div, opts)
            (grad[start:end, :v],) = torch.autograd.grad(chunk_loss, [leaf])
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


def _check_logits(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor,
                  alpha: float, teacher_topk: TopKTeacher | None) -> int | None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V]; got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    _check_targets(targets, n)
    if _check_number("alpha", alpha) > 0.0:
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
    teacher_cols = _check_logits(student_logits, teacher_logits, targets, alpha, teacher_topk)
    v = _resolve_vocab(vocab_size, student_logits.shape[1], teacher_cols)
    opts = _make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=chunk_size,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    if not opts.use_teacher:
        teacher_logits = teacher_topk = None
    n = student_logits.shape[0]
    teacher_topk = _checked_topk(teacher_topk, n, opts)
    if _requires_grad(student_logits):
        loss, ce_sum, div_sum = _ChunkedLogitsKD.apply(student_logits, teacher_logits, teacher_topk,
                                                       targets, opts)
    else:
        def chunk_logits(start: int, end: int) -> tuple[Tensor, Tensor | None]:
            return (_as_float(student_logits[start:end, :v], opts.student_logit_fn),
                    _teacher_logits_chunk(teacher_logits, teacher_topk, start, end, opts))

        loss, ce_sum, div_sum = _values_only(n, student_logits.device, student_logits.dtype, chunk_logits, targets,
                                             opts)
    return KDLossOutput(loss, ce_sum.detach(), div_sum.detach(), n)


# --------------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------------

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
    teacher_cols = _check_logits(student_logits, teacher_logits, targets, alpha, teacher_topk)
    v = _resolve_vocab(vocab_size, student_logits.shape[1], teacher_cols)
    opts = _make_options(divergence=divergence, temperature=temperature, alpha=alpha,
                         normalizer=normalizer, vocab_size=v, chunk_size=1,
                         temperature_scaling=temperature_scaling,
                         student_logit_fn=student_logit_fn, teacher_logit_fn=teacher_logit_fn)
    n = student_logits.shape[0]
    teacher_topk = _checked_topk(teacher_topk if opts.use_teacher else None, n, opts)
    s = _as_float(student_logits[:, :v], opts.student_logit_fn)
    t = _teacher_logits_chunk(teacher_logits, teacher_topk, 0, n, opts)
    ce, div = _token_terms(s, t, targets, opts)
    ce_sum = ce.sum()
    div_sum = None if div is None else div.sum()
    loss = _combine(ce_sum, div_sum, opts)
    zero = _zero(loss.device, loss.dtype)
    return KDLossOutput(loss, ce_sum.detach(),
                        zero if div_sum is None else div_sum.detach(), student_logits.shape[0])
