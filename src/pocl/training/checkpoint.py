"""Atomic, verifiable checkpoints.

A checkpoint is a normal Hugging Face model folder (``from_pretrained`` loads it) plus the trainer
state::

    checkpoints/step-00000120/
        config.json, model.safetensors, generation_config.json, tokenizer files   # the student
        trainer_state.json      # position in the run, counters, fingerprints (human readable)
        optimizer.pt, scheduler.pt, rng.pt
        manifest.json           # size and sha256 of every file above; written last

A checkpoint is a stamped folder (:mod:`pocl.artifacts.folders`, re-exported here): writing goes to a
hidden temporary folder next to the target that is renamed into place only after
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

import json
import logging
import shutil
from pathlib import Path
from typing import Any

# The folder form of a stamped artifact lives in pocl.artifacts.folders; these names are re-exported
# because a checkpoint is that form (tests and scripts call ckpt.verify_folder, ckpt.atomic_folder_write ...).
from pocl.artifacts.folders import (MANIFEST, STEP_DIR, atomic_folder_write, clean_temporaries,  # noqa: F401
                                    listing, pocl_manifest, replaceable_problem, unlisted_files, verify_folder,
                                    write_manifest)
from pocl.config import weight_free_keys
from pocl.errors import CheckpointError

log = logging.getLogger("pocl.checkpoint")


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint at global step ``step`` (``step-00000120``)."""
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
    """Delete all but the newest ``keep`` checkpoints under ``folder`` (never those in ``protect``)."""
    protect = {p.resolve() for p in (protect or set())}
    for _, path in list_checkpoints(folder)[keep:]:
        if path.resolve() not in protect:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- resume checks
#: Settings that do not change the trained weights (declared ``option(..., affects_weights=False)``):
#: a resumed run may change them freely.
RESUME_FREE_KEYS = weight_free_keys()


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
    # A sharded (fsdp2) checkpoint reshards onto any number of processes; a replicated one keeps its count.
    resharding = saved.get("sharded") is not None and config.train.parallelism == "fsdp2"
    if saved.get("num_processes", 1) != num_processes and not resharding:
        problems.append(f"number of processes: {saved.get('num_processes')} -> {num_processes}"
                        + (" (only --parallelism fsdp2 checkpoints reshard)" if saved.get("sharded") is None else ""))
    return problems


def resume_refusal_message(folder: Path, problems: list[str]) -> str:
    """The error of a refused resume (the same words as the trainer's)."""
    return (f"cannot resume from {folder}: the run differs from the checkpoint's:\n  - " + "\n  - ".join(problems)
            + "\nUse another --output-dir, --overwrite to start over, or --allow-config-change to resume anyway.")
