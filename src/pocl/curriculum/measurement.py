"""The two signals the difficulty measurer takes from the *initial* student for every training sample
(POCL spec, section 2; the paper uses the student alone):

* **loss** -- the student's mean token cross-entropy on the reference response under teacher
  forcing, with the tokenisation and masking of training (:func:`pocl.data.tokenize_records`:
  prompt masked, EOS appended as a target). Samples are batched by length; logits are computed
  from the hidden states at the response positions only, chunk by chunk through the LM head, so a
  ``[B, L, V]`` logits tensor never exists.
* **ROUGE-L** -- the student answers each prompt (near-greedy sampling: temperature 0.01, top-p 1,
  no top-k, ``no_repeat_ngram_size=6``, at most 256 new tokens) and the answer is scored against
  the reference(s) with :func:`pocl.evaluation.metrics.rouge_l` (F-measure x 100, Porter stemmer,
  max over references).

:func:`measure_difficulty` runs both passes, and, given a teacher, the joint student + teacher pass
of the two teacher signals (``teacher_kl``, ``teacher_entropy``; :mod:`pocl.curriculum.teacher_signals`,
an extension). The measurers that turn the signals into an order are in
:mod:`pocl.curriculum.difficulty`.

**Resumable measurement.** With a ``journal`` (see :class:`BatchJournal`; the ranking file's
``ranking.partial.jsonl`` in :mod:`pocl.curriculum.ranking`), every finished batch of either pass is
handed to the journal, which persists it, and batches the journal already holds are not measured
again: a pass killed after k batches resumes with batch k + 1. Batches keep their composition and
seed, so a resumed pass gives exactly the values of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pocl.data import Record, collate, get_template, group_by_length, tokenize_prompts, tokenize_records
from pocl.data.templates import PromptTemplate
from pocl.errors import ConfigError, DataError, ModelError
from pocl.evaluation.metrics import rouge_l
from pocl.generation import DecodingConfig, generate, length_sorted_batches
from pocl.losses.engine import select_response_tokens
from pocl.models import LMHead, check_fused_head, hidden_states, output_rows

from .teacher_signals import TEACHER_PASS, joint_batch_signals, shared_rows

log = logging.getLogger("pocl.curriculum")

__all__ = ["BatchJournal", "SampleDifficulty", "gather_difficulties", "measure_difficulty"]


@dataclasses.dataclass
class SampleDifficulty:
    """The signals of one sample (None: not measured). ``loss``, ``teacher_kl`` and ``teacher_entropy``
    are NaN when the sample has no target token."""

    id: str
    rouge_l: float | None = None
    loss: float | None = None
    generation: str | None = None
    teacher_kl: float | None = None
    teacher_entropy: float | None = None


# ------------------------------------------------------------------------------------------- signals
class _Bar:
    """The progress of a ranking pass (pocl.progress): a tqdm bar with ETA on a terminal, else plain log
    lines; ``enabled`` False (--no-progress) turns the bar off, not the lines. Nothing for no samples."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if total > 0:
            from pocl.progress import make_progress

            self.bar = make_progress(total, desc=desc, unit="sample", bar=enabled, leave=False, logger=log)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BatchJournal(Protocol):
    """Where the measurer keeps finished batches so that an interrupted pass can resume.

    A batch is identified by the signal (the pass: ``"loss"``, ``"rouge_l"`` or ``"teacher"``), its
    index ``b`` in the single-process batch plan of that pass and the ids of its samples. Its
    ``payload`` is ``{"loss": [...]}``, ``{"rouge_l": [...], "generation": [...]}`` or
    ``{"teacher_kl": [...], "teacher_entropy": [...]}`` (one value per sample of the batch, in batch
    order) plus ``"seconds"``.

    Sharded passes (``shard=(rank, world)``) go in rounds of ``world`` consecutive batches, batch
    ``start + rank`` of each round on process ``rank``; every process calls :meth:`commit` once per
    round (with None when it has no batch left), so an implementation may gather there.
    """

    def lookup(self, signal: str, batch: int, ids: Sequence[str]) -> dict[str, Any] | None:
        """The stored payload of this batch, or None when it must be measured."""

    def commit(self, signal: str, item: tuple[int, list[str], dict[str, Any], bool] | None
               ) -> list[tuple[int, dict[str, Any]]]:
        """Record this process's ``(batch, ids, payload, fresh)`` of one round (``fresh``: measured
        now rather than looked up); return ``(batch, payload)`` of every batch of the round known
        to this process (all processes' batches when the implementation gathers)."""

    def stored_seconds(self, signal: str) -> float:
        """Measurement seconds of the batches that were looked up instead of measured."""


def _run_batches(signal: str, plan: Sequence[tuple[int, Sequence[int]]], ids_of: Sequence[str],
                 compute: Callable[[int, Sequence[int]], dict[str, Any]], *, shard: tuple[int, int],
                 journal: BatchJournal | None, bar: "_Bar") -> dict[int, dict[str, Any]]:
    """Payloads by batch index: this process's share of ``plan`` measured with ``compute(b, indices)``,
    or, with a journal, looked up there when already done and committed round by round."""
    rank, world = shard
    results: dict[int, dict[str, Any]] = {}
    if journal is None:
        for b, idx in plan:
            if b % world == rank:
                results[b] = compute(b, idx)
                bar.update(len(idx))
        return results
    for start in range(0, len(plan), world):
        mine = None
        if start + rank < len(plan):
            b, idx = plan[start + rank]
            ids = [ids_of[i] for i in idx]
            payload = journal.lookup(signal, b, ids)
            fresh = payload is None
            if fresh:
                t0 = time.perf_counter()
                payload = compute(b, idx)
                payload["seconds"] = time.perf_counter() - t0
            mine = (b, ids, payload, fresh)
        done = journal.commit(signal, mine)
        for b, payload in done:
            results[b] = payload
        bar.update(sum(len(plan[b][1]) for b, _ in done))
    return results


def _resolve_fused(model: nn.Module, vocab: int, fused: bool | None) -> LMHead | None:
    """The LM head for the chunked path, or None to use the model's own logits."""
    if fused is False:
        return None
    try:
        head = LMHead.from_model(model, vocab)
        ok, diff = check_fused_head(model, head)
    except ModelError as exc:
        ok, diff, head = False, str(exc), None
    if not ok:
        if fused:
            raise ModelError(f"logits computed from hidden states do not match the model's own logits ({diff})")
        log.warning("difficulty: the output layer cannot be reproduced from hidden states (%s); using the "
                    "model's full logits (more memory)", diff)
        return None
    return head


@torch.no_grad()
def _response_losses(model: nn.Module, tokenizer, records: Sequence[Record], template: PromptTemplate, *,
                     max_length: int, max_prompt_length: int, truncation_side: str, batch_size: int,
                     chunk_size: int, fused: bool | None, progress: bool,
                     shard: tuple[int, int] = (0, 1), journal: BatchJournal | None = None) -> list[float | None]:
    data = tokenize_records(records, tokenizer, template, max_length=max_length,
                            max_prompt_length=max_prompt_length, truncation_side=truncation_side,
                            context_targets=False)  # a conversation: its final assistant turn
    device = next(model.parameters()).device
    vocab = output_rows(model)
    head = _resolve_fused(model, vocab, fused)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float | None] = [None] * len(data)
    rank, world = shard
    plan = list(enumerate(group_by_length(data.lengths, batch_size)))
    mine = plan if journal is not None else [(b, batch) for b, batch in plan if b % world == rank]
    bar = _Bar(sum(len(b) for _, b in mine), "difficulty: loss", progress)

    def compute(b: int, batch_idx: Sequence[int]) -> dict[str, Any]:
        batch = collate([data[i] for i in batch_idx], pad)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        n_rows, length = labels.shape
        # Row of every selected position, in the order select_response_tokens returns them.
        rows = torch.arange(n_rows, device=device)[:, None].expand(n_rows, length)
        if head is not None:
            states, targets = select_response_tokens(hidden_states(model, ids, mask), labels)
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :vocab]
            states, targets = select_response_tokens(logits, labels)
        row_of, _ = select_response_tokens(rows[..., None], labels)
        row_of = row_of[:, 0]
        sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
        for start in range(0, targets.shape[0], chunk_size):
            end = start + chunk_size
            chunk = head.logits(states[start:end]) if head is not None else states[start:end]
            ce = F.cross_entropy(chunk.float(), targets[start:end], reduction="none")
            sums.index_add_(0, row_of[start:end], ce.double())
        counts = torch.bincount(row_of, minlength=n_rows)
        return {"loss": [float(sums[row]) / int(counts[row]) if int(counts[row]) else math.nan
                         for row in range(n_rows)]}

    try:
        done = _run_batches("loss", plan, data.ids, compute, shard=shard, journal=journal, bar=bar)
    finally:
        bar.close()
    for b, payload in done.items():
        for i, value in zip(plan[b][1], payload["loss"]):
            losses[i] = value
    missing = [data[i].id for i, v in enumerate(losses) if v is not None and math.isnan(v)]
    if missing:
        log.warning("difficulty: %d samples have no response token to score (e.g. '%s'); they rank as hardest",
                    len(missing), missing[0])
    return losses


@torch.no_grad()
def _teacher_signals(student: nn.Module, teacher: nn.Module, tokenizer, records: Sequence[Record],
                     template: PromptTemplate, *, max_length: int, max_prompt_length: int, truncation_side: str,
                     batch_size: int, chunk_size: int, fused: bool | None, progress: bool,
                     shard: tuple[int, int] = (0, 1), journal: BatchJournal | None = None
                     ) -> tuple[list[float | None], list[float | None]]:
    """The joint student + teacher pass (:mod:`pocl.curriculum.teacher_signals`) with the loss pass's
    tokenisation and batch plan: ``(teacher_kl, teacher_entropy)`` in record order."""
    data = tokenize_records(records, tokenizer, template, max_length=max_length,
                            max_prompt_length=max_prompt_length, truncation_side=truncation_side,
                            context_targets=False)  # a conversation: its final assistant turn
    vocab = shared_rows(student, teacher, tokenizer)
    heads = {"student_head": _resolve_fused(student, vocab, fused),
             "teacher_head": _resolve_fused(teacher, vocab, fused)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rank, world = shard
    plan = list(enumerate(group_by_length(data.lengths, batch_size)))
    mine = plan if journal is not None else [(b, batch) for b, batch in plan if b % world == rank]
    bar = _Bar(sum(len(b) for _, b in mine), "difficulty: teacher", progress)

    def compute(b: int, batch_idx: Sequence[int]) -> dict[str, Any]:
        batch = collate([data[i] for i in batch_idx], pad)
        return joint_batch_signals(student, teacher, batch, vocab=vocab, chunk_size=chunk_size, **heads)

    try:
        done = _run_batches(TEACHER_PASS, plan, data.ids, compute, shard=shard, journal=journal, bar=bar)
    finally:
        bar.close()
    kls: list[float | None] = [None] * len(data)
    entropies: list[float | None] = [None] * len(data)
    for b, payload in done.items():
        for i, kl, ent in zip(plan[b][1], payload["teacher_kl"], payload["teacher_entropy"]):
            kls[i], entropies[i] = kl, ent
    missing = [data[i].id for i, v in enumerate(kls) if v is not None and math.isnan(v)]
    if missing:
        log.warning("difficulty: %d samples have no response token for the teacher signals (e.g. '%s'); they "
                    "rank as hardest", len(missing), missing[0])
    return kls, entropies


def _rouge_signal(model: nn.Module, tokenizer, records: Sequence[Record], template: PromptTemplate, *,
                  max_prompt_length: int, truncation_side: str, decoding: DecodingConfig, batch_size: int,
                  seed: int, progress: bool, shard: tuple[int, int] = (0, 1),
                  journal: BatchJournal | None = None) -> tuple[list[float | None], list[str | None]]:
    prompts = tokenize_prompts(records, tokenizer, template, max_prompt_length=max_prompt_length,
                               truncation_side=truncation_side)
    rank, world = shard
    full_plan = list(enumerate(length_sorted_batches([len(p) for p in prompts], batch_size)))
    if journal is None:
        plan = [(b, batch) for b, batch in full_plan if b % world == rank]
        bar = _Bar(sum(len(b) for _, b in plan), "difficulty: generating", progress)
        try:
            gens = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed,
                            progress=bar.update, batch_plan=plan)
        finally:
            bar.close()
        texts = [g.text if g is not None else None for g in gens]
        scores = [rouge_l(text, r.references) if text is not None else None for text, r in zip(texts, records)]
        return scores, texts

    # One generate call per batch: the batch's seed depends only on its index in the plan, so the
    # answers are those of a single call over the whole plan, and each batch can be kept as it ends.
    def compute(b: int, batch_idx: Sequence[int]) -> dict[str, Any]:
        gens = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed,
                        batch_plan=[(b, batch_idx)])
        texts = [gens[i].text for i in batch_idx]
        return {"rouge_l": [rouge_l(t, records[i].references) for t, i in zip(texts, batch_idx)],
                "generation": texts}

    bar = _Bar(len(records), "difficulty: generating", progress)
    try:
        done = _run_batches("rouge_l", full_plan, [r.id for r in records], compute, shard=shard,
                            journal=journal, bar=bar)
    finally:
        bar.close()
    scores: list[float | None] = [None] * len(records)
    texts: list[str | None] = [None] * len(records)
    for b, payload in done.items():
        for i, score, text in zip(full_plan[b][1], payload["rouge_l"], payload["generation"]):
            scores[i], texts[i] = score, text
    return scores, texts


def measure_difficulty(model: nn.Module, tokenizer, records: Sequence[Record], *,
                       template: PromptTemplate | str | None = "alpaca", max_length: int, max_prompt_length: int,
                       truncation_side: str = "left", decoding: DecodingConfig, batch_size: int,
                       need_rouge: bool = True, need_loss: bool = True, seed: int = 0, progress: bool = True,
                       chunk_size: int = 1024, fused: bool | None = None,
                       timings: dict[str, float] | None = None,
                       shard: tuple[int, int] = (0, 1), journal: BatchJournal | None = None,
                       teacher: nn.Module | None = None, need_teacher: bool | None = None
                       ) -> list[SampleDifficulty]:
    """Score every record with ``model`` (the initial student); results in record order.

    ``need_loss``/``need_rouge`` choose the signals (the other stays None). ``teacher``: also the
    two teacher signals ``teacher_kl`` and ``teacher_entropy``, from one joint student + teacher
    pass (:func:`pocl.curriculum.teacher_signals.joint_batch_signals`); ``need_teacher`` (default:
    whether a teacher is given) turns that pass on or off. ``decoding`` and
    ``seed`` drive the generations; ``batch_size`` is the number of samples per forward pass for
    both signals. The model runs on its current device, in eval mode (its mode is restored).
    ``fused=None`` checks once that the chunked LM-head path reproduces the model's logits and
    falls back to the model's own logits if not (for each model of the teacher pass on its own).
    ``timings``, when given, receives ``loss_seconds``, ``teacher_seconds`` and ``generate_seconds``
    (generation plus ROUGE scoring) of the passes run.

    ``shard=(rank, world)``: measure only the batches ``b`` with ``b % world == rank`` of the
    single-process batch plan (the other samples keep None); see :func:`gather_difficulties`.

    ``journal``: keep every finished batch there and take the batches it already holds from it
    (:class:`BatchJournal`); with a journal the sharded processes exchange each round's batches
    through it, so every process returns every sample's values. ``timings`` then include the
    recorded seconds of the batches taken from the journal.
    """
    records = list(records)
    if not records:
        raise DataError("nothing to rank: no samples")
    if batch_size <= 0:
        raise ConfigError(f"batch size of the measurer must be > 0 (got {batch_size})")
    need_teacher = teacher is not None if need_teacher is None else need_teacher
    if need_teacher and teacher is None:
        raise ConfigError("the teacher signals (teacher_kl, teacher_entropy) need the teacher model; none was given")
    no_ref = [r for r in records if not r.has_output]
    if no_ref and (need_loss or need_rouge or need_teacher):
        r = no_ref[0]
        raise DataError(f"sample '{r.id}' has no reference output; ranking needs one for every sample "
                        f"({len(no_ref)} without)", path=r.source, line=r.line, field="output")
    template = template if isinstance(template, PromptTemplate) else get_template(template, tokenizer)
    timings = {} if timings is None else timings
    result = [SampleDifficulty(r.id) for r in records]
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    model.eval()
    if teacher is not None:
        teacher.eval()
    try:
        if need_loss:
            t0 = time.perf_counter()
            losses = _response_losses(model, tokenizer, records, template, max_length=max_length,
                                      max_prompt_length=max_prompt_length, truncation_side=truncation_side,
                                      batch_size=batch_size, chunk_size=chunk_size, fused=fused, progress=progress,
                                      shard=shard, journal=journal)
            timings["loss_seconds"] = time.perf_counter() - t0 + (journal.stored_seconds("loss") if journal else 0.0)
            for d, v in zip(result, losses):
                d.loss = v
            log.info("difficulty: loss of %d samples in %.1f s", len(records), timings["loss_seconds"])
        if need_teacher:
            t0 = time.perf_counter()
            kls, entropies = _teacher_signals(model, teacher, tokenizer, records, template, max_length=max_length,
                                             max_prompt_length=max_prompt_length, truncation_side=truncation_side,
                                             batch_size=batch_size, chunk_size=chunk_size, fused=fused,
                                             progress=progress, shard=shard, journal=journal)
            timings["teacher_seconds"] = (time.perf_counter() - t0
                                          + (journal.stored_seconds(TEACHER_PASS) if journal else 0.0))
            for d, kl, ent in zip(result, kls, entropies):
                d.teacher_kl, d.teacher_entropy = kl, ent
            log.info("difficulty: teacher signals of %d samples in %.1f s", len(records), timings["teacher_seconds"])
        if need_rouge:
            t0 = time.perf_counter()
            scores, texts = _rouge_signal(model, tokenizer, records, template, max_prompt_length=max_prompt_length,
                                          truncation_side=truncation_side, decoding=decoding,
                                          batch_size=batch_size, seed=seed, progress=progress, shard=shard,
                                          journal=journal)
            timings["generate_seconds"] = (time.perf_counter() - t0
                                           + (journal.stored_seconds("rouge_l") if journal else 0.0))
            for d, s, t in zip(result, scores, texts):
                d.rouge_l, d.generation = s, t
            log.info("difficulty: generated and scored %d answers in %.1f s", len(records),
                     timings["generate_seconds"])
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    return result


def gather_difficulties(parts: Sequence[Sequence[SampleDifficulty]]) -> list[SampleDifficulty]:
    """Merge the per-process results of a sharded :func:`measure_difficulty` (same record order in
    every part; each sample measured by exactly one process)."""
    merged = [SampleDifficulty(d.id) for d in parts[0]]
    for part in parts:
        if [d.id for d in part] != [d.id for d in merged]:
            raise ValueError("the processes measured different sample lists")
        for out, d in zip(merged, part):
            if d.loss is not None:
                out.loss = d.loss
            if d.rouge_l is not None:
                out.rouge_l, out.generation = d.rouge_l, d.generation
            if d.teacher_kl is not None:
                out.teacher_kl, out.teacher_entropy = d.teacher_kl, d.teacher_entropy
    return merged

