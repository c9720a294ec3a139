"""A training stage: the unit the trainer runs. Plain KD is one stage; POCL is a list of them.

A stage names the samples it trains on and the knobs that hold during it. Only the model weights
carry over from one stage to the next; each stage starts a fresh optimizer state and learning-rate
schedule (the POCL recipe), unless ``restart_optimizer`` is False.

:class:`StagePlan` resolves the stages on the training data. Data order is a pure function of
(seed, stage, epoch): every epoch draws a fresh permutation of the stage's samples, and the position
in the run is just (stage index, optimizer steps done in the stage), so a resumed run reproduces the
uninterrupted one without any sampler state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from pocl.errors import ConfigError


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (sha256 of their text): independent streams by name."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclasses.dataclass
class Stage:
    """One stage of a run: its samples, length, temperature, alpha and optimizer settings."""

    name: str
    sample_ids: tuple[str, ...] | None = None  # None: the whole training set
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs for the length of the stage
    temperature: float = 1.0
    alpha: float = 1.0
    skew: float | None = None  # None: the loss config's skew
    lr: float | None = None  # None: the optimizer config's lr
    restart_optimizer: bool = True
    # Advance early when the dev metric has not improved for this many evaluations (None: never).
    plateau_patience: int | None = None
    # GKD: probability that an optimizer step of this stage trains on student samples (None: the
    # loss config's on_policy_fraction).
    on_policy_fraction: float | None = None
    # Progressive distillation: the teacher of this stage (a model path; None: the run's model.teacher).
    teacher: str | None = None

    def __post_init__(self) -> None:
        """Validate the fields (ConfigError naming the stage)."""
        where = f"stage '{self.name}'"
        if self.epochs <= 0:
            raise ConfigError(f"{where}: epochs must be > 0 (got {self.epochs})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"{where}: max_steps must be > 0 (got {self.max_steps})")
        if self.temperature <= 0:
            raise ConfigError(f"{where}: temperature must be > 0 (got {self.temperature})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{where}: alpha must be in [0, 1] (got {self.alpha})")
        if self.skew is not None and not 0.0 <= self.skew <= 1.0:
            raise ConfigError(f"{where}: skew must be in [0, 1] (got {self.skew})")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"{where}: lr must be > 0 (got {self.lr})")
        if self.plateau_patience is not None and self.plateau_patience < 1:
            raise ConfigError(f"{where}: plateau_patience must be >= 1 (got {self.plateau_patience})")
        if self.on_policy_fraction is not None and not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ConfigError(f"{where}: on_policy_fraction must be in [0, 1] (got {self.on_policy_fraction})")
        if self.teacher is not None and not (isinstance(self.teacher, str) and self.teacher.strip()):
            raise ConfigError(f"{where}: teacher must be a model path (got {self.teacher!r})")
        if self.sample_ids is not None:
            self.sample_ids = tuple(self.sample_ids)
            if not self.sample_ids:
                raise ConfigError(f"{where}: has no samples")

    def steps_per_epoch(self, num_samples: int, batch_size: int) -> int:
        """Optimizer steps of one pass over ``num_samples`` in windows of ``batch_size`` (the last may be short)."""
        return max(1, math.ceil(num_samples / batch_size))

    def total_steps(self, num_samples: int, batch_size: int) -> int:
        """The stage's optimizer steps: ``max_steps``, else ``epochs`` passes (at least one step)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(num_samples, batch_size)))

    def to_dict(self) -> dict:
        """The stage's settings as JSON (the number of its samples instead of their ids)."""
        d = dataclasses.asdict(self)
        d["num_samples"] = None if self.sample_ids is None else len(self.sample_ids)
        d.pop("sample_ids")
        if d["teacher"] is None:
            d.pop("teacher")  # the run's teacher: the settings (and fingerprints) of runs from before the field
        return d


def check_stages(stages: Sequence[Stage]) -> None:
    """Refuse an empty stage list or repeated stage names (ConfigError)."""
    if not stages:
        raise ConfigError("at least one training stage is needed")
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"stage names must be unique; repeated: {', '.join(dupes)}")


class StagePlan:
    """The stages resolved on the training data: each stage's sample indices, its length in optimizer
    steps and the samples of each step (its *window*, ``batch_size`` samples over all processes).

    Refuses (ConfigError) a launch whose process count differs from the accelerator's, a batch size
    that micro-batches x processes do not divide, repeated sample ids and stage ids missing from the data."""

    def __init__(self, stages: Sequence[Stage], train_data, *, batch_size: int, micro_batch_size: int, world: int,
                 seed: int):
        """Resolve ``stages`` on ``train_data`` for windows of ``batch_size`` over ``world`` processes."""
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != world:
            # Each process would train alone on the whole data and they would overwrite each other's files.
            raise ConfigError(f"launched as {env_world} processes but the accelerator sees {world}; create it "
                              "with pocl.launch.make_accelerator (cpu=True on machines without CUDA)")
        if batch_size % (micro_batch_size * world) != 0:
            raise ConfigError(f"train.batch_size ({batch_size}) must be a multiple of micro_batch_size x "
                              f"processes ({micro_batch_size} x {world})")
        self.stages = list(stages)
        self.batch_size = batch_size
        self.seed = seed
        self._index_of = {s.id: i for i, s in enumerate(train_data)}
        if len(self._index_of) != len(train_data):
            raise ConfigError("training sample ids are not unique")
        self._num_samples = len(train_data)
        #: response tokens of every training sample (what a window's loss is normalised by)
        self.target_counts = [s.num_targets for s in train_data]
        #: dataset indices of each stage's samples
        self.stage_indices = [self._resolve(stage) for stage in self.stages]

    def _resolve(self, stage: Stage) -> list[int]:
        """Dataset indices of ``stage``'s samples (all of them when it names none)."""
        if stage.sample_ids is None:
            return list(range(self._num_samples))
        missing = [i for i in stage.sample_ids if i not in self._index_of]
        if missing:
            raise ConfigError(f"stage '{stage.name}' names {len(missing)} sample ids that are not in the training "
                              f"data, e.g. {missing[:3]}")
        return [self._index_of[i] for i in stage.sample_ids]

    def total_steps(self, i: int) -> int:
        """Planned optimizer steps of stage ``i``."""
        return self.stages[i].total_steps(len(self.stage_indices[i]), self.batch_size)

    def steps_per_epoch(self, i: int) -> int:
        """Optimizer steps of one pass over stage ``i``'s samples."""
        return self.stages[i].steps_per_epoch(len(self.stage_indices[i]), self.batch_size)

    def window(self, stage_index: int, stage_step: int) -> list[int]:
        """Dataset indices of the samples of one optimizer step (the whole global batch)."""
        indices = self.stage_indices[stage_index]
        epoch, pos = divmod(stage_step, self.steps_per_epoch(stage_index))
        gen = torch.Generator().manual_seed(stream_seed(self.seed, stage_index, self.stages[stage_index].name, epoch))
        perm = torch.randperm(len(indices), generator=gen).tolist()
        b = self.batch_size
        return [indices[i] for i in perm[pos * b:(pos + 1) * b]]

    def window_tokens(self, window: Sequence[int]) -> int:
        """Response tokens of a window of dataset indices (known to every process: no communication)."""
        return sum(self.target_counts[i] for i in window)

    def planned_total(self, totals: Sequence[int], state) -> int:
        """Optimizer steps of the whole run as planned from where ``state`` stands (steps done so far, the
        rest of the current stage, the later stages): what the progress counts to."""
        i = state.stage_index
        if i >= len(totals):
            return state.global_step
        return state.global_step + max(totals[i] - state.stage_step, 0) + sum(totals[i + 1:])


def stage_record(stage, index: int, *, num_samples: int, planned_steps: int, state, advanced_early: bool,
                 on_policy_fraction: float) -> dict[str, Any]:
    """The summary entry of stage ``index`` as it ends (``state`` at its last step): its settings, sizes,
    steps, on-policy counts, wall time and best value of the selection metric in the stage."""
    return {
        **stage.to_dict(),
        "index": index,
        "num_samples": num_samples,
        "planned_steps": planned_steps,
        "steps": state.stage_step,
        "advanced_early": advanced_early,
        "on_policy_fraction": on_policy_fraction,
        "on_policy_steps": state.stage_on_policy_steps,
        "replayed_steps": state.stage_replayed_steps,
        "end_global_step": state.global_step,
        "train_seconds": state.train_seconds - state.stage_started_at_seconds,
        "best_in_stage": state.stage_best_metric,
        "selection_metric": state.selection_metric,
    }
