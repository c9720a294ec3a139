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

The trainer's side of it: :class:`DevEvaluator` computes a dev evaluation (the dev loss terms and,
with dev records, dev ROUGE-L), :func:`track_dev` updates the best model and the stage's plateau
from one evaluation, :func:`log_dev` writes its log line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import pocl.evaluation.runner as eval_runner
from pocl.config import SELECTABLE_METRICS
from pocl.data import get_template
from pocl.errors import ConfigError, suggest
from pocl.generation import DecodingConfig
from pocl.model_checks import first_nonfinite_tensor
from pocl.training.stages import Stage
from pocl.training.student_loss import batch_on, length_batches, reduce_sum

log = logging.getLogger("pocl.train")


@dataclasses.dataclass(frozen=True)
class DevMetric:
    """A dev metric: its name, its direction and what it is."""

    name: str
    higher_is_better: bool
    description: str

    @property
    def direction(self) -> str:
        """"higher is better" or "lower is better"."""
        return "higher is better" if self.higher_is_better else "lower is better"


METRICS: dict[str, DevMetric] = {m.name: m for m in (
    DevMetric("dev_rouge_l", True, "ROUGE-L F x 100 of answers sampled (T = 1, the run's seed) for dev prompts"),
    DevMetric("dev_ce", False, "cross-entropy of the dev references at T = 1"),
    DevMetric("dev_loss", False, "the training objective on the dev set at the stage's T and alpha"),
    DevMetric("dev_kd", False, "the divergence term on the dev set at the stage's T"),
)}

#: The metrics ``--selection-metric`` accepts (``TrainConfig.selection_metric``), the default first.
SELECTABLE = SELECTABLE_METRICS  # the one list is the config's (pocl.config.distill.SelectionMetric)

#: Minimal change of the stage's best value that counts as an improvement for the plateau rule.
PLATEAU_MIN_DELTA = 1e-6


def metric(name: str) -> DevMetric:
    """The dev metric called ``name`` (ConfigError, with a suggestion, for an unknown name)."""
    if name not in METRICS:
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
        """Bookkeeping of metric ``name`` (validated) on ``state`` (a ``TrainState``)."""
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


def dev_rouge_records(train_config, dev_records: Sequence | None) -> list:
    """The first ``dev_rouge_samples`` dev records, or all of them when 0 and best/ is chosen by dev
    ROUGE-L (:func:`dev_rouge_count`); ConfigError when dev ROUGE-L is asked for without dev records."""
    records = list(dev_records or [])[: dev_rouge_count(train_config, len(dev_records or []))]
    if train_config.dev_rouge_samples > 0 and not records:
        raise ConfigError("train.dev_rouge_samples: dev ROUGE-L needs dev records (give --dev-file)")
    return records


class DevEvaluator:
    """One dev evaluation of the student: the dev loss at a stage's temperature and alpha, the reference
    CE (comparable across stages) and, with dev records, dev ROUGE-L.

    ``config``: the run's :class:`pocl.config.DistillConfig`; ``dev_data``: the tokenized dev set;
    ``dev_records``: the records whose answers dev ROUGE-L generates (:func:`dev_rouge_records`)."""

    def __init__(self, config, *, accelerator, tokenizer, dev_data, dev_records: Sequence):
        """The evaluator of ``dev_data`` (None: no dev set) on ``accelerator``'s processes."""
        self.cfg = config
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.dev_data = dev_data
        self.dev_records = list(dev_records)

    def evaluate(self, stage: Stage, *, module, student, micro_loss: Callable, step: int) -> dict[str, float]:
        """``dev_loss``, ``dev_ce``, ``dev_kd``, ``dev_tokens`` (and ``dev_rouge_l`` with dev records) at
        global step ``step``. ``micro_loss(batch, stage, normalizer)``: a micro-batch's
        :class:`pocl.losses.KDLossOutput` (normaliser 1: token sums). ``module`` (the wrapped student loss)
        is put in eval mode during the loss pass; every process evaluates its share of the dev set."""
        acc = self.accelerator
        module.eval()
        idx = list(range(len(self.dev_data)))[acc.process_index::acc.num_processes]
        ce_sum = div_sum = 0.0
        tokens = 0
        for samples in length_batches([self.dev_data[i] for i in idx], self.cfg.train.eval_batch_size):
            out = micro_loss(batch_on(samples, self.tokenizer.pad_token_id, acc.device), stage, 1.0)
            ce_sum += float(out.ce_sum)
            div_sum += float(out.divergence_sum)
            tokens += int(out.num_tokens)
        ce_sum, div_sum, tokens = reduce_sum([ce_sum, div_sum, tokens], acc, acc.device)
        module.train()
        tok = max(tokens, 1.0)
        scale = stage.temperature ** 2 if self.cfg.loss.temperature_scaling == "t2" else 1.0
        ce, kd = ce_sum / tok, div_sum / tok
        out = {"dev_loss": (1 - stage.alpha) * ce + stage.alpha * scale * kd, "dev_ce": ce, "dev_kd": kd,
               "dev_tokens": tokens}
        if self.dev_records:
            skip = self.rouge_skip_reason(out, student)
            if skip is None:
                out["dev_rouge_l"] = self.dev_rouge(student)
            else:
                # Sampling from NaN probabilities fails (torch.multinomial); NaN is never a new best, and the
                # run stops through the non-finite guard of the training steps.
                (log.warning if acc.is_main_process else log.debug)(
                    "step %d: dev ROUGE-L not computed: %s; recorded as NaN (never a new best)", step, skip)
                out["dev_rouge_l"] = math.nan
        return out

    @staticmethod
    def rouge_skip_reason(dev: dict[str, float], student) -> str | None:
        """Why the dev answers cannot be generated now (non-finite dev loss or student weights), or None.
        Every process holds the same weights and the reduced dev values: the same decision everywhere."""
        bad = [k for k in ("dev_loss", "dev_ce") if not math.isfinite(dev[k])]
        if bad:
            return f"{bad[0]} is {dev[bad[0]]}"
        tensor = first_nonfinite_tensor(student)
        if tensor is not None:
            return f"the student's weights are not finite ({tensor.describe()})"
        return None

    def dev_rouge(self, student) -> float:
        """ROUGE-L x 100 of sampled answers (T = 1, the run's seed) on the first dev samples; computed
        on the main process and shared, so every process takes the same best-model decisions."""
        acc = self.accelerator
        value = [0.0]
        if acc.is_main_process:
            dc = self.cfg.data
            template = get_template(dc.template, tokenizer=self.tokenizer, use_prompt_field=dc.use_prompt_field)
            result = eval_runner.evaluate_records(
                student, self.tokenizer, self.dev_records, template=template,
                decoding=DecodingConfig(max_new_tokens=self.cfg.train.dev_rouge_max_new_tokens),
                seeds=[self.cfg.train.seed], batch_size=self.cfg.train.eval_batch_size,
                max_prompt_length=dc.max_prompt_length, truncation_side=dc.truncation_side)
            value = [float(result.rouge_l)]
            student.train()
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list(value)
        return value[0]


def track_dev(dev: dict[str, float], stage: Stage, state, *, configured: str, notes: dict[str, Any],
              write_best: Callable[[str, float], None]) -> tuple[bool, bool]:
    """Update best-model tracking in ``state``; returns (the stage's plateau is reached, a new best of
    the run). ``write_best(metric, value)`` writes best/ (called on a new best).

    The metric is ``configured`` (--selection-metric), compared in its own direction (dev ROUGE-L, the
    default, higher is better; dev CE and dev loss, lower is better); the state holds its real values.
    A trainer built without dev records cannot compute dev ROUGE-L: it selects by dev CE instead, with a
    warning (also in summary.json, ``selection_note``, set in ``notes``)."""
    name, note = fallback_metric(configured, dev)
    if note is not None and notes.get("selection_note") != note:
        log.warning("%s", note)
        notes["selection_note"] = note
    new_best, _ = Selection(name, state).update(dev[name], state.global_step)
    if new_best:
        write_best(name, dev[name])
    plateau = stage.plateau_patience is not None and state.stage_bad_evals >= stage.plateau_patience
    return plateau, new_best


def log_dev(dev: dict[str, float], state, *, configured: str, stage_index: int, stages: Sequence[Stage],
            new_best: bool) -> None:
    """One INFO line per dev evaluation, whatever the progress display: the step, the stage, the dev
    values and whether best/ was replaced."""
    stage = stages[stage_index]
    parts = [f"dev_ce {dev['dev_ce']:.4f}", f"dev_loss {dev['dev_loss']:.4f}"]
    if "dev_rouge_l" in dev:
        value = dev["dev_rouge_l"]
        parts.append(f"dev_rouge_l {value:.4f}" if math.isfinite(value) else
                     "dev_rouge_l not computed (non-finite weights or dev loss)")
    name = state.selection_metric or configured
    if new_best:
        verdict = f"new best {name}: best/ replaced"
    elif state.best_step is not None:
        verdict = f"not a new best (best {name} {state.best_metric:.4f} at step {state.best_step})"
    else:
        verdict = "not a new best (no finite value yet)"
    log.info("step %d, stage %d/%d '%s': %s; %s", state.global_step, stage_index + 1, len(stages),
             stage.name, ", ".join(parts), verdict)
