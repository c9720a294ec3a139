"""The ranking file format: ``ranking.jsonl`` (one line per sample, easiest first) and its stamped
``ranking.meta.json`` (format version, stamps, counts, sha256 and size of the ``.jsonl``): a stamped file
(:class:`pocl.artifacts.StampedFile`, written atomically, the metadata last, and checked on reading),
plus the checks of the line structure. Lines hold the teacher signals (``teacher_kl``,
``teacher_entropy`` and their ranks) only when the ranking has them, so the files of the
student-only measurers are what they were before those signals existed, and older files still read.
The stamps themselves are made in :mod:`pocl.curriculum.ranking_stamps`; see
:mod:`pocl.curriculum.ranking` for the reuse rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocl.artifacts import StampedFile
from pocl.errors import CheckpointError

from .difficulty import SIGNALS, STUDENT_SIGNALS, TEACHER_SIGNALS, RankedSample

__all__ = ["FORMAT", "FORMAT_VERSION", "LINE_KEYS", "TEACHER_KEYS", "meta_path", "read_ranking",
           "read_ranking_with_hashes", "write_ranking"]


FORMAT = "pocl-ranking"
FORMAT_VERSION = 1

LINE_KEYS = ("id", "rank", "score", "rouge_l", "loss", "rouge_rank", "loss_rank", "generation")
#: Optional keys of a line: written (on every line) only when the ranking holds a teacher signal.
TEACHER_KEYS = ("teacher_kl", "teacher_entropy", "teacher_kl_rank", "teacher_entropy_rank")

def _file(path: str | os.PathLike) -> StampedFile:
    """The ranking at ``path`` as a stamped file (:class:`pocl.artifacts.StampedFile`)."""
    return StampedFile(path, format=FORMAT, version=FORMAT_VERSION, label="the ranking file")


def meta_path(path: str | os.PathLike) -> Path:
    """``ranking.jsonl`` -> ``ranking.meta.json`` (next to it)."""
    return _file(path).meta_path


def write_ranking(path: str | os.PathLike, ranking: Sequence[RankedSample], meta: dict[str, Any],
                  sample_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``ranking`` (easiest first) and its metadata; returns the metadata as written.

    ``meta`` supplies the stamps (signals_hash, order_hash and their inputs, timings ...); format,
    counts, checksum and version are added here.
    """
    with_teacher = any(getattr(r, s) is not None for r in ranking for s in TEACHER_SIGNALS)
    keys = LINE_KEYS[:-1] + TEACHER_KEYS + LINE_KEYS[-1:] if with_teacher else LINE_KEYS
    lines = []
    for r in ranking:
        row = {k: getattr(r, k) for k in keys}
        if sample_hashes is not None:
            row["sample_hash"] = sample_hashes.get(r.id)
        lines.append(json.dumps(row, ensure_ascii=False))
    blob = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    signals = [s for s in SIGNALS if ranking and all(getattr(r, s) is not None for r in ranking)]
    counted = SIGNALS if with_teacher else STUDENT_SIGNALS
    counts = {"samples": len(ranking), **{f"with_{s}": sum(getattr(r, s) is not None for r in ranking)
                                          for s in counted}}
    return _file(path).write(blob, {**meta, "signals": signals, "counts": counts})


def read_ranking(path: str | os.PathLike) -> tuple[list[RankedSample], dict[str, Any]]:
    """Read a ranking file and its metadata, checking the checksum and the line structure.

    Raises :class:`CheckpointError` when a file is missing, truncated, edited or malformed.
    """
    ranking, meta, _ = read_ranking_with_hashes(Path(path))
    return ranking, meta


def read_ranking_with_hashes(path: Path) -> tuple[list[RankedSample], dict[str, Any], dict[str, str]]:
    """:func:`read_ranking` plus the sample hash stored on each line (``{id: hash}``; lines without one
    are left out)."""
    stored = _file(path)
    try:
        blob, meta = stored.read()
    except FileNotFoundError:
        raise CheckpointError(f"no ranking file at {path}") from None
    corrupt = stored.corrupt
    ranking: list[RankedSample] = []
    hashes: dict[str, str] = {}
    for n, line in enumerate(blob.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            sample = RankedSample(**{k: row.get(k) for k in LINE_KEYS + TEACHER_KEYS})
        except (ValueError, TypeError) as exc:
            raise corrupt(f"line {n} is not a ranking entry ({exc})") from None
        if sample.rank != n or not isinstance(sample.id, str):
            raise corrupt(f"line {n} has rank {sample.rank!r} and id {sample.id!r}")
        if row.get("sample_hash"):
            hashes[sample.id] = row["sample_hash"]
        ranking.append(sample)
    if len(ranking) != (meta.get("counts") or {}).get("samples"):
        raise corrupt(f"{len(ranking)} lines, the metadata says {(meta.get('counts') or {}).get('samples')}")
    return ranking, meta, hashes
