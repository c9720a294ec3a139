"""The trainer's state (what a checkpoint's ``trainer_state.json`` holds under ``state``) and its result.

:class:`TrainState` is saved with :func:`dataclasses.asdict` and restored with ``TrainState(**saved)``:
its field names are the checkpoint format, so they do not change.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pocl.errors import PoclError

__all__ = ["NonFiniteLossError", "StopRequest", "TrainResult", "TrainState"]

log = logging.getLogger("pocl.train")


class NonFiniteLossError(PoclError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""

    @classmethod
    def in_a_row(cls, state: TrainState, checkpoints: Path) -> NonFiniteLossError:
        """The error of ``state.consecutive_nonfinite`` (>= --max-nonfinite-steps) non-finite steps in a row."""
        return cls(f"{state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient (last at "
                   f"global step {state.global_step}); stopping without writing the current weights. The last good "
                   f"checkpoint is in {checkpoints}. Lower the learning rate, check the data, or raise "
                   "--max-nonfinite-steps.")

    @classmethod
    def never_updated(cls, steps: int, final_dir: Path) -> NonFiniteLossError:
        """The error of a run whose ``steps`` steps (fewer than --max-nonfinite-steps) were all skipped."""
        return cls(f"all {steps} optimizer steps of the run had a non-finite loss or gradient, so the student was "
                   f"never updated; not writing {final_dir}. Lower the learning rate, check the data and the "
                   "teacher, or check the student's weights.")


@dataclasses.dataclass
class TrainState:
    """Where a run stands: position, non-finite guard, best-model tracking, timings, GKD counters."""

    global_step: int = 0
    stage_index: int = 0
    stage_step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    # Best model and plateau (pocl.training.selection): real values of the metric named by
    # selection_metric (None in checkpoints of older versions, which stored dev ROUGE-L negated).
    best_metric: float | None = None
    best_step: int | None = None
    stage_best_metric: float | None = None
    stage_bad_evals: int = 0
    selection_metric: str | None = None
    train_seconds: float = 0.0
    stage_summaries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stage_started_at_seconds: float = 0.0
    finished: bool = False
    # GKD: optimizer steps trained on student samples (fresh or from the replay buffer), run and stage
    on_policy_steps: int = 0
    replayed_steps: int = 0
    stage_on_policy_steps: int = 0
    stage_replayed_steps: int = 0
    generation_seconds: float = 0.0
    # TAID (loss.method taid): t, momentum, previous loss (pocl.training.taid.TaidState as a dict)
    taid: dict[str, Any] | None = None
    # Speculative KD (loss.method skd): the run's drafted, accepted and replaced tokens and blocks
    # (pocl.training.speculative.SpeculativeStats as a dict)
    skd: dict[str, int] | None = None
    # curriculum.remeasure: the sample ids each stage took when it started, by stage index (str)
    remeasured: dict[str, list[str]] | None = None

    def begin_stage(self) -> None:
        """Reset the per-stage fields as a stage starts (not on a resume inside it)."""
        self.stage_best_metric = None
        self.stage_bad_evals = 0
        self.stage_started_at_seconds = self.train_seconds
        self.stage_on_policy_steps = 0
        self.stage_replayed_steps = 0


@dataclasses.dataclass
class TrainResult:
    """What :meth:`pocl.training.trainer.DistillTrainer.train` returns."""

    status: str  # "completed" or "interrupted"
    output_dir: Path
    final_dir: Path | None
    best_dir: Path | None
    summary: dict[str, Any]
    #: True when the output folder already held this run, completed: nothing was trained or written
    already_completed: bool = False


class StopRequest:
    """A request to stop after the current optimizer step (the trainer then saves a checkpoint and
    returns "interrupted"): :meth:`request`, or SIGINT/SIGTERM while :meth:`install` ed (a second
    signal stops at once)."""

    def __init__(self):
        """No request yet."""
        #: the signal number of the request; None: no request
        self.signum: int | None = None

    def request(self) -> None:
        """Ask to stop (as SIGTERM does)."""
        self.signum = int(signal.SIGTERM)

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def install(self) -> Callable[[], None]:
        """Catch SIGINT and SIGTERM (on the main thread only, where handlers can be installed); returns
        the function that puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            """The first signal asks to stop after the step; a second one stops now."""
            if self.signum is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum
            log.warning("received %s: finishing the current step, saving a checkpoint and exiting",
                        signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            """Put the previous SIGINT and SIGTERM handlers back."""
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore
