"""Atomic, verifiable checkpoints.

A checkpoint is a normal Hugging Face model folder (``from_pretrained`` loads it) plus the trainer
state::

    checkpoints/step-00000120/
        config.json, model.safetensors, generation_config.json, tokenizer files   # the student
        trainer_state.json      # position in the run, counters, fingerprints (human readable)
        optimizer.pt, scheduler.pt, rng.pt
        manifest.json           # size and sha256 of every file above; written last

Writing goes to a hidden temporary folder next to the target that is renamed into place only after
every file (manifest last) has been written and flushed to disk, so a crash at any moment leaves
either the previous checkpoints or the new complete one, never a half-written folder under a
checkpoint name. Loading verifies the manifest and refuses any folder whose files do not match.

Replacing a folder that already exists (``best/``, ``final/``, a checkpoint saved twice at one
step) takes two renames: the old folder to ``.old-NAME-*``, then the new one into place. A crash
between the two leaves no folder under the name; :func:`clean_temporaries` (run at every start)
puts the old folder back. A write that fails (a full disk: ``OSError`` 28) raises
:class:`CheckpointError` after removing its temporary folder and restoring the old one, so the
files already on disk are unchanged.
"""

from __future__ import annotations

import hashlib
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

log = logging.getLogger("pocl.checkpoint")

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
    _fsync_dir(folder)
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


# ------------------------------------------------------------------------------------ output-folder safety
#: What a pocl run folder (``pocl distill``/``pocl rank`` --output-dir) may hold: any other top-level
#: entry makes it someone else's folder, which no command writes into.
RUN_NAMES = frozenset({
    "checkpoints", "final", "best", "tensorboard", "metrics.jsonl", "summary.json", "summary.md", "config.yaml",
    "ranking.jsonl", "ranking.meta.json", "ranking.partial.jsonl", "seqkd_teacher.jsonl", "seqkd_teacher.meta.json",
    "teacher_cache", "plots"})
#: What a ``pocl eval`` output folder may hold.
EVAL_NAMES = frozenset({"generations.jsonl", "results.json", "results.md"})
_PLOT_FILE = re.compile(r"^(.+_training_curves|.+_difficulty|eval_[a-z_]+)\.png$")
_SHARD_DIR = re.compile(r"^shard-\d+$")
#: pocl's own temporaries: ``.tmp-NAME-*``/``.old-NAME-*`` folders, ``.NAME.tmp*`` files, ``NAME.tmp`` files.
_TEMPORARY = re.compile(r"^(\.tmp-.+|\.old-.+|\..+\.tmp.*|.+\.jsonl\.tmp)$")
#: A trainer checkpoint's state file (a step folder holding it whose manifest was lost is still pocl's).
_TRAINER_STATE = "trainer_state.json"

#: kind -> what the folder is called in messages
_KIND_WORDS = {"model": "model folder", "run": "run folder", "eval": "evaluation folder", "plots": "plots folder",
               "teacher-cache": "teacher cache"}


def _listing(entries: list[Path], base: Path | None = None, limit: int = 4) -> str:
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
        return f"it holds files pocl did not write ({_listing(extra, target)})"
    if STEP_DIR.match(target.name) and target.parent.name == "checkpoints" and (target / _TRAINER_STATE).is_file():
        return None  # a trainer checkpoint whose manifest was lost: the trainer's own, skipped at resume
    return f"it is not a folder pocl wrote (no pocl {MANIFEST}; found {_listing(entries)})"


def _check_replaceable(target: Path) -> None:
    problem = replaceable_problem(target)
    if problem is not None:
        raise CheckpointError(f"refusing to replace {target}: {problem}. pocl only replaces folders it wrote; "
                              "nothing was changed")


def _cache_entry(folder: Path, p: Path) -> bool:
    """``p`` (in ``folder``) is what a teacher cache holds: its pocl manifest, a shard, a temporary."""
    if p.is_symlink():
        return False
    if p.name == MANIFEST:
        return p.is_file() and pocl_manifest(folder) is not None
    return (bool(_SHARD_DIR.match(p.name)) and p.is_dir()) or bool(_TEMPORARY.match(p.name))


def _foreign_entries(folder: Path, kind: str) -> list[Path]:
    """Top-level entries of ``folder`` that a pocl output of ``kind`` does not have."""
    out = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if kind == "run":
            ok = name in RUN_NAMES or bool(_TEMPORARY.match(name))
            if ok and name in ("final", "best") and p.is_dir():
                ok = replaceable_problem(p) is None
        elif kind == "eval":
            ok = name in EVAL_NAMES or bool(_TEMPORARY.match(name))
        elif kind == "plots":
            ok = (bool(_PLOT_FILE.match(name)) and p.is_file()) or bool(_TEMPORARY.match(name))
        elif kind == "teacher-cache":  # the --teacher-cache-dir root (train/, dev/) or one of those caches
            ok = _cache_entry(folder, p) or (name in ("train", "dev") and p.is_dir() and not p.is_symlink()
                                             and all(_cache_entry(p, q) for q in p.iterdir()))
        else:
            raise ValueError(f"unknown output kind {kind!r}")
        if not ok or p.is_symlink():
            out.append(p)
    return out


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def _local_path(spec: str | os.PathLike) -> Path | None:
    """The local file or folder a model spec names (``dir/model.gguf``: the file), resolved; None for a
    hub name or a path that does not exist."""
    path = Path(os.path.expanduser(str(spec)))
    if not path.exists():
        return None
    return path.resolve()


def check_output_dir(out: str | os.PathLike, *, inputs: Any = (), kind: str = "model",
                     overwrite: bool | None = None, flag: str = "--output-dir") -> Path:
    """Refuse an output folder that a pocl command must not write into; return it as a Path.

    * ``inputs``: ``{label: spec}`` or ``[(label, spec)]`` of the command's input models (a folder, a
      ``.gguf`` file or a hub name; names that are not local paths are skipped). The output may not
      be, lie inside, or contain any of them: no command writes into its own input model.
    * ``kind``: what the command writes there, which decides what counts as its own previous output:
      ``model`` (one model folder, replaced as a whole: pocl's ``manifest.json`` listing every file),
      ``run`` (a distill/rank run folder: only pocl's run file names, :data:`RUN_NAMES`, with ``final/``
      and ``best/`` its own), ``eval`` (:data:`EVAL_NAMES`), ``plots`` (pocl's PNG names) or
      ``teacher-cache`` (its manifest and ``shard-*`` folders).
    * ``overwrite`` (``model`` only): a previous pocl model there is replaced only with True; None
      does not ask (the command reuses or resumes its own output).

    A missing or empty folder is always accepted. A non-empty folder that is not pocl's own output of
    that kind is refused, with or without ``--overwrite``. Raises :class:`pocl.errors.ConfigError`
    (exit code 2) with one line naming the folder and a few of the entries found in it."""
    from pocl.errors import ConfigError

    out = Path(os.path.expanduser(str(out)))
    resolved = out.resolve()
    items = inputs.items() if isinstance(inputs, dict) else inputs
    for label, spec in items:
        if spec is None:
            continue
        inp = _local_path(spec)
        if inp is None:
            continue
        rel = _relation(resolved, inp)
        if rel is not None:
            what = "file" if inp.is_file() else "folder"
            raise ConfigError(f"{flag} {out} {rel} the {label} {what} ({spec}); pocl never writes into its own "
                              f"input model: give another {flag}")
    if out.is_symlink() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a link to something that is not a folder; give a folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a folder; pocl does not replace it: give a folder")
    if not out.is_dir():
        return out
    entries = list(out.iterdir())
    if not entries:
        return out
    word = _KIND_WORDS.get(kind)
    if word is None:
        raise ValueError(f"unknown output kind {kind!r}")
    refuse = (f"; pocl never writes into or replaces a folder it did not create (not even with --overwrite): "
              f"give a new or empty {flag}")
    if kind == "model":
        manifest = pocl_manifest(out)
        if manifest is None:
            raise ConfigError(f"{flag} {out} is not empty and is not a pocl {word} (no pocl {MANIFEST}; found "
                              f"{_listing(entries)}){refuse}")
        extra = unlisted_files(out, manifest)
        if extra:
            raise ConfigError(f"{flag} {out} holds files pocl did not write ({_listing(extra, out)}){refuse}")
        if overwrite is False:
            raise ConfigError(f"{flag} {out} already holds a pocl model; use --overwrite to replace it, or give "
                              f"another {flag}")
        return out
    foreign = _foreign_entries(out, kind)
    if foreign:
        raise ConfigError(f"{flag} {out} is not empty and is not a pocl {word} (found {_listing(foreign)}){refuse}")
    return out


def _first_json_line(path: Path) -> Any:
    """The first line of ``path`` as JSON; ``{}`` for an empty file, None when it is not JSON."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(1 << 20)
    except OSError:
        return None
    if not line.strip():
        return {}
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None


def check_ranking_file(path: str | os.PathLike, *, inputs: Any = (), data: Any = (),
                       flag: str = "--ranking-file") -> Path:
    """Refuse a ``--ranking-file`` that would replace a file pocl did not write; return it as a Path.

    The ranking writes ``NAME.jsonl``, ``NAME.meta.json`` and ``NAME.partial.jsonl``; each that exists
    must be pocl's (a ranking line with ``id`` and ``rank``, a ``pocl-ranking`` metadata file, a
    ``pocl-ranking-partial`` header) or empty. The file may not be (or lie inside) an input model
    (``inputs``, as in :func:`check_output_dir`) nor be one of the ``data`` files. ConfigError, exit 2."""
    from pocl.errors import ConfigError

    path = Path(os.path.expanduser(str(path)))
    resolved = path.resolve()
    items = inputs.items() if isinstance(inputs, dict) else inputs
    for label, spec in list(items) + [("data", d) for d in (data or ()) if d is not None]:
        if spec is None:
            continue
        inp = _local_path(spec)
        if inp is not None and _relation(resolved, inp) in ("is", "is inside"):
            where = "is" if resolved == inp else "is inside"
            what = "file" if inp.is_file() else "folder"
            raise ConfigError(f"{flag} {path} {where} the {label} {what} ({spec}); pocl never writes into its own "
                              f"inputs: give another {flag}")
    stem = path.name.removesuffix(".jsonl")
    checks = ((path, lambda d: isinstance(d, dict) and (not d or ("id" in d and "rank" in d))),
              (path.with_name(stem + ".meta.json"), None),
              (path.with_name(stem + ".partial.jsonl"),
               lambda d: isinstance(d, dict) and (not d or d.get("format") == "pocl-ranking-partial")))
    for p, ok in checks:
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() or not p.is_file():
            raise ConfigError(f"{flag} {path}: {p} is not a file pocl wrote ({'a link' if p.is_symlink() else 'a folder'}); "
                              f"pocl never replaces what it did not create: give another {flag}")
        if ok is None:  # the metadata: one JSON document
            try:
                text = p.read_text(encoding="utf-8")
                good = not text.strip() or json.loads(text).get("format") == "pocl-ranking"
            except (OSError, ValueError, UnicodeDecodeError, AttributeError):
                good = False
        else:
            good = ok(_first_json_line(p))
        if not good:
            raise ConfigError(f"{flag} {path}: {p} exists and is not a pocl ranking file; pocl never replaces a "
                              f"file it did not create: give another {flag}")
    return path


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
        _fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not target.exists():
            os.replace(trash, target)  # the old folder goes back under its name
        if isinstance(exc, OSError):
            raise CheckpointError(
                f"cannot write {target}: {exc.strerror or exc} (errno {exc.errno}). Nothing on disk was changed: "
                f"the partial write was removed, {target.name} "
                f"{'is the previous one' if target.exists() else 'was not created'} and the other checkpoints are "
                "as they were. Free some space (or fix the permissions) and run the same command again to resume "
                "from the last checkpoint.") from exc
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


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders under ``folder`` as (step, path), newest first (not verified)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_valid_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that passes verification; corrupt ones are reported and skipped."""
    for step, path in list_checkpoints(folder):
        try:
            verify_folder(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint at step %d: %s", step, exc)
    return None


def prune_checkpoints(folder: Path, keep: int, protect: set[Path] | None = None) -> None:
    protect = {p.resolve() for p in (protect or set())}
    for _, path in list_checkpoints(folder)[keep:]:
        if path.resolve() not in protect:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- resume checks
#: Settings that do not change the trained weights: a resumed run may change them freely.
RESUME_FREE_KEYS = ("output_dir", "resume", "overwrite", "allow_config_change", "log_every", "tensorboard",
                    "progress", "save_every", "save_total_limit", "eval_every", "eval_batch_size", "num_processes",
                    "teacher_cache_dir", "teacher_cache_max_error", "teacher_cache_check_samples",
                    "accept_approximation")


def newest_resume_state(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``folder`` whose files are all present with their manifest sizes
    (checksums are not computed: this is the cheap look-ahead of :func:`resume_differences`; the
    trainer verifies fully before loading), and its ``trainer_state.json``; None when there is none."""
    for _, path in list_checkpoints(folder):
        try:
            verify_folder(path, check_hashes=False)
            return path, json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError):
            continue
    return None


def resume_differences(saved: dict[str, Any], *, config, fingerprints: dict[str, Any], num_processes: int,
                       skip_fingerprints: tuple[str, ...] = ()) -> list[str]:
    """What differs between a checkpoint's ``trainer_state.json`` (``saved``) and a run about to resume
    from it, one readable line per difference (empty: compatible). ``config`` is the run's
    :class:`pocl.config.DistillConfig`; settings in :data:`RESUME_FREE_KEYS` may change."""
    problems = []
    if saved.get("config_hash") != config.training_hash():
        old, new = saved.get("config", {}), config.to_dict()
        for section in new:
            for key, value in new[section].items():
                before = (old.get(section) or {}).get(key, "<absent>")
                if before != value and key not in RESUME_FREE_KEYS:
                    problems.append(f"{section}.{key}: {before!r} -> {value!r}")
    for key, value in fingerprints.items():
        before = (saved.get("fingerprints") or {}).get(key)
        if key not in skip_fingerprints and before != value:
            problems.append(f"{key} changed (fingerprint {before} -> {value})")
    if saved.get("num_processes", 1) != num_processes:
        problems.append(f"number of processes: {saved.get('num_processes')} -> {num_processes}")
    return problems


def resume_refusal_message(folder: Path, problems: list[str]) -> str:
    """The error of a refused resume (the same words as the trainer's)."""
    return (f"cannot resume from {folder}: the run differs from the checkpoint's:\n  - " + "\n  - ".join(problems)
            + "\nUse another --output-dir, --overwrite to start over, or --allow-config-change to resume anyway.")
