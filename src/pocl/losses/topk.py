"""The cached teacher: its k largest logits plus the exact log-mass of the other tokens
(:class:`TopKTeacher`), made chunk by chunk by :func:`teacher_top_k` and checked against a loss call
by :func:`checked_topk` (docs/losses.md, "A cached teacher").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pocl.errors import ConfigError
from pocl.losses.options import LogitFn, LossOptions, as_float, linear_logits, resolve_vocab

__all__ = [
    "TopKTeacher",
    "checked_topk",
    "teacher_top_k",
]


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


def checked_topk(teacher_topk: TopKTeacher | None, n: int, opts: LossOptions) -> TopKTeacher | None:
    """``teacher_topk`` after checking its shapes, ids and temperature (None passes through)."""
    if teacher_topk is None:
        return None
    if not isinstance(teacher_topk, TopKTeacher):
        raise ValueError(f"teacher_topk must be a pocl.losses.TopKTeacher; got {type(teacher_topk).__name__}")
    teacher_topk.check(n, opts.vocab_size)
    teacher_topk.tail_at(opts.temperature)  # raises when the cache lacks this temperature
    return teacher_topk


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
    v = rows if vocab_size is None else resolve_vocab(vocab_size, rows, None)
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
            z = as_float(teacher_hidden[start:end, :v], teacher_logit_fn)
        else:
            z = linear_logits(teacher_hidden[start:end], teacher_weight[:v],
                               None if teacher_bias is None else teacher_bias[:v], teacher_logit_fn)
        top, idx = z.topk(k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=-1)
        ids[start:end] = idx
        logits[start:end] = top.gather(-1, order)
        rest = z.scatter(-1, idx, float("-inf"))
        for column, t in enumerate(temps):
            tails[start:end, column] = torch.logsumexp(rest / t, dim=-1)
    return TopKTeacher(ids, logits, tails, temps)
