"""A run's output folder: its preparation, checkpoints, resume, the final/ and best/ models, the
run's config and summary files, and the random streams a checkpoint restores.

Layout of ``OUTPUT_DIR`` (:data:`pocl.training.output_dirs.RUN_NAMES`)::

    config.yaml, metrics.jsonl, summary.json, summary.md, tensorboard/
    checkpoints/step-NNNNNNNN/   student weights, trainer_state.json, optimizer.pt, scheduler.pt, rng.pt
                                 (+ replay_buffer.json with on-policy replay), manifest.json last;
                                 with --parallelism fsdp2 the weights and optimizer state are sharded/
                                 (torch.distributed.checkpoint, every process writes its shards)
    final/, best/                plain Hugging Face model folders (LoRA merged), never of non-finite weights

Nothing here writes non-finite student weights: a checkpoint of them is skipped (the previous ones
stay), final/ and best/ are refused with :class:`~pocl.training.state.NonFiniteLossError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pocl.artifacts import atomic_write
from pocl.errors import CheckpointError
from pocl.fingerprints import run_fingerprints
from pocl.model_checks import first_nonfinite_in
from pocl.models import load_training_weights, save_model_folder, save_training_weights
from pocl.reporting.model_card import write_card
from pocl.training import checkpoint as ckpt
from pocl.training import sharded_checkpoint
from pocl.training.onpolicy import REPLAY_FILE
from pocl.training.state import NonFiniteLossError, TrainState
from pocl.training.summary import run_summary, write_summary

log = logging.getLogger("pocl.train")

__all__ = ["Resumed", "RunStore", "check_resume_before_training", "rng_state", "seed_everything"]

#: What ``--overwrite`` deletes in a run folder (the ranking and the teacher cache are kept; the rankings of
#: --remeasure were made by the run's own students).
OVERWRITTEN = ("checkpoints", "final", "best", "tensorboard", "metrics.jsonl", "summary.json", "summary.md",
               "config.yaml", "rankings")


# ------------------------------------------------------------------------------------ random streams
def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global random states (Python, numpy, torch and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(rng: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` returned."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ------------------------------------------------------------------------------------ resume checks
def _check_compatible(saved: dict[str, Any], folder: Path, *, config, fingerprints: dict[str, Any],
                      num_processes: int, allow_change: bool) -> None:
    """Refuse (CheckpointError) to resume from ``folder`` (its ``trainer_state.json``: ``saved``) when
    the run differs from it; with ``allow_change``, a warning instead."""
    problems = ckpt.resume_differences(saved, config=config, fingerprints=fingerprints, num_processes=num_processes)
    if not problems:
        return
    message = ckpt.resume_refusal_message(folder, problems)
    if allow_change:
        log.warning("%s\nresuming anyway (--allow-config-change)", message.rsplit("\n", 1)[0])
    else:
        raise CheckpointError(message)


def check_resume_before_training(output_dir: Path, *, config, fingerprints: Callable[[], dict[str, Any]],
                                 num_processes: int) -> None:
    """The cheap look-ahead of the trainer's resume check (sizes, not checksums): CheckpointError when
    the newest checkpoint in ``output_dir`` belongs to another run. ``fingerprints()``: the run's
    fingerprints known so far, called only when there is a checkpoint (hashing the data takes time)."""
    found = ckpt.newest_resume_state(Path(output_dir) / "checkpoints")
    if found is None:
        return
    folder, saved = found
    _check_compatible(saved, folder, config=config, fingerprints=fingerprints(), num_processes=num_processes,
                      allow_change=False)


@dataclasses.dataclass
class Resumed:
    """A checkpoint found at the start of a run: its folder and state; ``completed``: the output folder
    holds this run completed (nothing was loaded)."""

    folder: Path
    state: TrainState
    completed: bool


# ------------------------------------------------------------------------------------ the store
class RunStore:
    """The output folder of one run (``config.train.output_dir``) as the trainer's processes see it:
    the main process writes, every process takes the same decisions."""

    def __init__(self, config, accelerator, *, fingerprints: dict[str, Any] | None = None, train_data=None,
                 dev_data=None, stages: Sequence = (), parallel=None):
        """``config``: the run's :class:`pocl.config.DistillConfig`; ``accelerator``: its processes;
        ``parallel``: how they hold the student (:mod:`pocl.training.sharding`; default: replicated).

        :attr:`fingerprints` identify the run (every checkpoint records them and a resume compares them):
        the given ``fingerprints`` (models) plus those of ``train_data``, ``dev_data`` and ``stages``
        (:func:`pocl.fingerprints.run_fingerprints`)."""
        self.cfg = config
        self.accelerator = accelerator
        self.output_dir = Path(config.train.output_dir)
        self.fingerprints = run_fingerprints(fingerprints, train_data=train_data, dev_data=dev_data, stages=stages)
        if parallel is None:
            from pocl.training.sharding import Replicated

            parallel = Replicated(accelerator)
        self.parallel = parallel

    # ---------------------------------------------------------------- folder
    def prepare(self) -> None:
        """``--overwrite``: delete the run's earlier outputs (not its ranking nor its teacher cache).
        ``--resume never``: refuse a folder that holds checkpoints."""
        tc = self.cfg.train
        if tc.overwrite and self.output_dir.exists() and self.accelerator.is_main_process:
            for name in OVERWRITTEN:
                p = self.output_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self.accelerator.wait_for_everyone()
        if tc.resume == "never" and ckpt.list_checkpoints(self.output_dir / "checkpoints"):
            raise CheckpointError(f"{self.output_dir} already holds checkpoints; use --resume auto to continue, "
                                  "--overwrite to start over, or another --output-dir")

    def write_config(self) -> None:
        """Create the folder and write ``config.yaml`` (main process)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.yaml", self.cfg.to_yaml())

    def summary(self, status: str, state: TrainState, *, extra: dict[str, Any], has_dev: bool) -> dict[str, Any]:
        """``summary.json`` of the run as it stands (:func:`pocl.training.summary.run_summary`)."""
        return run_summary(status, state, config=self.cfg, extra=extra, has_dev=has_dev,
                           fingerprints=self.fingerprints, output_dir=self.output_dir,
                           num_processes=self.accelerator.num_processes)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and ``summary.md`` (main process)."""
        if self.accelerator.is_main_process:
            write_summary(self.output_dir, summary)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, *, student: nn.Module, tokenizer, optimizer, scheduler, state: TrainState,
                        stages: Sequence, fingerprints: dict[str, Any], replay=None,
                        module: nn.Module | None = None) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (main process; with sharded checkpoints every process
        writes its shards of ``module``, the loss module, first) and prune old ones.

        Never a checkpoint of non-finite student weights: then nothing is written (a warning names the
        tensor), the previous checkpoints stay, and a resume starts from finite weights. Returns None
        then (the decision is the same on every process: they hold the same weights)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / "checkpoints" / ckpt.step_dir_name(state.global_step)
        bad = self.parallel.first_nonfinite(student)
        if bad is not None:
            kept = ckpt.list_checkpoints(folder.parent)
            (log.warning if acc.is_main_process else log.debug)(
                "step %d: the student's weights are not finite (%s); not saving checkpoint %s. %s",
                state.global_step, bad.describe(), folder,
                f"The last checkpoint, {kept[0][1]}, is kept: a resume starts from it." if kept else
                "There is no earlier checkpoint: a resume starts over.")
            return None
        # Every process's RNG state, so that a resumed run continues each process's random stream.
        rng_states = [rng_state()]
        replay_states = [replay.state_dict()] if replay is not None else []
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
            if replay is not None:
                replay_states = gather_object(replay_states)
        staging = folder.parent / f".tmp-shards-{folder.name}"  # a crash leaves it to clean_temporaries
        with_optimizer = False
        if self.parallel.sharded:
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            acc.wait_for_everyone()
            with_optimizer = sharded_checkpoint.save(module, optimizer, staging)
            acc.wait_for_everyone()
        if acc.is_main_process:
            trainer_state = {
                "state": dataclasses.asdict(state),
                "config": self.cfg.to_dict(),
                "config_hash": self.cfg.training_hash(),
                "fingerprints": fingerprints,
                "stages": [s.to_dict() for s in stages],
                "num_processes": acc.num_processes,
            }
            if self.parallel.sharded:
                trainer_state["sharded"] = {"folder": sharded_checkpoint.SHARDED_DIR, "optimizer": with_optimizer}

            def write(tmp: Path) -> None:
                """Fill the checkpoint's temporary folder (its manifest is added after)."""
                if self.parallel.sharded:
                    os.replace(staging, tmp / sharded_checkpoint.SHARDED_DIR)
                    tokenizer.save_pretrained(tmp)
                else:
                    save_training_weights(student, tokenizer, tmp)
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=str),
                                                        encoding="utf-8")
                torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
                torch.save({"per_process": rng_states}, tmp / "rng.pt")
                if replay is not None:
                    (tmp / REPLAY_FILE).write_text(json.dumps(
                        {"format": "pocl-replay-buffer-v1", "per_process": replay_states}), encoding="utf-8")

            ckpt.atomic_folder_write(folder, write, manifest_extra={"step": state.global_step})
            ckpt.prune_checkpoints(folder.parent, self.cfg.train.save_total_limit)
        acc.wait_for_everyone()
        return folder

    def resume(self, *, student: nn.Module, stages: Sequence, fingerprints: dict[str, Any],
               replay=None, module: nn.Module | None = None) -> Resumed | None:
        """Find the newest intact checkpoint and, unless the run is already completed on disk, load it:
        the student's weights, this process's random states and replay buffer. None: nothing to resume
        (``--resume never``, or no checkpoint). The optimizer and scheduler states are loaded when the
        stage starts (:meth:`load_optimizer`). Refuses a checkpoint of another run (CheckpointError)."""
        folder_root = self.output_dir / "checkpoints"
        ckpt.clean_temporaries(folder_root)
        ckpt.clean_temporaries(self.output_dir)
        existing = ckpt.list_checkpoints(folder_root)
        if self.cfg.train.resume == "never" or not existing:
            return None
        folder = ckpt.latest_valid_checkpoint(folder_root)
        if folder is None:
            raise CheckpointError(f"{folder_root} has checkpoints but none is complete and intact; "
                                  "use --overwrite to start over")
        saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        _check_compatible(saved, folder, config=self.cfg, fingerprints=fingerprints,
                          num_processes=self.accelerator.num_processes,
                          allow_change=self.cfg.train.allow_config_change)
        state = TrainState(**saved["state"])
        if self.completed_on_disk(state, len(stages)):
            return Resumed(folder, state, completed=True)  # for the summary of the result; no weights loaded
        self._load_weights(folder, student=student, module=module)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rng_states = torch.load(folder / "rng.pt", weights_only=False)["per_process"]
        if len(rng_states) != world and self.accelerator.is_main_process:  # resharded (fsdp2)
            log.warning("resuming %s, written by %d processes, with %d: each process continues the random "
                        "streams of the process of its rank when there was one; on-policy samples and the "
                        "replay buffer's draws will differ from a run that kept %d processes (docs/distributed.md)",
                        folder, len(rng_states), world, len(rng_states))
        if rank < len(rng_states):
            _set_rng_state(rng_states[rank])
        if replay is not None:
            replay_file = folder / REPLAY_FILE
            if replay_file.is_file():
                states = json.loads(replay_file.read_text(encoding="utf-8"))["per_process"]
                replay.load_state_dict(states[rank] if len(states) == world else _redistributed(states, rank, world))
            else:
                log.warning("%s has no replay buffer; resuming with an empty one", folder)
        log.info("resuming from %s (stage %d '%s', step %d of the stage, global step %d)", folder,
                 state.stage_index + 1, stages[min(state.stage_index, len(stages) - 1)].name,
                 state.stage_step, state.global_step)
        return Resumed(folder, state, completed=False)

    def _load_weights(self, folder: Path, *, student: nn.Module, module: nn.Module | None) -> None:
        """The student's weights from checkpoint ``folder``, in the format of the run's parallelism
        (``module``: the loss module, for sharded checkpoints); CheckpointError for the other format."""
        is_sharded = (folder / sharded_checkpoint.SHARDED_DIR).is_dir()
        if is_sharded != self.parallel.sharded:
            raise CheckpointError(
                f"{folder} was written with --parallelism {'fsdp2' if is_sharded else 'ddp'} and this run uses "
                f"{self.cfg.train.parallelism}; resume it with --parallelism {'fsdp2' if is_sharded else 'ddp'}")
        if is_sharded:
            sharded_checkpoint.load_model(module, folder / sharded_checkpoint.SHARDED_DIR)
        else:
            load_training_weights(student, folder)

    def load_optimizer(self, folder: Path, optimizer, scheduler, *, stage_step: int, restart_optimizer: bool,
                       module: nn.Module | None = None) -> None:
        """The optimizer and scheduler states of checkpoint ``folder``, as the stage resumed there needs
        them: at a stage boundary a restarting stage begins from a fresh optimizer, exactly as the
        uninterrupted run does; inside a stage the saved moments and schedule continue. ``module``: the
        loss module (sharded checkpoints)."""
        if stage_step > 0 or not restart_optimizer:
            if self.parallel.sharded:
                sharded_checkpoint.load_optimizer(module, optimizer, folder / sharded_checkpoint.SHARDED_DIR)
            else:
                optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
        sched_state = torch.load(folder / "scheduler.pt", weights_only=False)
        if sched_state and stage_step > 0:
            scheduler.load_state_dict(sched_state)

    def completed_on_disk(self, state: TrainState, num_stages: int) -> bool:
        """Whether the output folder holds this run completed: every stage done in the newest checkpoint,
        final/ intact (its manifest's files present with their sizes) and summary.json saying so. A run
        that stopped between its last checkpoint and writing final/ or the summary is not: it finishes."""
        if not (state.finished or state.stage_index >= num_stages):
            return False
        try:
            ckpt.verify_folder(self.output_dir / "final", check_hashes=False)
            summary = json.loads((self.output_dir / "summary.json").read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(summary, dict) and summary.get("status") == "completed"

    def report_already_completed(self, step: int) -> None:
        """The one line of a rerun of a completed run (main process): nothing is trained or written."""
        if self.accelerator.is_main_process:
            log.warning("run in %s already completed at step %d (%s exists); nothing to do: nothing was trained "
                        "or written. To train again, give a new --output-dir, or --overwrite to start this run over "
                        "(it deletes the run's checkpoints, final/, best/, metrics and summary; the difficulty "
                        "ranking and the teacher cache are kept and reused when they fit)", self.output_dir,
                        step, self.output_dir / "final")

    # ---------------------------------------------------------------- models
    def check_finite_weights(self, student: nn.Module, target: Path, step: int) -> None:
        """Raise NonFiniteLossError (naming the tensor) when the student's weights hold NaN or inf: such a
        model is never written to ``target`` (final/ or best/)."""
        bad = self.parallel.first_nonfinite(student)
        if bad is not None:
            raise NonFiniteLossError(
                f"the student's weights are not finite at global step {step}: {bad.describe()}; "
                f"not writing {target} (nothing was written). No checkpoint holds such weights (checkpoints are "
                f"saved only with finite weights): the last one in {self.output_dir / 'checkpoints'} is a finite "
                "state to resume from. Lower the learning rate or check the data.")

    def save_model_folder(self, tmp: Path, student: nn.Module, tokenizer, step: int,
                          state_dict: dict[str, torch.Tensor] | None = None,
                          summary: Callable[[str], dict[str, Any]] | None = None) -> None:
        """Write the student as a plain Hugging Face folder (LoRA adapters merged) into ``tmp``, the
        temporary folder of final/ or best/ (``.tmp-NAME-xxxxxxxx``): refused before any file is written
        there when its weights are not finite, and atomic_folder_write removes it, so the folder on disk
        stays as it was. ``state_dict``: the gathered weights of a sharded student (main process); ``summary(status)``:
        the run's summary, for the folder's model card (README.md, :mod:`pocl.reporting.model_card`)."""
        name = tmp.name[len(".tmp-"):].rsplit("-", 1)[0] if tmp.name.startswith(".tmp-") else tmp.name
        if state_dict is None:
            self.check_finite_weights(student, tmp.parent / name, step)
        else:
            bad = first_nonfinite_in(state_dict.items())
            if bad is not None:
                raise NonFiniteLossError(f"the student's weights are not finite at global step {step}: "
                                         f"{bad.describe()}; not writing {tmp.parent / name}")
        save_model_folder(student, tokenizer, tmp, state_dict=state_dict)
        if summary is not None:  # written before the manifest: one of the files it lists
            write_card(tmp, summary=summary("completed" if name == "final" else "running"), config=self.cfg.to_dict(),
                       name=name, output_dir=self.output_dir)

    def write_model(self, name: str, write: Callable[[Path], None], manifest_extra: dict[str, Any] | None = None
                    ) -> Path:
        """Write ``OUTPUT_DIR/name`` (final or best) atomically with ``write(tmp)`` on the main process."""
        target = self.output_dir / name
        if self.accelerator.is_main_process:
            ckpt.atomic_folder_write(target, write, manifest_extra=manifest_extra)
        return target

    def existing(self, name: str) -> Path | None:
        """``OUTPUT_DIR/name`` when it exists (best/ of a run with a dev set), else None."""
        path = self.output_dir / name
        return path if path.exists() else None


def _redistributed(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """Process ``rank``'s replay buffer when a run saved by ``len(states)`` processes resumes with
    ``world`` (fsdp2 resharding): the samples of all buffers, oldest first, dealt out round-robin."""
    merged = [sample for state in states for sample in state.get("samples", [])]
    fresh = max((int(state.get("fresh_steps", 0)) for state in states), default=0)
    return {"samples": merged[rank::world], "fresh_steps": fresh}
