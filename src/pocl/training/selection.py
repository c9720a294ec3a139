"""Dev metrics that choose the best model (``OUTPUT_DIR/best``) and detect a stage's plateau.

Every metric has a known direction, so no code negates a metric to make "lower is better" hold:
the trainer stores and reports the real values (``summary.json``'s ``best_metric`` is a real dev
ROUGE-L or a real dev CE) and compares them with :func:`is_better`.

========================  =========  =============================================================
metric                    better     what it is
========================  =========  =============================================================
``dev_rouge_l`` (default) higher     ROUGE-L F x 100 of answers sampled for dev prompts (spec, §3)
``dev_ce``                lower      cross-entropy of the references at T = 1 (comparable across stages)
``dev_loss``              lower      the training objective at the stage's T and alpha (changes
                                     meaning from one curriculum stage to the next)
``dev_kd``                lower      the divergence term alone at the stage's T (logged, not selectable)
========================  =========  =============================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from pocl.errors import ConfigError

log = logging.getLogger("pocl.train")


@dataclasses.dataclass(frozen=True)
class DevMetric:
    name: str
    higher_is_better: bool
    description: str

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


METRICS: dict[str, DevMetric] = {m.name: m for m in (
    DevMetric("dev_rouge_l", True, "ROUGE-L F x 100 of answers sampled (T = 1, the run's seed) for dev prompts"),
    DevMetric("dev_ce", False, "cross-entropy of the dev references at T = 1"),
    DevMetric("dev_loss", False, "the training objective on the dev set at the stage's T and alpha"),
    DevMetric("dev_kd", False, "the divergence term on the dev set at the stage's T"),
)}

#: The metrics ``--selection-metric`` accepts (``TrainConfig.selection_metric``), the default first.
SELECTABLE = ("dev_rouge_l", "dev_ce", "dev_loss")

#: Minimal change of the stage's best value that counts as an improvement for the plateau rule.
PLATEAU_MIN_DELTA = 1e-6


def metric(name: str) -> DevMetric:
    if name not in METRICS:
        from pocl.errors import suggest

        raise ConfigError(f"unknown dev metric '{name}'{suggest(name, METRICS)}; known: {', '.join(METRICS)}")
    return METRICS[name]


def is_better(name: str, value: float, best: float | None, *, min_delta: float = 0.0) -> bool:
    """True when ``value`` of metric ``name`` improves on ``best`` by more than ``min_delta`` (None: no
    best yet, any finite value improves). Equal values never improve: the first of equal scores is kept."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    if metric(name).higher_is_better:
        return value > best + min_delta
    return value < best - min_delta


def dev_rouge_count(train_config, n_dev_records: int) -> int:
    """How many dev samples the dev ROUGE-L is computed on: ``dev_rouge_samples`` (the first N), or all
    of them when it is 0 and the selection metric is dev ROUGE-L; 0 = no dev ROUGE-L."""
    n = train_config.dev_rouge_samples
    if n == 0:
        return n_dev_records if train_config.selection_metric == "dev_rouge_l" else 0
    return min(n, n_dev_records)


class Selection:
    """Best-model and plateau bookkeeping on a trainer's ``TrainState`` (fields ``selection_metric``,
    ``best_metric``, ``best_step``, ``stage_best_metric``, ``stage_bad_evals``), with real metric values.

    ``state.selection_metric`` names the metric the stored values are of. Checkpoints written before
    it existed (None there) stored dev ROUGE-L negated; :meth:`adopt` converts them once, and
    :meth:`update` forgets values of another metric than ``name`` (a run resumed with
    ``--allow-config-change`` and another ``--selection-metric``)."""

    def __init__(self, name: str, state):
        metric(name)
        self.name = name
        self.state = state

    def adopt(self) -> str | None:
        """Make values of an older checkpoint real values; returns the metric they are of (None: none yet)."""
        st = self.state
        if st.selection_metric is not None:
            return st.selection_metric
        values = [v for v in (st.best_metric, st.stage_best_metric) if v is not None]
        if not values:
            return None
        # A checkpoint from before the metric was recorded held dev CE as it is (>= 0) and dev ROUGE-L
        # negated (<= 0). The checkpoint's own selection metric is what the resumed run is configured
        # with, unless the resume allowed a config change; values that cannot be of it are of the other.
        if any(v < 0 for v in values) or (self.name == "dev_rouge_l" and all(v == 0 for v in values)):
            st.best_metric = None if st.best_metric is None else -st.best_metric
            st.stage_best_metric = None if st.stage_best_metric is None else -st.stage_best_metric
            st.selection_metric = "dev_rouge_l"
            log.info("checkpoint of an older pocl: its best dev ROUGE-L was stored negated; converted to %s",
                     st.best_metric)
        else:
            st.selection_metric = "dev_ce"
        return st.selection_metric

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record one evaluation's value of the metric: (a new best of the run, the stage improved)."""
        st = self.state
        held = self.adopt()
        if held is not None and held != self.name:
            log.warning("the best model so far was chosen by %s (up to step %s); from now on %s decides (%s), "
                        "and best/ is replaced now", held, st.best_step, self.name, metric(self.name).direction)
            st.best_metric = st.best_step = st.stage_best_metric = None
            st.stage_bad_evals = 0
        st.selection_metric = self.name
        best = is_better(self.name, value, st.best_metric)
        if best:
            st.best_metric = value
            st.best_step = step
        improved = is_better(self.name, value, st.stage_best_metric, min_delta=PLATEAU_MIN_DELTA)
        if improved:
            st.stage_best_metric = value
            st.stage_bad_evals = 0
        else:
            st.stage_bad_evals += 1
        return best, improved


def fallback_metric(configured: str, dev: dict[str, Any]) -> tuple[str, str | None]:
    """The metric an evaluation can be judged by: the configured one when ``dev`` has it; dev CE (with
    the reason) when dev ROUGE-L was asked for but not computed (a trainer built without dev records)."""
    if configured in dev:
        return configured, None
    if configured == "dev_rouge_l" and "dev_ce" in dev:
        return "dev_ce", ("selection_metric dev_rouge_l: no dev ROUGE-L was computed (the trainer has dev data but "
                          "no dev records: pass dev_records= to DistillTrainer); the best model is chosen by dev_ce")
    raise ConfigError(f"train.selection_metric {configured}: the dev evaluation has no such value "
                      f"(it has {', '.join(sorted(dev))})")
