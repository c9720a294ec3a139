"""A stamped folder: files plus a ``manifest.json`` that lists the size and sha256 of every file and
whatever the writer adds (a stamp hash and its inputs, a step). Checkpoints, ``best/``, ``final/`` and
the teacher cache's shards and top folder are stored this way.

:func:`atomic_folder_write` fills a hidden temporary folder, writes the manifest last and renames the
folder into place, so a crash at any moment leaves the previous folder or the new complete one.
Replacing an existing folder takes two renames (the old one to ``.old-NAME-*`` first);
:func:`clean_temporaries` puts an old folder back when the process died between them. Only folders
pocl wrote are ever replaced (:func:`replaceable_problem`). :func:`verify_folder` checks a manifest
against the files; a writer that stamps the folder puts the stamp in the manifest (``manifest_extra``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pocl.errors import CheckpointError
from pocl.fingerprints import sha256_file

from .atomic import fsync_dir

log = logging.getLogger("pocl.checkpoint")

__all__ = ["MANIFEST", "STEP_DIR", "atomic_folder_write", "clean_temporaries", "listing",
           "pocl_manifest", "replaceable_problem", "unlisted_files", "verify_folder", "write_manifest"]

MANIFEST = "manifest.json"
#: A trainer checkpoint's folder name (``step-00000120``) under ``checkpoints/``.
STEP_DIR = re.compile(r"^step-(\d{8})$")


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``folder/manifest.json``: the size and sha256 of every file under ``folder`` (plus
    ``extra``); returns it."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            with open(p, "rb+") as fh:  # flush file contents before the manifest vouches for them
                os.fsync(fh.fileno())
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": "pocl-checkpoint-v1", "files": files, **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    return manifest


def verify_folder(folder: Path, *, check_hashes: bool = True) -> dict[str, Any]:
    """Return the manifest of ``folder`` or raise CheckpointError saying what is wrong."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete or not a pocl checkpoint)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST}: {exc}") from None
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{folder}: file {rel} listed in the manifest is missing")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{folder}: {rel} has {size} bytes, the manifest says {info['size']} (truncated?)")
        if check_hashes and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{folder}: {rel} does not match its checksum (corrupt)")
    return manifest


# ------------------------------------------------------------------------------------ pocl's own folders
#: A trainer checkpoint's state file (a step folder holding it whose manifest was lost is still pocl's).
_TRAINER_STATE = "trainer_state.json"


def listing(entries: list[Path], base: Path | None = None, limit: int = 4) -> str:
    """``a.txt, notes/, ... and N more``: the first few of ``entries`` (relative to ``base``)."""
    names = [(p.relative_to(base).as_posix() if base is not None else p.name)
             + ("/" if p.is_dir() and not p.is_symlink() else "") for p in sorted(entries)]
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def pocl_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` when it has one that pocl wrote (format ``pocl-...`` with a file list),
    else None. Nothing is verified."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if (not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("pocl-")
            or not isinstance(manifest.get("files"), dict)):
        return None
    return manifest


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[Path]:
    """Files under ``folder`` that its manifest does not list (a user's additions), and links."""
    listed = set(manifest.get("files") or {})
    out = []
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink() or (p.is_file() and rel != MANIFEST and rel not in listed):
            out.append(p)
    return out


def replaceable_problem(target: Path) -> str | None:
    """Why :func:`atomic_folder_write` must not replace ``target`` (None: missing, empty, or pocl's own)."""
    target = Path(target)
    if target.is_symlink():
        return "it is a symbolic link"
    if not target.exists():
        return None
    if not target.is_dir():
        return "it is a file, not a folder"
    entries = list(target.iterdir())
    if not entries:
        return None
    manifest = pocl_manifest(target)
    if manifest is not None:
        extra = unlisted_files(target, manifest)
        if not extra:
            return None
        return f"it holds files pocl did not write ({listing(extra, target)})"
    if STEP_DIR.match(target.name) and target.parent.name == "checkpoints" and (target / _TRAINER_STATE).is_file():
        return None  # a trainer checkpoint whose manifest was lost: the trainer's own, skipped at resume
    return f"it is not a folder pocl wrote (no pocl {MANIFEST}; found {listing(entries)})"


def _check_replaceable(target: Path) -> None:
    """CheckpointError when ``target`` exists and is not a folder pocl wrote (:func:`replaceable_problem`)."""
    problem = replaceable_problem(target)
    if problem is not None:
        raise CheckpointError(f"refusing to replace {target}: {problem}. pocl only replaces folders it wrote; "
                              "nothing was changed")


def atomic_folder_write(target: Path, write: Callable[[Path], None], *,
                        manifest_extra: dict[str, Any] | None = None) -> Path:
    """Create ``target`` atomically: ``write(tmp)`` fills a temporary folder, a manifest is added,
    then the folder is renamed to ``target`` (replacing an older folder of the same name).

    Only a folder that pocl wrote is ever replaced (:func:`replaceable_problem`): an empty folder, one
    whose ``manifest.json`` is pocl's and lists every file in it, or a trainer checkpoint whose manifest
    was lost. Anything else (a user's folder, a pocl folder a user added files to, a file) raises
    :class:`CheckpointError` before anything is written, and nothing on disk changes."""
    target = Path(target)
    _check_replaceable(target)  # before any work: a folder pocl did not write is never replaced
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    trash = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        write_manifest(tmp, manifest_extra)
        if target.exists() or target.is_symlink():
            _check_replaceable(target)  # again: it may have appeared while ``write`` ran
            trash = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not target.exists():
            os.replace(trash, target)  # the old folder goes back under its name
        if isinstance(exc, OSError):
            in_run = target.parent.name == "checkpoints" or target.name in ("final", "best")
            state = "is the previous one" if target.exists() else "was not created"
            raise CheckpointError(
                f"cannot write {target}: {exc.strerror or exc} (errno {exc.errno}). Nothing on disk was changed: "
                f"the partial write was removed, {target.name} {state}"
                + (" and the other checkpoints are as they were. Free some space (or fix the permissions) and run "
                   "the same command again to resume from the last checkpoint." if in_run else
                   ". Free some space (or fix the permissions) and run the same command again.")) from exc
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return target


_OLD_DIR = re.compile(r"^\.old-(.+)-[0-9a-f]{8}$")


def clean_temporaries(folder: Path) -> None:
    """Clear up after writes that were interrupted: a folder that was being replaced when the process
    died (``.old-NAME-*`` without ``NAME``) is put back under its name; temporary folders (never a
    complete write) and old folders whose replacement finished are removed."""
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        m = _OLD_DIR.match(p.name)
        if m and p.is_dir() and not (folder / m.group(1)).exists():
            os.replace(p, folder / m.group(1))
            log.warning("restored %s: the process stopped while replacing it", folder / m.group(1))
    for p in folder.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
