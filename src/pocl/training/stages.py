"""A training stage: the unit the trainer runs. Plain KD is one stage; POCL is a list of them.

A stage names the samples it trains on and the knobs that hold during it. Only the model weights
carry over from one stage to the next; each stage starts a fresh optimizer state and learning-rate
schedule (the POCL recipe), unless ``restart_optimizer`` is False.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pocl.errors import ConfigError


@dataclasses.dataclass
class Stage:
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

    def __post_init__(self) -> None:
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
        if self.sample_ids is not None:
            self.sample_ids = tuple(self.sample_ids)
            if not self.sample_ids:
                raise ConfigError(f"{where}: has no samples")

    def steps_per_epoch(self, num_samples: int, batch_size: int) -> int:
        return max(1, math.ceil(num_samples / batch_size))

    def total_steps(self, num_samples: int, batch_size: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(num_samples, batch_size)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = None if self.sample_ids is None else len(self.sample_ids)
        d.pop("sample_ids")
        return d


def check_stages(stages: Sequence[Stage]) -> None:
    if not stages:
        raise ConfigError("at least one training stage is needed")
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"stage names must be unique; repeated: {', '.join(dupes)}")
