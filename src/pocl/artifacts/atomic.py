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


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """:func:`atomic_write` (folders above ``path`` created) that reports a failure (a full disk, no
    permission) as a :class:`pocl.errors.CheckpointError` naming the file; the previous file, if any,
    is unchanged."""
    from pocl.errors import CheckpointError

    try:
        atomic_write(path, data, make_parents=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc} (errno {exc.errno}); the previous "
                              f"file, if any, is unchanged") from exc


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      make_parents: bool = False) -> None:
    """Write ``value`` as JSON (UTF-8, a final newline) to ``path`` atomically."""
    import json

    atomic_write(path, json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n",
                 make_parents=make_parents)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk, where the system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
