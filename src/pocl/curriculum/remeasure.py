"""Re-measuring between stages (``--remeasure``): rank the samples no stage has trained on yet again with
the *current* student before each stage after the first.

The paper ranks once, with the initial student. As the student learns, what is easy for it changes; with
``curriculum.remeasure`` the Baby Step stages keep their sizes (N_1 < N_2 < ... < N_n), but stage s
(s >= 2) takes its N_s - N_{s-1} new samples from the easiest of the samples not yet in stage s-1, ranked
by the student as it stands when stage s starts (the same measurer, signals and decoding as the first
ranking; the teacher signals with the run's teacher). Stage 1 is the first ranking's easiest N_1.

**Cost.** Before stage s the measurer runs over the N - N_{s-1} remaining samples: with n equal slices
the re-measurements together cover (n - 1) / 2 times the training set, 3/4 + 2/4 + 1/4 = 1.5 first
rankings for the default 4 stages. Each one is logged with its seconds, recorded in ``summary.json``
(``remeasure``), and its ranking is written to ``OUTPUT_DIR/rankings/stage-S.jsonl``.

**Resume.** A stage's samples, once chosen, are kept in the trainer state (``TrainState.remeasured``), so
a resume inside the stage trains on the same samples without measuring again; a resume at a stage
boundary measures again with the restored student, which gives the same ranking (the restored weights
are bit-identical and the measurement is seeded). Every process measures all remaining samples itself
(the same weights and seed give the same ranking everywhere; no communication).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pocl.artifacts import atomic_write
from pocl.errors import ConfigError

from .difficulty import (
    measure_difficulty,
    measurer_needs,
    measurer_needs_teacher,
    rank_samples,
    ranking_decoding,
)
from .ranking_stamps import GENERATION_SEED, ranking_data_settings, resolve_settings

log = logging.getLogger("pocl.curriculum")

__all__ = ["StageRemeasure"]


class StageRemeasure:
    """A stage hook of the trainer (``DistillTrainer(stage_hooks=[...])``): before stage ``i`` >= 1 starts,
    choose its samples by ranking the remaining ones with the current student (see the module doc).

    ``config``: the run's :class:`pocl.config.DistillConfig`; ``records``: the training records (their ids
    are the stages' sample ids); ``tokenizer``: the run's; ``teacher``: the run's teacher (needed by the
    teacher measurers)."""

    def __init__(self, config, *, records: Sequence[Any], tokenizer, teacher=None):
        """ConfigError when the measurer needs a teacher and there is none."""
        self.cfg = config
        self.records = {r.id: r for r in records}
        self.tokenizer = tokenizer
        self.teacher = teacher
        measurer = config.curriculum.measurer
        if measurer_needs_teacher(measurer) and teacher is None:
            raise ConfigError(f"curriculum.remeasure with curriculum.measurer {measurer}: the measurer needs the "
                              "teacher, and this run has none")
        self.settings, self.template = resolve_settings(ranking_data_settings(config.data), tokenizer)

    def __call__(self, trainer, index: int) -> None:
        """Set ``trainer.stages[index]``'s samples (and the trainer's data plan) before stage ``index`` runs."""
        if index == 0:
            return
        state = trainer.state
        chosen = dict(state.remeasured or {})
        if str(index) not in chosen:
            previous = chosen.get(str(index - 1)) or trainer.stages[index - 1].sample_ids
            with trainer.parallel.gathered():  # the measurement's passes differ in number (FSDP2: gathered first)
                chosen[str(index)] = self.choose(trainer, index, list(previous))
            state.remeasured = chosen
        ids = tuple(chosen[str(index)])
        if trainer.stages[index].sample_ids != ids:
            trainer.stages[index] = dataclasses.replace(trainer.stages[index], sample_ids=ids)
            trainer.replan()

    def choose(self, trainer, index: int, previous: list[str]) -> list[str]:
        """Stage ``index``'s sample ids: ``previous`` (stage index - 1's) plus the easiest of the rest by the
        current student, as many as the stage's size needs. Writes the ranking and records the cost."""
        stage = trainer.stages[index]
        size = len(stage.sample_ids) if stage.sample_ids is not None else len(self.records)
        kept = set(previous)
        remaining = [r for sid, r in self.records.items() if sid not in kept]
        need = size - len(previous)
        if need <= 0 or not remaining:
            return list(previous)
        cur = self.cfg.curriculum
        needs = measurer_needs(cur.measurer)
        t0 = time.perf_counter()
        with trainer.autocast():
            difficulties = measure_difficulty(
                trainer.student, self.tokenizer, remaining, template=self.template,
                max_length=self.settings["max_length"], max_prompt_length=self.settings["max_prompt_length"],
                truncation_side=self.settings["truncation_side"], decoding=ranking_decoding(cur),
                batch_size=cur.rank_batch_size, need_rouge="rouge_l" in needs, need_loss="loss" in needs,
                seed=GENERATION_SEED, progress=self.cfg.train.progress and trainer.accelerator.is_main_process,
                teacher=self.teacher if measurer_needs_teacher(cur.measurer) else None)  # the first ranking's
        ranking = rank_samples(difficulties, cur.measurer, k=cur.rrf_k, seed=self.cfg.train.seed)
        seconds = time.perf_counter() - t0
        new = [r.id for r in ranking[:need]]
        if trainer.accelerator.is_main_process:
            path = Path(self.cfg.train.output_dir) / "rankings" / f"stage-{index + 1}.jsonl"
            atomic_write(path, "".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in ranking), make_parents=True)
        record = {"stage": stage.name, "index": index, "measured_samples": len(remaining), "added": len(new),
                  "seconds": seconds}
        trainer.summary_extra.setdefault("remeasure", []).append(record)
        log.info("remeasure before stage %d '%s': ranked the %d remaining samples with the current student in %.1f s "
                 "(%s); the stage adds the easiest %d", index + 1, stage.name, len(remaining), seconds, cur.measurer,
                 len(new))
        return list(previous) + new
