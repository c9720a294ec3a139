"""The ranking file format: ``ranking.jsonl`` (one line per sample, easiest first) and its stamped
``ranking.meta.json`` (format version, stamps, counts, sha256 and size of the ``.jsonl``), both written
atomically (the metadata last), and the reader that checks the checksum and the line structure.
The stamps themselves are made in :mod:`pocl.curriculum.ranking_stamps`; see
:mod:`pocl.curriculum.ranking` for the reuse rules.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocl._version import __version__
from pocl.atomic import atomic_write
from pocl.errors import CheckpointError
from pocl.fingerprints import sha256_bytes

from .difficulty import SIGNALS, RankedSample

__all__ = ["FORMAT", "FORMAT_VERSION", "LINE_KEYS", "meta_path", "read_ranking", "read_ranking_with_hashes",
           "write_atomically", "write_ranking"]


FORMAT = "pocl-ranking"
FORMAT_VERSION = 1

LINE_KEYS = ("id", "rank", "score", "rouge_l", "loss", "rouge_rank", "loss_rank", "generation")

# ------------------------------------------------------------------------------------------- stamps
def meta_path(path: str | os.PathLike) -> Path:
    """``ranking.jsonl`` -> ``ranking.meta.json`` (next to it)."""
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".meta.json")

def write_atomically(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc} (errno {exc.errno}); the previous "
                              f"file, if any, is unchanged") from exc


def write_ranking(path: str | os.PathLike, ranking: Sequence[RankedSample], meta: dict[str, Any],
                  sample_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``ranking`` (easiest first) and its metadata; returns the metadata as written.

    ``meta`` supplies the stamps (signals_hash, order_hash and their inputs, timings ...); format,
    counts, checksum and version are added here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in ranking:
        row = {k: getattr(r, k) for k in LINE_KEYS}
        if sample_hashes is not None:
            row["sample_hash"] = sample_hashes.get(r.id)
        lines.append(json.dumps(row, ensure_ascii=False))
    blob = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    signals = [s for s in SIGNALS if ranking and all(getattr(r, s) is not None for r in ranking)]
    full = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pocl_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "signals": signals,
        "counts": {"samples": len(ranking), **{f"with_{s}": sum(getattr(r, s) is not None for r in ranking)
                                               for s in SIGNALS}},
        "jsonl": {"name": path.name, "sha256": sha256_bytes(blob), "bytes": len(blob)},
    }
    write_atomically(path, blob)
    write_atomically(meta_path(path), (json.dumps(full, indent=2, sort_keys=False, default=str) + "\n").encode())
    return full


def read_ranking(path: str | os.PathLike) -> tuple[list[RankedSample], dict[str, Any]]:
    """Read a ranking file and its metadata, checking the checksum and the line structure.

    Raises :class:`CheckpointError` when a file is missing, truncated, edited or malformed.
    """
    ranking, meta, _ = read_ranking_with_hashes(Path(path))
    return ranking, meta


def read_ranking_with_hashes(path: Path) -> tuple[list[RankedSample], dict[str, Any], dict[str, str]]:

    def corrupt(detail: str) -> CheckpointError:
        return CheckpointError(f"the ranking file {path} is corrupt: {detail}")

    if not path.is_file():
        raise CheckpointError(f"no ranking file at {path}")
    mpath = meta_path(path)
    if not mpath.is_file():
        raise corrupt(f"its metadata {mpath.name} is missing (the write did not finish, or the file was not "
                      "written by pocl)")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise corrupt(f"its metadata {mpath.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise corrupt(f"{mpath.name} is not the metadata of a pocl ranking")
    if meta.get("format_version") != FORMAT_VERSION:
        raise corrupt(f"format version {meta.get('format_version')}, this pocl reads {FORMAT_VERSION}")
    blob = path.read_bytes()
    expected = meta.get("jsonl") or {}
    if len(blob) != expected.get("bytes"):
        raise corrupt(f"{len(blob)} bytes, the metadata says {expected.get('bytes')} (truncated or changed)")
    if sha256_bytes(blob) != expected.get("sha256"):
        raise corrupt("its sha256 does not match the metadata (the file was changed)")
    ranking: list[RankedSample] = []
    hashes: dict[str, str] = {}
    for n, line in enumerate(blob.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            sample = RankedSample(**{k: row.get(k) for k in LINE_KEYS})
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
