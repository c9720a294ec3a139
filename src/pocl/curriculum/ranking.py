"""The ranking file: the measurer's output, stamped so that it is reused only when it still applies.

Two files are written, both atomically (temporary file + ``os.replace``, the metadata last)::

    ranking.jsonl       one line per sample, easiest first:
                        {"id", "rank", "score", "rouge_l", "loss", "rouge_rank", "loss_rank",
                         "generation", "sample_hash"}
    ranking.meta.json   format version, signals_hash and order_hash with their readable inputs,
                        the signals present, counts, timings, sha256 and size of the .jsonl,
                        pocl version

``signals_hash`` stamps what the signals depend on: the student (its fingerprint), the data (ids,
rendered prompts, references; tokenizer; tokenisation settings) and the generation settings.
``order_hash`` stamps how the order is made from the signals (measurer, k, and the seed for
``random``). :func:`load_or_compute_ranking` reuses a file whose two stamps match, re-ranks from
the stored signals when only the order changed, measures only the missing signal when the file
lacks one, and otherwise measures again -- logging why in plain words. A file that fails its
checksum is never used. The teacher signals (measurers ``teacher_kl``, ``teacher_entropy``,
``rrf_teacher``) carry a third stamp, ``teacher_hash`` (the teacher's fingerprint): stored with
another teacher, they are measured again while the student's signals of the file are reused.

Readers that only need the order (evaluation by difficulty) may read the ``id`` and ``rank`` keys
of the ``.jsonl`` lines; those keys are stable.

**Interrupted measurements resume.** While the signals are measured, every finished batch is
appended to ``ranking.partial.jsonl`` next to the ranking (flushed and fsynced; a header line holds
the ``signals_hash`` of the measurement, every batch line its own checksum). A run that is killed
(SIGKILL, power loss, Ctrl-C) and started again reuses the batches of a partial file whose stamp
matches, measures only the others, and deletes the partial file once the ranking is written. A
partial file with another stamp is discarded (the log says why); a line cut by a crash or damaged
later fails its checksum and only that batch is measured again. With several processes the batches
are measured in rounds (one per process), gathered after each round and appended by the main
process only, so the partial file is the same as a one-process run's.

This module holds the public entry (:func:`load_or_compute_ranking`, :func:`prepare_curriculum`); the
file format is in :mod:`pocl.curriculum.ranking_file`, the stamps in :mod:`pocl.curriculum.ranking_stamps`
and the resumable measurement in :mod:`pocl.curriculum.ranking_journal`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pocl.data import Record
from pocl.errors import CheckpointError, ConfigError
from pocl.artifacts import Stamp
from pocl.fingerprints import sample_hashes

from .difficulty import (SIGNAL_PASS, TEACHER_SIGNALS, RankedSample, SampleDifficulty, difficulties_from_ranking,
                         measure_difficulty, measurer_needs, rank_samples, ranking_decoding)
from .ranking_file import FORMAT_VERSION, meta_path, read_ranking, read_ranking_with_hashes, write_ranking
from .ranking_journal import SIGNAL_WORD, Distributed, PartialMeasurement, drop_leftover_partial, partial_path
from .ranking_stamps import (GENERATION_SEED, describe_changes, order_inputs, ranking_data_settings, resolve_settings,
                             signals_inputs, teacher_inputs, why_signals_differ, why_teacher_differs)

log = logging.getLogger("pocl.curriculum")

__all__ = ["FORMAT_VERSION", "GENERATION_SEED", "meta_path", "partial_path", "ranking_data_settings", "signals_inputs",
           "order_inputs", "write_ranking", "read_ranking", "load_or_compute_ranking",
           "ranked_ids", "ranking_path", "prepare_curriculum"]


_TEACHER = frozenset(TEACHER_SIGNALS)
_TEACHER_STAMP = ("teacher_hash", "teacher_inputs")
#: The measurement seconds kept in the metadata, per pass.
_SECONDS = ("loss_seconds", "generate_seconds", "teacher_seconds")


def _resolve_model(model):
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    if callable(model):
        loaded = model()
        if not isinstance(loaded, torch.nn.Module):
            raise ConfigError(f"the model loader returned {type(loaded).__name__}, not a torch module")
        return loaded
    raise ConfigError(f"model must be a torch module or a function that loads one (got {type(model).__name__})")


def load_or_compute_ranking(path: str | os.PathLike, *, records: Sequence[Record], tokenizer,
                            model: Any | Callable[[], Any], model_fingerprint: str, curriculum,
                            data_settings: dict[str, Any], seed: int, progress: bool = True,
                            device=None, teacher: Any | Callable[[], Any] | None = None,
                            teacher_fingerprint: str | None = None) -> tuple[list[RankedSample], dict[str, Any]]:
    """The ranking of ``records`` under ``curriculum``: reused from ``path`` when still valid, else measured.

    * both stamps match: the file is reused (nothing is run; ``model`` is not even loaded);
    * only ``order_hash`` differs (measurer, k, seed of ``random``) and the file holds the signals
      the new measurer needs: re-ranked from the stored signals (no generation, no forward pass);
    * ``signals_hash`` matches but a needed signal is absent (the file was made by a measurer that
      did not need it): only that signal is measured;
    * otherwise (no file, corrupt file, another student, other data, other settings): measured
      again. The reason is logged and returned.

    ``model`` is the initial student (an ``nn.Module``) or a zero-argument function that loads it
    (called only when something must be measured). ``model_fingerprint`` identifies it
    (:func:`pocl.fingerprints.model_fingerprint`); ``data_settings`` are the tokenisation settings
    (:func:`ranking_data_settings`). ``seed`` only matters to the ``random`` measurer; generations
    use :data:`GENERATION_SEED`. ``device``: measure there (the models are moved back afterwards).

    ``teacher`` (a module or a loader, like ``model``) and ``teacher_fingerprint`` are needed by the
    measurers that rank with a teacher signal (ConfigError naming ``curriculum.measurer`` without
    them) and ignored by the others. Teacher signals stored with another teacher (``teacher_hash``)
    are measured again; the student's signals of the file are reused.

    Batches measured before an interruption are taken from ``ranking.partial.jsonl``
    (:func:`partial_path`) when its stamp matches; only the others are measured.

    Returns ``(ranking, info)``; ``info`` has ``reused`` (nothing was measured), ``action``
    (reused, reranked, completed, computed), ``reason``, ``seconds``, ``measured`` (signals measured
    now), ``batches`` (per measured pass -- ``loss``, ``rouge_l``, ``teacher``: batches ``measured``
    now and ``reused`` from the partial file), ``path`` and ``meta``.
    """
    t0 = time.perf_counter()
    path = Path(path)
    records = list(records)
    if not records:
        raise ConfigError("nothing to rank: no training samples")
    needs = measurer_needs(curriculum.measurer)
    uses_teacher = bool(needs & _TEACHER)
    if uses_teacher and (teacher is None or not teacher_fingerprint):
        raise ConfigError(f"curriculum.measurer: '{curriculum.measurer}' ranks with the teacher's signals "
                          f"({', '.join(sorted(needs & _TEACHER))}) and no teacher was given (`pocl rank`: give "
                          "--teacher; `pocl distill --method sft` loads none); use a student-only measurer such as "
                          "rrf, or give the teacher")
    # The measurer's answers must fit the student's context after the longest prompt: a default
    # --rank-max-new-tokens is clipped (one warning), a given one that cannot fit is refused here,
    # before anything is read or written (`pocl distill` has done this with the run's config already).
    from pocl.context_length import fit_ranking_curriculum

    curriculum = fit_ranking_curriculum(curriculum, model, data_settings)
    dist = Distributed()
    dist.barrier()  # every process decides on the same file state (none is written before the gather)
    settings, template = resolve_settings(data_settings, tokenizer)
    hashes = sample_hashes(records, template)
    new_hashes = {r.id: h for r, h in zip(records, hashes)}
    sig_in = signals_inputs(records=records, tokenizer=tokenizer, model_fingerprint=model_fingerprint,
                            curriculum=curriculum, data_settings=settings, _hashes=hashes)
    ord_in = order_inputs(curriculum, seed)
    sig_hash, ord_hash = Stamp(sig_in).hash, Stamp(ord_in).hash
    tea_in = teacher_inputs(teacher_fingerprint) if uses_teacher else None
    tea_hash = Stamp(tea_in).hash if tea_in is not None else None

    stored: list[RankedSample] | None = None
    meta: dict[str, Any] = {}
    old_hashes: dict[str, str] = {}
    if not path.exists():
        reason = f"no ranking file at {path}"
    else:
        try:
            stored, meta, old_hashes = read_ranking_with_hashes(path)
        except CheckpointError as exc:
            reason = str(exc)
        else:
            if meta.get("signals_hash") != sig_hash:
                reason = why_signals_differ(meta.get("signals_inputs") or {}, sig_in, old_hashes, new_hashes)
                stored = None

    def info(action: str, why: str, measured: Sequence[str], out_meta: dict) -> dict[str, Any]:
        return {"reused": action in ("reused", "reranked"), "action": action, "reason": why,
                "seconds": time.perf_counter() - t0, "measured": sorted(measured), "path": str(path),
                "meta": out_meta, "timings": out_meta.get("timings", {}), "batches": {}}

    base_meta = {"signals_hash": sig_hash, "signals_inputs": sig_in, "order_hash": ord_hash, "order_inputs": ord_in}

    def teacher_meta(difficulties: Sequence[Any]) -> dict[str, Any]:
        """The teacher stamp of the signals written: this teacher's when it is used, else the stored one."""
        if not any(getattr(d, s) is not None for d in difficulties for s in _TEACHER):
            return {}
        if uses_teacher:
            return {"teacher_hash": tea_hash, "teacher_inputs": tea_in}
        return {k: meta[k] for k in _TEACHER_STAMP if k in meta}

    to_measure = set(needs)
    previous: dict[str, SampleDifficulty] = {}
    timings: dict[str, float] = {}
    if stored is not None:
        have = set(meta.get("signals") or [])
        stale_teacher = ""
        if uses_teacher and have & _TEACHER and meta.get("teacher_hash") != tea_hash:
            stale_teacher = why_teacher_differs(meta.get("teacher_inputs") or {}, tea_in or {})
            have -= _TEACHER
        missing = needs - have
        old_timings = dict(meta.get("timings") or {})
        if not missing and meta.get("order_hash") == ord_hash:
            why = f"reusing {path}: same student, {'teacher, ' if uses_teacher else ''}data and settings"
            log.info("ranking: %s", why)
            drop_leftover_partial(path, sig_hash, dist)
            return stored, info("reused", why, (), meta)
        if not missing:
            changes = ", ".join(describe_changes(meta.get("order_inputs") or {}, ord_in)) or "order settings changed"
            why = f"re-ranking the stored signals of {path} ({changes}); nothing is measured again"
            log.info("ranking: %s", why)
            t1 = time.perf_counter()
            ranking = rank_samples(difficulties_from_ranking(stored), curriculum.measurer, k=curriculum.rrf_k,
                                   seed=seed)
            timings = {k: v for k, v in old_timings.items() if k in _SECONDS}
            timings["rank_seconds"] = time.perf_counter() - t1
            out = dist.write(path, ranking, {**base_meta, **teacher_meta(stored), "timings": timings}, new_hashes)
            drop_leftover_partial(path, sig_hash, dist)
            return ranking, info("reranked", why, (), out)
        to_measure = set(missing)
        previous = {d.id: d for d in difficulties_from_ranking(stored)}
        timings = {k: old_timings[k] for k in _SECONDS if k in old_timings}
        made_by = (meta.get("order_inputs") or {}).get("measurer")
        absent = sorted(missing - _TEACHER) if stale_teacher else sorted(missing)
        no_signal = f"{path} has no {' and '.join(absent)} signal (it was made for measurer '{made_by}')"
        if not stale_teacher:
            reason = f"{no_signal}; measuring only that"
        elif not absent:
            reason = (f"the teacher signals of {path} were measured with another teacher: {stale_teacher}; measuring "
                      "them again (the student's signals are reused)")
        else:
            reason = f"{no_signal}, and its teacher signals are of another teacher ({stale_teacher}); measuring those"
        action = "completed"
    else:
        action = "computed"
    if to_measure & _TEACHER:
        to_measure |= _TEACHER  # one joint pass measures both
    passes = sorted({SIGNAL_PASS[s] for s in to_measure})
    log.info("ranking: measuring %s: %s", " and ".join(sorted(to_measure)) or "nothing", reason)

    difficulties = [previous.get(r.id) or SampleDifficulty(r.id) for r in records]
    batches: dict[str, dict[str, int]] = {}
    journal = None
    if to_measure:
        journal = PartialMeasurement(partial_path(path), sig_hash, dist, teacher_hash=tea_hash)
        if journal.note:
            log.warning("ranking: %s", journal.note)
        stored_counts = {s: journal.stored_batches(s) for s in passes if journal.stored_batches(s)}
        if stored_counts:
            log.info("ranking: resuming an interrupted measurement from %s (%s already done)", journal.path,
                     ", ".join(f"{n} {SIGNAL_WORD[s]} batches" for s, n in sorted(stored_counts.items())))
        try:
            student = _resolve_model(model)
            teacher_model = _resolve_model(teacher) if "teacher" in passes else None
            moved = []
            try:
                if device is not None:
                    import torch

                    for m in (student, teacher_model):
                        if m is not None:
                            moved.append((m, next(m.parameters()).device))
                            m.to(torch.device(device))
                measured = measure_difficulty(
                    student, tokenizer, records, template=template, max_length=settings["max_length"],
                    max_prompt_length=settings["max_prompt_length"], truncation_side=settings["truncation_side"],
                    decoding=ranking_decoding(curriculum), batch_size=curriculum.rank_batch_size,
                    need_rouge="rouge_l" in to_measure, need_loss="loss" in to_measure, seed=GENERATION_SEED,
                    progress=progress and dist.is_main, timings=timings, shard=(dist.rank, dist.world),
                    journal=journal, teacher=teacher_model, need_teacher=teacher_model is not None)
            finally:
                for m, original_device in moved:
                    m.to(original_device)
        finally:
            journal.close()
        # With the journal every process received every batch of every round: nothing left to gather.
        for d, m in zip(difficulties, measured):
            if "loss" in to_measure:
                d.loss = m.loss
            if "rouge_l" in to_measure:
                d.rouge_l, d.generation = m.rouge_l, m.generation
            if "teacher" in passes:
                d.teacher_kl, d.teacher_entropy = m.teacher_kl, m.teacher_entropy
        batches = {s: {"measured": journal.measured.get(s, 0), "reused": journal.reused.get(s, 0)} for s in passes}
        resumed = journal.summary(passes)
        if resumed:
            reason += f"; resumed an interrupted measurement ({resumed} were already done)"
    t1 = time.perf_counter()
    ranking = rank_samples(difficulties, curriculum.measurer, k=curriculum.rrf_k, seed=seed)
    timings["rank_seconds"] = time.perf_counter() - t1
    out = dist.write(path, ranking, {**base_meta, **teacher_meta(difficulties), "timings": timings}, new_hashes)
    if journal is not None:
        journal.finish()
    log.info("ranking: %d samples ranked by %s in %.1f s; written to %s", len(ranking), curriculum.measurer,
             time.perf_counter() - t0, path)
    result = info(action, reason, to_measure, out)
    result["batches"] = batches
    return ranking, result

def ranked_ids(ranking: Sequence[RankedSample]) -> list[str]:
    """The ids of a ranking, easiest first."""
    return [r.id for r in ranking]


def ranking_path(config) -> Path:
    """Where a run's ranking lives: ``curriculum.ranking_file``, else ``OUTPUT_DIR/ranking.jsonl``
    (the rule of both ``pocl rank`` and ``pocl distill``)."""
    return Path(config.curriculum.ranking_file or Path(config.train.output_dir) / "ranking.jsonl")


def prepare_curriculum(config, *, records: Sequence[Record], tokenizer, model, model_fingerprint: str,
                       device=None, max_steps_per_stage: int | None = None, teacher=None,
                       teacher_fingerprint: str | None = None):
    """Ranking plus Baby Step stages for a :class:`pocl.config.DistillConfig` with ``curriculum: pocl``.

    Calls :func:`load_or_compute_ranking` (file :func:`ranking_path`, tokenisation settings of
    ``config.data``, seed ``config.train.seed``) and then
    :func:`pocl.curriculum.schedule.baby_step_stages` with ``base_skew = config.loss.skew``.
    ``teacher``/``teacher_fingerprint``: for the measurers that rank with the teacher's signals.
    Returns ``(stages, ranking, info)``.
    """
    from .schedule import baby_step_stages

    ranking, info = load_or_compute_ranking(
        ranking_path(config), records=records, tokenizer=tokenizer, model=model,
        model_fingerprint=model_fingerprint, curriculum=config.curriculum,
        data_settings=ranking_data_settings(config.data), seed=config.train.seed,
        progress=config.train.progress, device=device, teacher=teacher, teacher_fingerprint=teacher_fingerprint)
    stages = baby_step_stages(ranked_ids(ranking), config.curriculum, base_skew=config.loss.skew,
                              max_steps_per_stage=max_steps_per_stage)
    return stages, ranking, info
