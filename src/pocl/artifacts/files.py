"""A stamped file: a data file (``NAME.jsonl``) and its metadata (``NAME.meta.json``) that names the
format and its version, holds the stamp (hash and readable inputs) and the size and sha256 of the
data file. The ranking and the SeqKD answers are stored this way.

Both are written atomically (:mod:`pocl.artifacts.atomic`), the data first and the metadata last, so
the metadata never vouches for a data file that is not complete. Reading checks the format, its
version, the size and the checksum, and raises :class:`pocl.errors.CheckpointError` naming the file
and what is wrong; a missing data file raises :class:`FileNotFoundError` (nothing stored yet).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from pocl._version import __version__
from pocl.errors import CheckpointError
from pocl.fingerprints import sha256_bytes

from .atomic import write_file

__all__ = ["StampedFile", "meta_path"]

#: The key of the metadata that describes the data file (kept from the first format of both files).
DATA_KEY = "jsonl"


def meta_path(path: str | os.PathLike) -> Path:
    """``NAME.jsonl`` -> ``NAME.meta.json`` (next to it; any other name gets ``.meta.json`` appended)."""
    path = Path(path)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(stem + ".meta.json")


class StampedFile:
    """The data file at ``path`` and its metadata, in the format ``format`` version ``version``.

    ``label`` names the artifact in errors (``"the ranking file"``)."""

    def __init__(self, path: str | os.PathLike, *, format: str, version: int, label: str = "the file") -> None:
        self.path = Path(path)
        self.format = format
        self.version = version
        self.label = label

    @property
    def meta_path(self) -> Path:
        """Where the metadata is (:func:`meta_path`)."""
        return meta_path(self.path)

    def write(self, blob: bytes, meta: dict[str, Any], *, sort_keys: bool = False) -> dict[str, Any]:
        """Write ``blob`` and then its metadata: format, version, pocl version, time, ``meta`` (the stamp
        and anything else the artifact records) and the data file's name, size and sha256. Returns the
        metadata as written. An OSError becomes a CheckpointError; the files before it are unchanged."""
        full = {"format": self.format, "format_version": self.version, "pocl_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **meta,
                DATA_KEY: {"name": self.path.name, "sha256": sha256_bytes(blob), "bytes": len(blob)}}
        write_file(self.path, blob)
        write_file(self.meta_path, (json.dumps(full, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())
        return full

    def corrupt(self, detail: str) -> CheckpointError:
        """The error for a damaged file: ``LABEL PATH is corrupt: DETAIL``."""
        return CheckpointError(f"{self.label} {self.path} is corrupt: {detail}")

    def read(self) -> tuple[bytes, dict[str, Any]]:
        """The data file's bytes and the metadata, both checked (format, version, size, sha256).

        Raises FileNotFoundError when the data file is missing, CheckpointError when the metadata is
        missing or unreadable, of another format or version, or the data does not match it."""
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        mpath = self.meta_path
        if not mpath.is_file():
            raise self.corrupt(f"its metadata {mpath.name} is missing (the write did not finish, or the file was not "
                               "written by pocl)")
        try:
            meta = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self.corrupt(f"its metadata {mpath.name} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != self.format:
            raise self.corrupt(f"{mpath.name} is not the metadata of a {self.format} file")
        if meta.get("format_version") != self.version:
            raise self.corrupt(f"format version {meta.get('format_version')}, this pocl reads {self.version}")
        blob = self.path.read_bytes()
        expected = meta.get(DATA_KEY) or {}
        if len(blob) != expected.get("bytes"):
            raise self.corrupt(f"{len(blob)} bytes, the metadata says {expected.get('bytes')} (truncated or changed)")
        if sha256_bytes(blob) != expected.get("sha256"):
            raise self.corrupt("its sha256 does not match the metadata (the file was changed)")
        return blob, meta
