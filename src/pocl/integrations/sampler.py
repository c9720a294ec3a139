"""The curriculum sampler: pocl's Baby Step stages over a Hugging Face dataset, as one stream of
dataset indices that a ``transformers.Trainer`` reads in a single epoch.

**Id rule.** Row ``i`` (0-based) of a ``datasets.Dataset`` has the pocl sample id ``str(row[id_field])``
when the row has that column (default ``"id"``) with a value, else ``f"{i:06d}"`` -- the rule of
:func:`pocl.data.load_records` (a dataset saved with ``save_to_disk`` and ranked by ``pocl rank`` gets the
same ids).

**The stream.** Let ``B`` be the samples of one optimizer step (per-device batch x gradient accumulation
x processes). Stage ``s`` starts at optimizer step ``start_s`` and lasts ``steps_s`` steps; its samples
are the concatenation of per-epoch permutations of the stage's dataset indices (epoch ``e`` permuted by
``torch.randperm`` seeded with :func:`pocl.training.stages.stream_seed` of (seed, stage index, stage
name, e)), and optimizer step ``start_s + j`` trains on positions ``j*B .. (j+1)*B - 1`` of it. A step
may therefore take the end of one epoch's permutation and the start of the next one's. The stream is a
pure function of the stage starts, so skipping into it on resume reproduces the uninterrupted order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from pocl.errors import ConfigError
from pocl.training.stages import Stage, stream_seed

__all__ = ["CurriculumSampler", "dataset_ids", "stage_indices"]


def dataset_ids(dataset: Any, id_field: str | None = None) -> list[str]:
    """The pocl sample id of every row of ``dataset`` (module docstring: the id rule); ConfigError for a
    bad id value or a repeated id."""
    from pocl.data.readers import RowError
    from pocl.data.records import (
        _row_id,  # the loader's own rule, so the ids cannot drift apart
    )

    key = id_field or "id"
    has_column = key in (getattr(dataset, "column_names", None) or [])
    if id_field is not None and not has_column:
        raise ConfigError(f"the dataset has no column '{id_field}' (id_field); columns: {dataset.column_names}")
    column = dataset[key] if has_column else [None] * len(dataset)
    ids = []
    for i, value in enumerate(column):
        try:
            ids.append(_row_id({key: value}, key, id_field is not None, i))
        except RowError as exc:
            raise ConfigError(f"row {i} of the dataset: {exc.reason}") from None
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise ConfigError(f"rows {seen[sid]} and {i} of the dataset have the same id '{sid}'; ids must be unique")
        seen[sid] = i
    return ids


def stage_indices(stages: Sequence[Stage], ids: Sequence[str]) -> list[list[int]]:
    """Dataset indices of each stage's samples (easiest first). ConfigError when a stage names an id
    the dataset lacks, or the last stage leaves rows of the dataset out of the ranking."""
    index_of = {sid: i for i, sid in enumerate(ids)}
    out = []
    for st in stages:
        if st.sample_ids is None:
            out.append(list(range(len(ids))))
            continue
        missing = [sid for sid in st.sample_ids if sid not in index_of]
        if missing:
            raise ConfigError(f"the ranking names {len(missing)} sample ids that the dataset lacks, e.g. "
                              f"{missing[:3]}: rank this dataset (pocl.integrations.rank_dataset) or check id_field")
        out.append([index_of[sid] for sid in st.sample_ids])
    ranked = set().union(*(set(s) for s in out)) if out else set()
    if len(ranked) < len(ids) and all(st.sample_ids is not None for st in stages):
        unranked = [ids[i] for i in range(len(ids)) if i not in ranked]
        raise ConfigError(f"{len(unranked)} rows of the dataset are not in the ranking, e.g. {unranked[:3]}; "
                          "rank the dataset the trainer reads")
    return out


class CurriculumSampler(torch.utils.data.Sampler):
    """Dataset indices of the whole curriculum in order (module docstring). ``stage_steps[s]``: the
    planned optimizer steps of stage s; ``step_size``: samples per optimizer step (B). A stage may be
    ended early (:meth:`end_stage`, plateau); later stages then start earlier. :attr:`drawn` counts the
    indices handed out so far (what the data loader has fetched, prefetched batches included)."""

    def __init__(self, stage_indices: Sequence[Sequence[int]], stage_steps: Sequence[int], *, step_size: int,
                 seed: int, stage_names: Sequence[str] | None = None):
        if len(stage_indices) != len(stage_steps) or not stage_steps:
            raise ConfigError(f"{len(stage_indices)} stages of samples for {len(stage_steps)} stage lengths")
        if any(not isinstance(n, int) or n < 1 for n in stage_steps):
            raise ConfigError(f"every stage needs at least one optimizer step (got {list(stage_steps)})")
        if step_size < 1:
            raise ConfigError(f"step_size must be >= 1 (got {step_size})")
        self.stage_indices = [list(s) for s in stage_indices]
        self.planned_steps = list(stage_steps)
        self.step_size = step_size
        self.seed = seed
        self.stage_names = list(stage_names or [f"stage{i + 1}" for i in range(len(stage_steps))])
        #: steps each stage actually lasts (the planned ones, or fewer for a stage ended early)
        self.steps = list(stage_steps)
        self.drawn = 0
        self._orders: dict[tuple[int, int], list[int]] = {}

    # ---------------------------------------------------------------- the plan
    @property
    def num_stages(self) -> int:
        return len(self.steps)

    def starts(self) -> list[int]:
        """The optimizer step at which each stage starts."""
        out, total = [], 0
        for n in self.steps:
            out.append(total)
            total += n
        return out

    def total_steps(self) -> int:
        """Optimizer steps of the whole curriculum (as planned now)."""
        return sum(self.steps)

    def stage_at(self, step: int) -> int | None:
        """The stage (0-based) of optimizer step ``step`` (0-based); None past the last stage."""
        for s, (start, n) in enumerate(zip(self.starts(), self.steps)):
            if start <= step < start + n:
                return s
        return None

    def end_stage(self, stage: int, at_step: int) -> None:
        """End ``stage`` before optimizer step ``at_step`` (the next stage starts there): plateau advance.
        Never lengthens a stage, never moves a step already handed out to the data loader."""
        start = self.starts()[stage]
        first_free = math.ceil(self.drawn / self.step_size)
        at_step = max(at_step, first_free, start + 1)
        self.steps[stage] = min(self.steps[stage], at_step - start)

    def identity(self) -> dict[str, Any]:
        """What the order depends on: the planned steps, the step size, the seed and a hash of the stages'
        dataset indices (a resumed run must have the same)."""
        digest = hashlib.sha256(json.dumps([self.stage_indices, self.stage_names]).encode()).hexdigest()[:16]
        return {"planned": list(self.planned_steps), "step_size": self.step_size, "seed": self.seed, "stages": digest}

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), **self.identity()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take the stage lengths of a checkpoint; ConfigError when it was made with another ranking, stage
        list, batch size or seed."""
        steps = list(state["steps"])
        mine = self.identity()
        differ = [k for k, v in mine.items() if k in state and state[k] != v]
        if differ or len(steps) != len(self.steps) or any(a > b for a, b in zip(steps, self.planned_steps)):
            what = ", ".join(f"{k} {state[k]!r} vs {mine[k]!r}" for k in differ) or f"stage steps {steps}"
            raise ConfigError(f"the checkpoint's curriculum does not fit this one ({what}): resume with the same "
                              "ranking, stages, batch size and seed")
        self.steps = steps

    # ---------------------------------------------------------------- the order
    def epoch_order(self, stage: int, epoch: int) -> list[int]:
        """Dataset indices of ``stage`` in the order of its ``epoch``-th pass (0-based)."""
        key = (stage, epoch)
        if key not in self._orders:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, stage, self.stage_names[stage], epoch))
            perm = torch.randperm(len(self.stage_indices[stage]), generator=gen).tolist()
            if len(self._orders) > 64:
                self._orders.clear()
            self._orders[key] = [self.stage_indices[stage][i] for i in perm]
        return self._orders[key]

    def step_samples(self, step: int) -> list[int]:
        """Dataset indices of optimizer step ``step`` (0-based; ``step_size`` of them)."""
        return [self._index(p) for p in range(step * self.step_size, (step + 1) * self.step_size)]

    def _index(self, position: int) -> int | None:
        step = position // self.step_size
        stage = self.stage_at(step)
        if stage is None:
            return None
        within = position - self.starts()[stage] * self.step_size
        n = len(self.stage_indices[stage])
        epoch, offset = divmod(within, n)
        return self.epoch_order(stage, epoch)[offset]

    def __iter__(self):
        self.drawn = 0
        position = 0
        while True:
            index = self._index(position)  # the plan is read at every draw: a plateau end applies at once
            if index is None:
                return
            position += 1
            self.drawn = position
            yield index

    def __len__(self) -> int:
        return self.total_steps() * self.step_size
