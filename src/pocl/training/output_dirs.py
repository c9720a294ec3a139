"""Output folders: no pocl command writes into a folder it did not create, nor into its own input models.

Each writing command checks its output folder before any work (:func:`check_output_dir`,
:func:`check_ranking_file`): a missing or empty folder, or pocl's own earlier output of that kind, is
accepted; anything else is refused with one line naming the folder and a few of its entries, even
with ``--overwrite`` (docs/reliability.md, "Foreign folders"). Whether a single folder is pocl's own
(its ``manifest.json`` lists every file) is :func:`pocl.training.checkpoint.replaceable_problem`,
which :func:`pocl.training.checkpoint.atomic_folder_write` also applies before it replaces anything.

While a run writes into its folder, :func:`run_lock` holds an exclusive lock on ``OUTPUT_DIR/pocl.lock``:
a second pocl process started on the same folder (a second experiment runner, a command typed twice) is
refused at once instead of mixing its checkpoints and logs with the first one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pocl.errors import ConfigError

from pocl.training.checkpoint import MANIFEST, listing, pocl_manifest, replaceable_problem, unlisted_files

__all__ = ["EVAL_NAMES", "LOCK_NAME", "RUN_NAMES", "check_output_dir", "check_ranking_file", "run_lock"]

#: The lock file of a run folder (:func:`run_lock`).
LOCK_NAME = "pocl.lock"

#: What a pocl run folder (``pocl distill``/``pocl rank`` --output-dir) may hold: any other top-level
#: entry makes it someone else's folder, which no command writes into.
RUN_NAMES = frozenset({
    "checkpoints", "final", "best", "tensorboard", "metrics.jsonl", "summary.json", "summary.md", "config.yaml",
    "ranking.jsonl", "ranking.meta.json", "ranking.partial.jsonl", "seqkd_teacher.jsonl", "seqkd_teacher.meta.json",
    "teacher_cache", "plots", "rankings", "pocl.lock",
    "wandb", "trackio"})  # the trackers' own folders (--report-to); kept by --overwrite: unsynced offline runs
#: What a ``pocl eval`` output folder may hold.
EVAL_NAMES = frozenset({"generations.jsonl", "results.json", "results.md"})
_PLOT_FILE = re.compile(r"^(.+_training_curves|.+_difficulty|eval_[a-z_]+)\.png$")
_SHARD_DIR = re.compile(r"^shard-\d+$")
#: The cache root of a stage's own teacher (pocl.training.stage_teachers.cache_folder): its train/ and dev/.
_STAGE_TEACHER_DIR = re.compile(r"^teacher-[0-9a-f]{12}$")
#: pocl's own temporaries: ``.tmp-NAME-*``/``.old-NAME-*`` folders, ``.NAME.tmp*`` files, ``NAME.tmp`` files.
_TEMPORARY = re.compile(r"^(\.tmp-.+|\.old-.+|\..+\.tmp.*|.+\.jsonl\.tmp)$")

#: kind -> what the folder is called in messages
_KIND_WORDS = {"model": "model folder", "run": "run folder", "eval": "evaluation folder", "plots": "plots folder",
               "teacher-cache": "teacher cache"}


def _cache_entry(folder: Path, p: Path) -> bool:
    """``p`` (in ``folder``) is what a teacher cache holds: its pocl manifest, a shard, a temporary."""
    if p.is_symlink():
        return False
    if p.name == MANIFEST:
        return p.is_file() and pocl_manifest(folder) is not None
    return (bool(_SHARD_DIR.match(p.name)) and p.is_dir()) or bool(_TEMPORARY.match(p.name))


def _plain_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _cache_root_entry(folder: Path, p: Path) -> bool:
    """``p`` (in ``folder``) is what a teacher cache root holds: a cache entry, or a train/ or dev/ cache."""
    return _cache_entry(folder, p) or (p.name in ("train", "dev") and _plain_dir(p)
                                       and all(_cache_entry(p, q) for q in p.iterdir()))


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
        elif kind == "teacher-cache":  # the --teacher-cache-dir root (train/, dev/, teacher-HASH/) or a cache
            ok = _cache_root_entry(folder, p) or (bool(_STAGE_TEACHER_DIR.match(name)) and _plain_dir(p) and all(
                _cache_root_entry(p, q) for q in p.iterdir()))
        else:
            raise ValueError(f"unknown output kind {kind!r}")
        if not ok or p.is_symlink():
            out.append(p)
    return out


def _relation(out: Path, inp: Path) -> str | None:
    """How output ``out`` relates to input ``inp`` ("is", "is inside", "contains"), or None."""
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
      ``teacher-cache`` (its manifest and ``shard-*`` folders; at the root, ``train/``, ``dev/`` and the
      ``teacher-HASH/`` caches of stage teachers, which a shared ``--teacher-cache-dir`` also holds).
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
    for parent in out.parents:  # a file where a parent folder should be: refused before any work
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {out}: {parent} is a file, not a folder, so {out} cannot be created; "
                                  "give another folder")
            break
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
                              f"{listing(entries)}){refuse}")
        extra = unlisted_files(out, manifest)
        if extra:
            raise ConfigError(f"{flag} {out} holds files pocl did not write ({listing(extra, out)}){refuse}")
        if overwrite is False:
            raise ConfigError(f"{flag} {out} already holds a pocl model; use --overwrite to replace it, or give "
                              f"another {flag}")
        return out
    foreign = _foreign_entries(out, kind)
    if foreign:
        raise ConfigError(f"{flag} {out} is not empty and is not a pocl {word} (found {listing(foreign)}){refuse}")
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


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, *, flag: str = "--output-dir") -> Iterator[None]:
    """Hold an exclusive lock on ``OUTPUT_DIR/pocl.lock`` (creating the folder) for the block; ConfigError at
    once when another process holds it. Only the main process of a launch (``RANK`` 0 or unset) locks; the
    lock goes with the process (``flock``), so a killed run leaves no stale lock. No-op where ``fcntl`` is
    missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown process"
        fh.close()
        raise ConfigError(f"{flag} {out} is in use by another pocl process ({holder}); wait for it to end or give "
                          f"another {flag}") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
