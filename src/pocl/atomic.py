"""Atomic file writes: the data goes to a temporary file in the same folder, is flushed and fsynced,
and then replaces ``path`` in one ``os.replace``; a reader sees the old file or the new one, never a
part of either. A failed write leaves the previous file, if any, unchanged and no temporary file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, make_parents: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing (``mode`` "w": text, UTF-8; "wb": bytes); when
    the block ends without an exception, the file is flushed, fsynced and moved onto ``path``. With an
    exception (Ctrl-C included) ``path`` is left as it was. ``make_parents``: create the missing folders
    above ``path`` first. Errors (OSError) are the caller's to report."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb' (got {mode!r})")
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") if mode == "wb" else open(tmp, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str, *, make_parents: bool = False) -> None:
    """Write ``data`` (bytes; or text, written as UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", make_parents=make_parents) as fh:
        fh.write(data)
