"""POCL as a plug-in curriculum for ``transformers.Trainer`` and the TRL trainers built on it
(``trl.experimental.gkd.GKDTrainer``, ``trl.SFTTrainer``): see ``docs/integrations.md``.

:class:`PoclCurriculum` reads pocl's ranking file, cuts it into pocl's Baby Step stages
(:func:`pocl.curriculum.baby_step_stages`) and :meth:`PoclCurriculum.attach` plugs it into a trainer:
the trainer reads its training data through a :class:`~pocl.integrations.sampler.CurriculumSampler`
(one trainer epoch holds the whole curriculum) and :class:`PoclCurriculumCallback` applies each stage
at its first optimizer step: it sets the stage's knobs on the trainer (``temperature``, ``beta``,
``lmbda`` for GKD; ``temperature`` and ``alpha`` for a custom ``compute_loss``), clears the optimizer
state (a fresh AdamW) and starts a new learning-rate schedule over the stage's steps. Stages advance
after a number of epochs (over the stage's samples), of optimizer steps, or on a plateau of an
evaluation metric. The curriculum state lives in the ``TrainerState`` (``stateful_callbacks``), so
``trainer.train(resume_from_checkpoint=...)`` continues in the same stage with the same order.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from pocl.config import CurriculumConfig
from pocl.curriculum import baby_step_stages, ranked_ids, read_ranking
from pocl.errors import ConfigError

from .sampler import CurriculumSampler, dataset_ids, stage_indices

log = logging.getLogger("pocl.integrations")

__all__ = ["ADVANCE", "GKD_KNOBS", "LOSS_KNOBS", "PoclCurriculum", "PoclCurriculumCallback"]

ADVANCE = ("epochs", "steps", "plateau")
#: The trainer attributes set per stage for a GKD-like trainer (it has ``lmbda`` and ``beta``) ...
GKD_KNOBS = ("temperature", "beta", "lmbda")
#: ... and for any other trainer (a custom ``compute_loss`` reads ``self.alpha`` and ``self.temperature``).
LOSS_KNOBS = ("temperature", "alpha")


class PoclCurriculum:
    """The Baby Step curriculum of a pocl ranking over a dataset, ready to :meth:`attach` to a trainer.

    ``ranking``: a ranking file (``ranking.jsonl`` of ``pocl rank`` / :func:`rank_dataset`) or a list of
    sample ids, easiest first. ``dataset``: the trainer's training dataset; ``id_field``: its id column
    (the id rule: :mod:`pocl.integrations.sampler`). ``config``: a :class:`pocl.config.CurriculumConfig`
    for the stages (num_stages, t_start, t_max, alpha_start, alpha_end, on_policy_fraction_start/end,
    ``stages`` overrides); ``stage_epochs`` and ``plateau_patience`` of it are used when ``advance`` is
    "epochs" or "plateau". ``advance``: "epochs" (each stage runs ``config.stage_epochs`` passes over its
    samples), "steps" (``stage_steps`` optimizer steps per stage: an int or one per stage) or "plateau"
    (as "epochs", or "steps" when ``stage_steps`` is given, but a stage ends early when ``metric`` of the
    trainer's evaluation has not improved for ``patience`` evaluations; never the last stage).
    ``stage_values``: per-stage knob values (one mapping per stage, e.g. ``{"beta": 0.5}``) merged over
    pocl's (``temperature``, ``alpha``, and ``lmbda`` = the stage's on-policy fraction when the config
    sets one). ``seed``: of the per-epoch shuffles (default: the trainer's ``args.seed``).
    """

    def __init__(self, ranking: str | os.PathLike | Sequence[str], dataset: Any, *, id_field: str | None = None,
                 config: CurriculumConfig | None = None, advance: str = "epochs",
                 stage_steps: int | Sequence[int] | None = None, metric: str = "eval_loss",
                 greater_is_better: bool | None = None, patience: int | None = None,
                 stage_values: Sequence[Mapping[str, float]] | None = None, seed: int | None = None):
        if advance not in ADVANCE:
            raise ConfigError(f"advance must be one of {', '.join(ADVANCE)} (got {advance!r})")
        self.config = config or CurriculumConfig(curriculum="pocl")
        if isinstance(ranking, (str, os.PathLike)):
            ranked, _ = read_ranking(ranking)
            ids = ranked_ids(ranked)
        else:
            ids = [str(i) for i in ranking]
        self.stages = baby_step_stages(ids, self.config, base_skew=0.1)
        n = len(self.stages)
        self.dataset_ids = dataset_ids(dataset, id_field)
        self.stage_indices = stage_indices(self.stages, self.dataset_ids)
        self.advance = advance
        if isinstance(stage_steps, int):
            stage_steps = [stage_steps] * n
        if stage_steps is not None and len(stage_steps) != n:
            raise ConfigError(f"{len(stage_steps)} stage_steps for {n} stages")
        if advance == "steps" and stage_steps is None:
            raise ConfigError("advance='steps' needs stage_steps (an int, or one per stage)")
        self.stage_steps = None if stage_steps is None else [int(x) for x in stage_steps]
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater_is_better = (not self.metric.endswith("loss")) if greater_is_better is None else greater_is_better
        self.patience = patience if patience is not None else self.config.plateau_patience
        if advance == "plateau" and (self.patience is None or self.patience < 1):
            raise ConfigError("advance='plateau' needs patience >= 1 (or config.plateau_patience)")
        values = [dict(v) for v in (stage_values or [])]
        if len(values) > n:
            raise ConfigError(f"{len(values)} stage_values for {n} stages")
        values += [{}] * (n - len(values))
        self.stage_values = []
        for st, extra in zip(self.stages, values):
            v: dict[str, float] = {"temperature": st.temperature, "alpha": st.alpha}
            if st.on_policy_fraction is not None:
                v["lmbda"] = st.on_policy_fraction
            v.update(extra)
            self.stage_values.append(v)
        self.seed = seed
        self.sampler: CurriculumSampler | None = None

    def plan_steps(self, step_size: int) -> list[int]:
        """Planned optimizer steps of each stage for ``step_size`` samples per step: ``stage_steps``, else the
        stage's ``max_steps`` (``config.stages[i]["max_steps"]``), else ``ceil(epochs x stage samples / step_size)``."""
        if self.stage_steps is not None:
            return list(self.stage_steps)
        return [st.max_steps if st.max_steps is not None else max(1, math.ceil(st.epochs * len(idx) / step_size))
                for st, idx in zip(self.stages, self.stage_indices)]

    def make_sampler(self, step_size: int, seed: int) -> CurriculumSampler:
        """A fresh sampler over the stages for ``step_size`` samples per optimizer step."""
        return CurriculumSampler(self.stage_indices, self.plan_steps(step_size), step_size=step_size,
                                 seed=self.seed if self.seed is not None else seed,
                                 stage_names=[st.name for st in self.stages])

    def attach(self, trainer, *, knobs: Sequence[str] | None = None, reset_optimizer: bool = True,
               gkd_loss_temperature: bool = True) -> PoclCurriculumCallback:
        """Plug the curriculum into ``trainer`` (before ``trainer.train()``); returns the callback.

        Sets ``trainer.args.max_steps`` to the curriculum's steps when it is not set (a smaller value
        given caps the run), makes the trainer read its data through the curriculum sampler and adds
        the callback. ``knobs``: the trainer attributes set per stage (default :data:`GKD_KNOBS` when the
        trainer has ``lmbda`` and ``beta``, else :data:`LOSS_KNOBS`); a knob without a value in a stage
        is left alone. ``reset_optimizer``: a fresh optimizer state and LR schedule per stage (POCL).
        ``gkd_loss_temperature``: TRL's GKDTrainer does not pass its ``temperature`` to its loss (only to
        sampling); with this on, its ``generalized_jsd_loss`` gets ``temperature=trainer.temperature``.
        Refuses (ConfigError) several processes, a dataset other than the curriculum's, a
        ``reduce_lr_on_plateau`` schedule and DeepSpeed (whose optimizer cannot be reset this way).
        """
        args = trainer.args
        if getattr(args, "world_size", 1) != 1:
            raise ConfigError("pocl.integrations supports one training process (got world_size "
                              f"{args.world_size}); use `pocl distill` for multi-GPU POCL")
        if getattr(trainer, "is_deepspeed_enabled", False) and reset_optimizer:
            raise ConfigError("DeepSpeed owns the optimizer and its schedule: pocl cannot reset them per stage; "
                              "pass reset_optimizer=False to keep one optimizer for the whole run")
        kind = getattr(args, "lr_scheduler_type", "")
        if str(getattr(kind, "value", kind)) == "reduce_lr_on_plateau":
            raise ConfigError("lr_scheduler_type reduce_lr_on_plateau cannot be restarted per stage; use a "
                              "step-based schedule (cosine, linear, constant ...)")
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ConfigError("restore_callback_states_from_checkpoint=True would rebuild the pocl callback without "
                              "its curriculum; leave it False: the callback restores its own state on resume")
        if getattr(args, "ignore_data_skip", False):
            raise ConfigError("ignore_data_skip=True: a resumed run would restart the curriculum's order from its "
                              "first sample; leave it False")
        if not hasattr(trainer.train_dataset, "__len__") or len(trainer.train_dataset) != len(self.dataset_ids):
            raise ConfigError("the trainer's train_dataset is not the dataset of the curriculum (row counts differ)")
        strategy = getattr(args, "eval_strategy", "no")
        if self.advance == "plateau" and str(getattr(strategy, "value", strategy)) == "no":
            raise ConfigError("advance='plateau' needs evaluations: set eval_strategy ('steps' or 'epoch') and "
                              "an eval_dataset")
        step_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.sampler = self.make_sampler(step_size, args.seed)
        if args.max_steps is None or args.max_steps <= 0:
            args.max_steps = self.sampler.total_steps()
        trainer._get_train_sampler = lambda *a, **k: self.sampler
        if knobs is None:
            knobs = GKD_KNOBS if hasattr(trainer, "lmbda") and hasattr(trainer, "beta") else LOSS_KNOBS
        if gkd_loss_temperature and "temperature" in knobs and hasattr(trainer, "generalized_jsd_loss"):
            _pass_temperature_to_gkd_loss(trainer)
        callback = PoclCurriculumCallback(self, trainer, knobs=tuple(knobs), reset_optimizer=reset_optimizer)
        trainer.add_callback(callback)
        return callback


def _pass_temperature_to_gkd_loss(trainer) -> None:
    """Make GKDTrainer's loss use ``trainer.temperature`` (TRL 1.x calls it without a temperature)."""
    original = trainer.generalized_jsd_loss

    def tempered(*args, **kwargs):
        kwargs.setdefault("temperature", trainer.temperature)
        return original(*args, **kwargs)

    trainer.generalized_jsd_loss = tempered


class PoclCurriculumCallback(TrainerCallback, ExportableState):
    """Applies the stages of a :class:`PoclCurriculum` while a trainer runs (made by ``attach``).

    :attr:`history`: one entry per stage applied: ``{"stage", "name", "step", "samples", "fresh_optimizer",
    "values"}`` (``values``: the knobs set). The state saved with every checkpoint: the stage lengths
    (changed by plateau ends), the plateau counters and the history."""

    def __init__(self, curriculum: PoclCurriculum, trainer, *, knobs: tuple[str, ...], reset_optimizer: bool = True):
        self.curriculum = curriculum
        self.trainer = trainer
        self.knobs = knobs
        self.reset_optimizer = reset_optimizer
        self.applied: int | None = None
        self.best: float | None = None
        self.bad = 0
        self.history: list[dict[str, Any]] = []

    @property
    def sampler(self) -> CurriculumSampler:
        return self.curriculum.sampler

    # ---------------------------------------------------------------- state in the checkpoint
    def state(self) -> dict:
        return {"args": {}, "attributes": {"sampler": self.sampler.state(), "best": self.best, "bad": self.bad,
                                           "applied": self.applied, "history": self.history}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, list):
            saved = saved[-1]
        if saved:
            attrs = saved.get("attributes", saved)
            self.sampler.load_state(attrs["sampler"])
            self.best, self.bad = attrs.get("best"), attrs.get("bad", 0)
            self.history = list(attrs.get("history") or [])
            self.applied = None  # the knobs are set again at the next step (mid-stage: no optimizer reset)
            log.info("pocl curriculum: resuming at step %d in stage %s", state.global_step,
                     self.sampler.stage_at(state.global_step))
        elif state.global_step > 0:
            raise ConfigError("resuming a run whose checkpoint has no pocl curriculum state: it was not trained "
                              "with this curriculum (or saved without TrainerState)")

    # ---------------------------------------------------------------- stages
    def on_step_begin(self, args, state, control, **kwargs):
        stage = self.sampler.stage_at(state.global_step)
        if stage is None:
            control.should_training_stop = True
            return control
        if stage != self.applied:
            start = self.sampler.starts()[stage]
            self._apply(stage, state.global_step, fresh=state.global_step == start)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.sampler.total_steps():
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.curriculum.advance != "plateau" or not metrics or self.curriculum.metric not in metrics:
            return control
        stage = self.sampler.stage_at(max(state.global_step - 1, 0))
        if stage is None or stage == self.sampler.num_stages - 1:
            return control
        value = float(metrics[self.curriculum.metric])
        better = self.best is None or (value > self.best if self.curriculum.greater_is_better else value < self.best)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad >= self.curriculum.patience:
            self.sampler.end_stage(stage, state.global_step)
            log.info("pocl curriculum: %s plateaued (%s %.4g, no gain in %d evaluations): next stage at step %d",
                     self.sampler.stage_names[stage], self.curriculum.metric, value, self.bad,
                     self.sampler.starts()[stage + 1])
            self.best, self.bad = None, 0
        return control

    def _apply(self, stage: int, step: int, *, fresh: bool) -> None:
        trainer = self.trainer
        values = {k: v for k, v in self.curriculum.stage_values[stage].items() if k in self.knobs}
        for name, value in values.items():
            setattr(trainer, name, value)
        start = self.sampler.starts()[stage]
        steps = self.sampler.planned_steps[stage]
        if self.reset_optimizer:
            if fresh:
                _clear_optimizer_state(trainer.optimizer)
            trainer.lr_scheduler = _stage_scheduler(trainer, steps, already=step - start)
        self.applied = stage
        if fresh or not any(h["stage"] == stage for h in self.history):
            self.history.append({"stage": stage, "name": self.sampler.stage_names[stage], "step": step,
                                 "samples": len(self.sampler.stage_indices[stage]),
                                 "fresh_optimizer": bool(fresh and self.reset_optimizer), "values": values})
        log.info("pocl curriculum: %s from step %d (%d samples, %d steps planned): %s",
                 self.sampler.stage_names[stage], step, len(self.sampler.stage_indices[stage]), steps,
                 ", ".join(f"{k}={v:.4g}" for k, v in values.items()))


def _clear_optimizer_state(optimizer) -> None:
    """Forget the optimizer's moments and step counts: the next step starts as a fresh optimizer would
    (AdamW: exp_avg and exp_avg_sq zero, bias correction from step 1)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    inner.state.clear()


def _stage_scheduler(trainer, steps: int, *, already: int = 0):
    """A new schedule of the trainer's kind (``args.lr_scheduler_type``, its warm-up) over ``steps``
    optimizer steps, advanced by ``already`` steps (a resumed stage)."""
    from transformers import get_scheduler

    args = trainer.args
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps,
                              scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(already):
            scheduler.step()
    return scheduler


def stage_table(curriculum: PoclCurriculum) -> list[dict[str, Any]]:
    """One row per stage (name, samples, planned steps when attached, knob values): for logs and docs."""
    planned = curriculum.sampler.planned_steps if curriculum.sampler is not None else [None] * len(curriculum.stages)
    return [{"name": st.name, "samples": len(idx), "steps": n, **vals} for st, idx, n, vals in
            zip(curriculum.stages, curriculum.stage_indices, planned, curriculum.stage_values)]

