"""Token selection for the KD losses: which positions predict a response token (causal-LM shift), and
how many there are (the ``normalizer`` of an accumulation window).
"""

from __future__ import annotations

from torch import Tensor

__all__ = [
    "count_target_tokens",
    "select_response_tokens",
]


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
