"""The two teacher signals of the difficulty measurer (an extension: the POCL paper ranks with the
student alone). Both are measured on the reference response under teacher forcing, with the
tokenisation and masking of the ``loss`` signal (:func:`pocl.data.tokenize_records`: prompt masked,
EOS appended as a target), in ONE joint pass: the student and the teacher run on the same batch.

* **teacher_kl** -- the mean over response tokens of the forward KL(p_teacher || q_student) at
  temperature 1 (:func:`pocl.losses.divergences.forward_kl`, the ``fkl`` of training): how far the
  student is from the teacher on this sample. Higher = harder.
* **teacher_entropy** -- the mean over response tokens of the teacher's entropy H(p_teacher): how
  unsure the teacher is. Higher = harder.

As in the loss pass, logits exist only at the response positions and are computed chunk by chunk
through each model's LM head (log-softmax in float32 per chunk), so no ``[B, L, V]`` logits tensor
exists; a model whose output layer cannot be reproduced from its hidden states uses its own logits.
Both distributions are over the output rows the two models share (:func:`shared_rows`; padded rows
beyond that are left out, as in training). A sample with no response token gets NaN for both (it
ranks as hardest).

This module holds the per-batch computation (:func:`joint_batch_signals`); the pass over the data
(batching by length, sharding, the journal, the progress bar) is
:func:`pocl.curriculum.measurement.measure_difficulty`'s, under the pass name :data:`TEACHER_PASS`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pocl.errors import ModelError
from pocl.losses.divergences import LOG_PROB_FLOOR, forward_kl
from pocl.losses.engine import select_response_tokens
from pocl.models import LMHead, hidden_states, output_rows

#: The journal's name of the joint pass (:class:`pocl.curriculum.measurement.BatchJournal`).
TEACHER_PASS = "teacher"

__all__ = ["TEACHER_PASS", "joint_batch_signals", "shared_rows"]


def shared_rows(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The output rows both models share (the vocabulary of both distributions); every token of the
    tokenizer must be inside it."""
    rows_s, rows_t = output_rows(student), output_rows(teacher)
    vocab = min(rows_s, rows_t)
    if vocab < len(tokenizer):
        raise ModelError(f"vocabulary mismatch: teacher output layer {rows_t} rows, student {rows_s}, tokenizer "
                         f"{len(tokenizer)} tokens; the teacher signals compare the two distributions token by token")
    return vocab


def _response_states(model: nn.Module, head: LMHead | None, vocab: int, batch: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
    """``[N, H]`` hidden states (for ``head``) or ``[N, V]`` logits (the model's own, without a head) at
    the positions that predict a response token, in :func:`select_response_tokens` order; on the
    model's device."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    if head is not None:
        states, _ = select_response_tokens(hidden_states(model, ids, mask), labels)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :vocab]
        states, _ = select_response_tokens(logits, labels)
    return states


def _log_probs(head: LMHead | None, states: torch.Tensor, device: torch.device) -> torch.Tensor:
    logits = head.logits(states) if head is not None else states
    return F.log_softmax(logits.float(), dim=-1).to(device)


@torch.no_grad()
def joint_batch_signals(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], *,
                        student_head: LMHead | None, teacher_head: LMHead | None, vocab: int,
                        chunk_size: int) -> dict[str, Any]:
    """``{"teacher_kl": [...], "teacher_entropy": [...]}``, one value per row of the collated ``batch``
    (NaN for a row without response token). ``*_head``: the chunked LM head of each model, or None
    to use that model's own logits. Each model runs on its own device; the values are computed on
    the student's, summed per row in float64."""
    device = next(student.parameters()).device
    labels = batch["labels"].to(device)
    n_rows, length = labels.shape
    rows = torch.arange(n_rows, device=device)[:, None].expand(n_rows, length)
    row_of = select_response_tokens(rows[..., None], labels)[0][:, 0]
    s_states = _response_states(student, student_head, vocab, batch)
    t_states = _response_states(teacher, teacher_head, vocab, batch)
    kl_sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    ent_sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    for start in range(0, row_of.shape[0], chunk_size):
        end = start + chunk_size
        s_logp = _log_probs(student_head, s_states[start:end], device)
        t_logp = _log_probs(teacher_head, t_states[start:end], device)
        kl = forward_kl(s_logp, t_logp)
        entropy = -(t_logp.exp() * t_logp.clamp(min=LOG_PROB_FLOOR)).sum(-1)
        kl_sums.index_add_(0, row_of[start:end], kl.double())
        ent_sums.index_add_(0, row_of[start:end], entropy.double())
    counts = [int(c) for c in torch.bincount(row_of, minlength=n_rows)]
    return {"teacher_kl": [float(kl_sums[r]) / counts[r] if counts[r] else math.nan for r in range(n_rows)],
            "teacher_entropy": [float(ent_sums[r]) / counts[r] if counts[r] else math.nan for r in range(n_rows)]}
