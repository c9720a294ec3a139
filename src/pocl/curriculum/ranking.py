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
checksum is never used.

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

from .difficulty import (RankedSample, SampleDifficulty, difficulties_from_ranking, measure_difficulty, measurer_needs,
                         rank_samples, ranking_decoding)
from .ranking_file import FORMAT_VERSION, meta_path, read_ranking, read_ranking_with_hashes, write_ranking
from .ranking_journal import SIGNAL_WORD, Distributed, PartialMeasurement, drop_leftover_partial, partial_path
from .ranking_stamps import (GENERATION_SEED, describe_changes, order_inputs, ranking_data_settings, resolve_settings,
                             signals_inputs, why_signals_differ)

log = logging.getLogger("pocl.curriculum")

__all__ = ["FORMAT_VERSION", "GENERATION_SEED", "meta_path", "partial_path", "ranking_data_settings", "signals_inputs",
           "order_inputs", "write_ranking", "read_ranking", "load_or_compute_ranking",
           "ranked_ids", "ranking_path", "prepare_curriculum"]


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
                            device=None) -> tuple[list[RankedSample], dict[str, Any]]:
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
    use :data:`GENERATION_SEED`. ``device``: measure there (the model is moved back afterwards).

    Batches measured before an interruption are taken from ``ranking.partial.jsonl``
    (:func:`partial_path`) when its stamp matches; only the others are measured.

    Returns ``(ranking, info)``; ``info`` has ``reused`` (nothing was measured), ``action``
    (reused, reranked, completed, computed), ``reason``, ``seconds``, ``measured`` (signals measured
    now), ``batches`` (per measured signal: batches ``measured`` now and ``reused`` from the partial
    file), ``path`` and ``meta``.
    """
    t0 = time.perf_counter()
    path = Path(path)
    records = list(records)
    if not records:
        raise ConfigError("nothing to rank: no training samples")
    # The measurer's answers must fit the student's context after the longest prompt: a default
    # --rank-max-new-tokens is clipped (one warning), a given one that cannot fit is refused here,
    # before anything is read or written (`pocl distill` has done this with the run's config already).
    from pocl.context_length import fit_ranking_curriculum

    curriculum = fit_ranking_curriculum(curriculum, model, data_settings)
    dist = Distributed()
    dist.barrier()  # every process decides on the same file state (none is written before the gather)
    needs = measurer_needs(curriculum.measurer)
    settings, template = resolve_settings(data_settings, tokenizer)
    hashes = sample_hashes(records, template)
    new_hashes = {r.id: h for r, h in zip(records, hashes)}
    sig_in = signals_inputs(records=records, tokenizer=tokenizer, model_fingerprint=model_fingerprint,
                            curriculum=curriculum, data_settings=settings, _hashes=hashes)
    ord_in = order_inputs(curriculum, seed)
    sig_hash, ord_hash = Stamp(sig_in).hash, Stamp(ord_in).hash

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
    to_measure = set(needs)
    previous: dict[str, SampleDifficulty] = {}
    timings: dict[str, float] = {}
    if stored is not None:
        have = set(meta.get("signals") or [])
        missing = needs - have
        old_timings = dict(meta.get("timings") or {})
        if not missing and meta.get("order_hash") == ord_hash:
            why = f"reusing {path}: same student, data and settings"
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
            timings = {k: v for k, v in old_timings.items() if k in ("loss_seconds", "generate_seconds")}
            timings["rank_seconds"] = time.perf_counter() - t1
            out = dist.write(path, ranking, {**base_meta, "timings": timings}, new_hashes)
            drop_leftover_partial(path, sig_hash, dist)
            return ranking, info("reranked", why, (), out)
        to_measure = set(missing)
        previous = {d.id: d for d in difficulties_from_ranking(stored)}
        timings = {f"{s}_seconds": old_timings[f"{s}_seconds"] for s in ("loss", "generate")
                   if f"{s}_seconds" in old_timings}
        made_by = (meta.get("order_inputs") or {}).get("measurer")
        reason = (f"{path} has no {' and '.join(sorted(missing))} signal (it was made for measurer "
                  f"'{made_by}'); measuring only that")
        action = "completed"
    else:
        action = "computed"
    log.info("ranking: measuring %s: %s", " and ".join(sorted(to_measure)) or "nothing", reason)

    difficulties = [previous.get(r.id) or SampleDifficulty(r.id) for r in records]
    batches: dict[str, dict[str, int]] = {}
    journal = None
    if to_measure:
        journal = PartialMeasurement(partial_path(path), sig_hash, dist)
        if journal.note:
            log.warning("ranking: %s", journal.note)
        stored_counts = {s: journal.stored_batches(s) for s in to_measure if journal.stored_batches(s)}
        if stored_counts:
            log.info("ranking: resuming an interrupted measurement from %s (%s already done)", journal.path,
                     ", ".join(f"{n} {SIGNAL_WORD[s]} batches" for s, n in sorted(stored_counts.items())))
        try:
            student = _resolve_model(model)
            original_device = None
            if device is not None:
                import torch

                original_device = next(student.parameters()).device
                student.to(torch.device(device))
            try:
                measured = measure_difficulty(
                    student, tokenizer, records, template=template, max_length=settings["max_length"],
                    max_prompt_length=settings["max_prompt_length"], truncation_side=settings["truncation_side"],
                    decoding=ranking_decoding(curriculum), batch_size=curriculum.rank_batch_size,
                    need_rouge="rouge_l" in to_measure, need_loss="loss" in to_measure, seed=GENERATION_SEED,
                    progress=progress and dist.is_main, timings=timings, shard=(dist.rank, dist.world),
                    journal=journal)
            finally:
                if original_device is not None:
                    student.to(original_device)
        finally:
            journal.close()
        # With the journal every process received every batch of every round: nothing left to gather.
        for d, m in zip(difficulties, measured):
            if "loss" in to_measure:
                d.loss = m.loss
            if "rouge_l" in to_measure:
                d.rouge_l, d.generation = m.rouge_l, m.generation
        batches = {s: {"measured": journal.measured[s], "reused": journal.reused[s]} for s in sorted(to_measure)}
        resumed = journal.summary(to_measure)
        if resumed:
            reason += f"; resumed an interrupted measurement ({resumed} were already done)"
    t1 = time.perf_counter()
    ranking = rank_samples(difficulties, curriculum.measurer, k=curriculum.rrf_k, seed=seed)
    timings["rank_seconds"] = time.perf_counter() - t1
    out = dist.write(path, ranking, {**base_meta, "timings": timings}, new_hashes)
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
                       device=None, max_steps_per_stage: int | None = None):
    """Ranking plus Baby Step stages for a :class:`pocl.config.DistillConfig` with ``curriculum: pocl``.

    Calls :func:`load_or_compute_ranking` (file :func:`ranking_path`, tokenisation settings of
    ``config.data``, seed ``config.train.seed``) and then
    :func:`pocl.curriculum.schedule.baby_step_stages` with ``base_skew = config.loss.skew``.
    Returns ``(stages, ranking, info)``.
    """
    from .schedule import baby_step_stages

    ranking, info = load_or_compute_ranking(
        ranking_path(config), records=records, tokenizer=tokenizer, model=model,
        model_fingerprint=model_fingerprint, curriculum=config.curriculum,
        data_settings=ranking_data_settings(config.data), seed=config.train.seed,
        progress=config.train.progress, device=device)
    stages = baby_step_stages(ranked_ids(ranking), config.curriculum, base_skew=config.loss.skew,
                              max_steps_per_stage=max_steps_per_stage)
    return stages, ranking, info
