"""Whether a teacher and a student can be distilled into each other, and model sizes.

- Tokenizers must agree (same token -> id mapping and the same EOS; :func:`check_tokenizers`).
- When the models' output layers differ only by padded rows beyond the tokenizer's vocabulary
  (Qwen2.5 has 151,936 rows in small models and 152,064 in large ones), both are trimmed to the
  shared size (:func:`shared_vocab_size`); any other mismatch stops with an error.
- A teacher smaller than the student is warned about (:func:`check_teacher_larger`).

Re-exported by :mod:`pocl.models`; logs under ``pocl.models``.
"""

from __future__ import annotations

import logging

from torch import nn

from pocl.errors import ModelError
from pocl.model_head import output_rows

log = logging.getLogger("pocl.models")

__all__ = ["check_teacher_larger", "check_tokenizers", "count_parameters", "human_count", "shared_vocab_size"]


def human_count(n: int) -> str:
    """A count for the log: ``1234567`` -> ``1.23M``."""
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_teacher_larger(teacher: nn.Module, student: nn.Module) -> bool:
    """Warn (and return False) when the teacher has fewer parameters than the student: the two paths may
    have been given the wrong way round (--teacher and --student swapped)."""
    nt, ns = count_parameters(teacher), count_parameters(student)
    if nt >= ns:
        return True
    log.warning("the teacher has fewer parameters than the student (%s < %s: teacher %s, student %s); are "
                "--teacher and --student swapped? pocl distils the teacher into the student as given",
                human_count(nt), human_count(ns), getattr(teacher, "name_or_path", "") or "?",
                getattr(student, "name_or_path", "") or "?")
    return False


def check_tokenizers(teacher_tok, student_tok, *, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Raise ModelError unless both tokenizers map the same tokens to the same ids with the same EOS."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = [t for t in tv if t not in sv][:5]
        only_s = [t for t in sv if t not in tv][:5]
        moved = [t for t in tv if t in sv and tv[t] != sv[t]][:5]
        detail = []
        if only_t:
            detail.append(f"only in the {teacher_name}'s: {only_t}")
        if only_s:
            detail.append(f"only in the {student_name}'s: {only_s}")
        if moved:
            detail.append(f"different ids for {moved}")
        raise ModelError(
            f"the {teacher_name} and {student_name} tokenizers differ ({len(tv)} vs {len(sv)} tokens; "
            + "; ".join(detail) + "). White-box distillation compares distributions token by token, so both "
            "models must share one tokenizer.")
    if teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise ModelError(f"EOS differs: {teacher_name} {teacher_tok.eos_token!r} (id {teacher_tok.eos_token_id}) vs "
                         f"{student_name} {student_tok.eos_token!r} (id {student_tok.eos_token_id})")


def shared_vocab_size(teacher: nn.Module | None, student: nn.Module, tokenizer) -> int:
    """The number of output rows both models share; every token of the tokenizer must be inside it.
    Also warns when the teacher is the smaller model (:func:`check_teacher_larger`)."""
    n_tok = len(tokenizer)
    rows_s = output_rows(student)
    if teacher is None:
        if rows_s < n_tok:
            raise ModelError(f"the student's output layer has {rows_s} rows but the tokenizer has {n_tok} tokens")
        return rows_s
    check_teacher_larger(teacher, student)
    rows_t = output_rows(teacher)
    shared = min(rows_t, rows_s)
    if shared < n_tok:
        raise ModelError(
            f"vocabulary mismatch: teacher output layer {rows_t} rows, student {rows_s}, tokenizer {n_tok} tokens. "
            "Only padded rows beyond the tokenizer's vocabulary can be trimmed; these models do not share a "
            "vocabulary.")
    if rows_t != rows_s:
        log.warning("teacher has %d output rows and student %d; both are trimmed to the shared %d "
                    "(the extra rows are padding beyond the tokenizer's %d tokens)", rows_t, rows_s, shared, n_tok)
    return shared
