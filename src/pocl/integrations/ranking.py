"""Rank a Hugging Face dataset with the initial student, with pocl's measurer, into the ranking file
that :class:`pocl.integrations.PoclCurriculum` reads.

The rows are read as pocl reads a data file (:func:`pocl.data.load_records`: ``instruction``,
``input``/``context``, ``output``/``response``, ``prompt``; every other column is kept aside, so a
``messages`` column for a TRL trainer may sit next to them), with the id rule of
:mod:`pocl.integrations.sampler`. The ranking is pocl's own (:func:`pocl.curriculum.load_or_compute_ranking`):
stamped, reused while the student, data and settings are the same, resumable. The same file comes
from ``dataset.save_to_disk(DIR)`` and ``pocl rank --train-file DIR --student S --ranking-file PATH``
with the same data settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pocl.config import CurriculumConfig
from pocl.errors import ConfigError, DataError

__all__ = ["dataset_records", "rank_dataset"]


def dataset_records(dataset: Any, *, id_field: str | None = None) -> list:
    """The rows of ``dataset`` as pocl :class:`pocl.data.Record` objects (DataError naming the row and
    field of a bad row; ids as :func:`pocl.integrations.dataset_ids`)."""
    from pocl.data.readers import RowError
    from pocl.data.records import parse_row

    records, seen = [], {}
    for index, row in enumerate(dataset):
        try:
            record = parse_row(row, index=index, line=index + 1, source="<dataset>", id_key=id_field or "id",
                               explicit_id=id_field is not None, require_output=True)
        except RowError as exc:
            raise DataError(exc.reason, path="<dataset>", line=index + 1, field=exc.field) from None
        if record.id in seen:
            raise DataError(f"duplicate id '{record.id}' (also row {seen[record.id]})", path="<dataset>",
                            line=index + 1, field=id_field or "id")
        seen[record.id] = index + 1
        records.append(record)
    if not records:
        raise DataError("no rows: the dataset is empty", path="<dataset>")
    return records


def rank_dataset(dataset: Any, path: str | os.PathLike, *, student, tokenizer, student_path: str | None = None,
                 id_field: str | None = None, config: CurriculumConfig | None = None, template: str = "alpaca",
                 max_length: int = 512, max_prompt_length: int = 256, truncation_side: str = "left",
                 use_prompt_field: bool | None = None, seed: int = 0, device=None,
                 progress: bool = False) -> tuple[list, dict[str, Any]]:
    """Rank ``dataset`` easy -> hard with the initial ``student`` (a model, or a function that loads it)
    and write the ranking to ``path`` (``ranking.jsonl`` plus ``ranking.meta.json``); reuse the file when
    its stamps still match. ``config``: the measurer settings (:class:`pocl.config.CurriculumConfig`:
    measurer, rrf_k, rank_* decoding; default pocl's: RRF of ROUGE-L and loss, k = 60).
    ``student_path``: the folder or hub name the student came from (part of its fingerprint). The data
    settings (template, lengths) are those of ``pocl distill``'s ``data:`` section.
    Returns ``(ranking, info)`` as :func:`pocl.curriculum.load_or_compute_ranking`."""
    from pocl.config import DataConfig
    from pocl.curriculum import (
        load_or_compute_ranking,
        measurer_needs_teacher,
        ranking_data_settings,
    )
    from pocl.fingerprints import model_fingerprint

    config = config or CurriculumConfig(curriculum="pocl")
    if measurer_needs_teacher(config.measurer):
        raise ConfigError(f"measurer {config.measurer} needs the teacher: use `pocl rank --teacher`, or a "
                          "student-only measurer (rrf, rouge, loss, random, reverse)")
    data = DataConfig(template=template, max_length=max_length, max_prompt_length=max_prompt_length,
                      truncation_side=truncation_side, use_prompt_field=use_prompt_field)
    records = dataset_records(dataset, id_field=id_field)
    model = student
    fingerprint = model_fingerprint(student_path, None if callable(student) and not hasattr(student, "config")
                                    else student)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return load_or_compute_ranking(path, records=records, tokenizer=tokenizer, model=model,
                                   model_fingerprint=fingerprint, curriculum=config,
                                   data_settings=ranking_data_settings(data), seed=seed, progress=progress,
                                   device=device)
