"""Metrics: a JSONL file (one JSON object per record), the run's trackers and the console.

The trackers (``train.report_to``: TensorBoard, W&B, trackio) are :mod:`pocl.training.trackers`. On resume,
records written after the checkpoint's step are dropped from the JSONL file and TensorBoard is told to purge
them, so a resumed run's logs equal an uninterrupted run's (W&B and trackio skip the replayed steps instead).

:class:`TrainLog` is the training loop's side: a train record (the mean over the steps since the
last one) every ``log_every`` steps and at the end of each stage, the dev records, and the progress
display (a bar on a terminal, else a plain line every ``log_every`` steps).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from torch import nn

from pocl.artifacts import atomic_write
from pocl.errors import CheckpointError
from pocl.progress import make_progress
from pocl.training import trackers

log = logging.getLogger("pocl.train")


def _clean(value: Any) -> Any:
    """A JSON-safe value: NaN and infinities as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    """``metrics.jsonl`` and the trackers of a run (written on the main process only).

    ``report_to``: the trackers (:func:`pocl.training.trackers.effective_trackers`); None: TensorBoard when
    ``tensorboard``, else none."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int | None = None, report_to: list[str] | None = None):
        """Start the logs in ``output_dir``: a new file, or (``resume_step``) the old one cut after that step."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run_trackers = None
        if not enabled:
            return
        names = (["tensorboard"] if tensorboard else []) if report_to is None else list(report_to)
        if names:  # before anything is written: a missing tracker package stops here
            trackers.check_available(names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a", encoding="utf-8")
        if names:
            try:
                self.run_trackers = trackers.RunTrackers(Path(output_dir), names, resume_step=resume_step,
                                                         config=trackers.run_config(Path(output_dir)))
            except BaseException:
                self._fh.close()
                raise

    def _truncate_after(self, step: int) -> None:
        """Drop the records after ``step`` from the JSONL file (lines cut by a crash too)."""
        if not self.path.exists():
            return
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.path, "".join(keep))

    def log(self, record: dict[str, Any], *, tb_prefix: str | None = None) -> None:
        """Append ``record`` (with a ``step``); its numbers also to the trackers as ``tb_prefix/KEY``.
        A failed write (a full disk) raises CheckpointError."""
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        try:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path}: {exc.strerror or exc} (errno {exc.errno}); the run "
                                  "stops here, the last checkpoint is intact: free some space and run the same "
                                  "command again to resume") from exc
        if self.run_trackers is not None and tb_prefix is not None:
            self.run_trackers.log(record, tb_prefix)

    def close(self) -> None:
        """Close the file and finish the trackers."""
        if not self.enabled:
            return
        self._fh.close()
        if self.run_trackers is not None:
            self.run_trackers.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def window_record(stats: list[dict[str, float]], seconds: float, state) -> dict[str, float]:
    """A train record from the step statistics since the last one (``seconds`` of wall time): ce and kd
    per token, loss and gradient norm per step, the last lr, throughput and the run's counters."""
    if not stats:
        return {}
    tokens = sum(s["tokens"] for s in stats)
    out = {k: sum(s[k] * s["tokens"] for s in stats) / max(tokens, 1.0) for k in ("ce", "kd")}
    out["loss"] = sum(s["loss"] for s in stats) / len(stats)
    out["grad_norm"] = sum(s["grad_norm"] for s in stats) / len(stats)
    out["lr"] = stats[-1]["lr"]
    out["tokens_per_s"] = tokens / max(seconds, 1e-9)
    out["skipped_steps"] = state.skipped_steps
    if getattr(state, "taid", None) is not None:
        out["taid_t"] = state.taid["t"]  # TAID's interpolation time after the record's last step
    if getattr(state, "skd", None) and state.skd.get("drafted"):
        # Speculative KD: the share of the student's drafted tokens the teacher kept, over the run so far.
        out["skd_acceptance"] = state.skd["accepted"] / state.skd["drafted"]
    if any(s.get("on_policy") for s in stats) or state.on_policy_steps:
        # On-policy steps: their ce/kd are over the student's own samples (ce: its NLL of them).
        out["on_policy_steps"] = sum(s.get("on_policy", 0.0) for s in stats)
        out["replayed_steps"] = sum(s.get("replayed", 0.0) for s in stats)
    return out


def _dtype_name(model: nn.Module) -> str:
    """The dtype of the model's first parameter ("?" without parameters)."""
    first = next(iter(model.parameters()), None)
    return "?" if first is None else str(first.dtype).removeprefix("torch.")


def log_device(device, num_processes: int, student: nn.Module, teacher: nn.Module | None) -> None:
    """Say where training runs and in which dtypes (off the CPU: the models' load lines say the rest)."""
    if device.type != "cpu":
        log.info("training on %s (%d process%s): student %s%s", device, num_processes,
                 "" if num_processes == 1 else "es", _dtype_name(student),
                 "" if teacher is None else f", teacher {_dtype_name(teacher)}")


class TrainLog:
    """The training loop's records and progress display.

    ``train_config``: the run's :class:`pocl.config.TrainConfig`; ``main``: this is the main process
    (the others write nothing); ``resume_step``: the step a resumed run continues from (later records
    are dropped); ``planned_total``/``initial``: what the progress counts to and where it starts."""

    def __init__(self, output_dir: Path, train_config, *, main: bool, resume_step: int | None, planned_total: int,
                 initial: int):
        """Open the metrics files and the progress display (main process)."""
        self.every = train_config.log_every
        self.metrics = MetricsLogger(output_dir, enabled=main, resume_step=resume_step,
                                     report_to=trackers.effective_trackers(train_config))
        self.progress = None
        if main:
            # A bar on a terminal (unless --no-progress), else a plain line every log_every steps.
            self.progress = make_progress(planned_total, desc="distill", unit="step", bar=train_config.progress,
                                          every=train_config.log_every, initial=initial, logger=log)
        self.start_stage()

    def start_stage(self) -> None:
        """Start a new window of step statistics (at the start of every stage)."""
        self._stats: list[dict[str, float]] = []
        self._t_last = time.perf_counter()

    def step(self, stats: dict[str, float], state, *, stage, stage_index: int, num_stages: int,
             steps_per_epoch: int, end_of_stage: bool) -> None:
        """Record one optimizer step's statistics: a train record when one is due (every ``log_every``
        steps and at the end of the stage), and the progress display (the loss shown is the mean over
        the steps since the last record when one was written)."""
        self._stats.append(stats)
        shown_loss = stats["loss"]
        if state.global_step % self.every == 0 or end_of_stage:
            now = time.perf_counter()
            rec = window_record(self._stats, now - self._t_last, state)
            rec.update(step=state.global_step, stage=stage.name, stage_index=stage_index,
                       epoch=state.stage_step / steps_per_epoch,
                       temperature=stage.temperature, alpha=stage.alpha, split="train")
            self.metrics.log(rec, tb_prefix="train")
            self._stats, self._t_last = [], now
            shown_loss = rec.get("loss", shown_loss)  # the mean over the steps since the last line
        if self.progress is not None:
            postfix = {"stage": f"{stage_index + 1}/{num_stages}", "loss": f"{shown_loss:.4f}"}
            if state.skipped_steps:
                postfix["skipped"] = state.skipped_steps
            self.progress.update(1, **postfix)

    def dev(self, dev: dict[str, float], step: int, stage_name: str) -> None:
        """Record one dev evaluation."""
        self.metrics.log(dict(dev, step=step, stage=stage_name, split="dev"), tb_prefix="dev")

    def drop_planned(self, steps: int) -> None:
        """``steps`` planned steps will not run (a stage advanced early): the progress counts to fewer."""
        if self.progress is not None:
            self.progress.set_total(self.progress.total - steps)

    def close(self) -> None:
        """Close the progress display and the metrics files."""
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
