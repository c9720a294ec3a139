"""The Baby Step scheduler of POCL: the ranked data in growing, nested subsets, with rising T and alpha.

The schedule is data: :func:`baby_step_stages` returns a list of :class:`pocl.training.stages.Stage`
that the trainer runs in order. With the defaults (POCL spec, section 3):

=====  ========  ======  ===========  =====  =============
stage  samples   epochs  temperature  alpha  skew
=====  ========  ======  ===========  =====  =============
1      25 %      8       1.0          0.7    --skew
2      50 %      8       1.333        0.8    --skew
3      75 %      8       1.667        0.9    --skew
4      100 %     8       2.0          1.0    0.12
=====  ========  ======  ===========  =====  =============

Budget: 8 x (1/4 + 2/4 + 3/4 + 1) = 20 passes over the data, the same as a 20-epoch baseline
(:func:`same_budget_stage_epochs` is that rule: 20 KD epochs -> 8 epochs per stage).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from pocl.errors import ConfigError
from pocl.training.stages import Stage, check_stages

log = logging.getLogger("pocl.curriculum")

__all__ = ["stage_sizes", "baby_step_stages", "schedule_table", "budget_passes", "format_schedule",
           "override_every_stage", "cap_total_steps", "nominal_fractions", "same_budget_stage_epochs",
           "same_budget_epochs"]


def stage_sizes(n_samples: int, n_stages: int, fractions: Sequence[float | None] | None = None) -> list[int]:
    """Number of samples of each stage (cumulative: stage s trains on the easiest ``size_s``).

    Default: n equal slices, ``size_s = s * (N // n)`` and the last stage takes the remainder
    (``size_n = N``). A fraction f (per stage; None keeps the default of that stage) gives
    ``max(1, floor(f * N))``, and f = 1 gives N. Sizes must increase strictly (ConfigError
    otherwise, e.g. when N < n).
    """
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ConfigError(f"the number of stages must be a positive integer (got {n_stages!r})")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"a curriculum needs at least one sample (got {n_samples!r})")
    fractions = list(fractions) if fractions is not None else [None] * n_stages
    if len(fractions) != n_stages:
        raise ConfigError(f"{len(fractions)} stage fractions for {n_stages} stages")
    slice_size = n_samples // n_stages
    sizes = []
    for s, f in enumerate(fractions, start=1):
        if f is None:
            sizes.append(n_samples if s == n_stages else s * slice_size)
        else:
            if isinstance(f, bool) or not 0 < f <= 1:
                raise ConfigError(f"stage {s}: fraction must be in (0, 1] (got {f!r})")
            sizes.append(n_samples if f == 1 else max(1, math.floor(f * n_samples)))
    for s in range(1, n_stages):
        if sizes[s] <= sizes[s - 1]:
            hint = (f"; {n_samples} samples cannot fill {n_stages} growing stages" if n_samples < n_stages
                    else "; every stage must add samples")
            raise ConfigError(f"stage sizes must increase strictly, got {sizes} for {n_samples} samples"
                              f" and {n_stages} stages{hint}")
    if sizes[0] < 1:
        raise ConfigError(f"stage 1 would have no samples ({n_samples} samples, {n_stages} stages)")
    return sizes


def _linear(start: float, end: float, s: int, n: int) -> float:
    return start if n == 1 else start + (end - start) * s / (n - 1)


def _on_policy(curriculum, s: int, n: int) -> float | None:
    """lambda_on of stage s: linear from on_policy_fraction_start to _end (end None: constant); None
    when no start is set (the stage then uses the loss config's on_policy_fraction)."""
    start = getattr(curriculum, "on_policy_fraction_start", None)
    if start is None:
        return None
    end = getattr(curriculum, "on_policy_fraction_end", None)
    return _linear(start, start if end is None else end, s, n)


def baby_step_stages(ranked_ids: Sequence[str], curriculum, *, base_skew: float,
                     max_steps_per_stage: int | None = None) -> list[Stage]:
    """The Baby Step stages of ``curriculum`` (a :class:`pocl.config.CurriculumConfig`) over ``ranked_ids``
    (easiest first).

    Stage s (0-based, of n) trains on the easiest ``stage_sizes(...)[s]`` ids for ``stage_epochs``
    epochs with ``T = t_start + (t_max - t_start) * s / (n - 1)`` and alpha likewise from
    ``alpha_start`` to ``alpha_end``; skew is ``base_skew`` except ``skew_last_stage`` in the last
    stage (None: ``base_skew``). With n = 1 the single stage uses the first-stage values
    (t_start, alpha_start, base_skew). Entries of ``curriculum.stages`` override the computed
    values of their stage (keys: fraction, epochs, max_steps, temperature, alpha, skew, lr,
    plateau_patience, on_policy_fraction, name, teacher; ``stage_teachers`` names teachers too). The on-policy
    fraction lambda_on of GKD rises linearly
    from ``on_policy_fraction_start`` to ``on_policy_fraction_end`` when a start is set; otherwise
    stages carry None (the loss config's ``on_policy_fraction`` applies).
    """
    ids = list(ranked_ids)
    if len(set(ids)) != len(ids):
        raise ConfigError("the ranked ids contain duplicates")
    n = curriculum.num_stages
    overrides: list[dict[str, Any]] = [dict(o) for o in curriculum.stages] + [{}] * (n - len(curriculum.stages))
    if len(overrides) > n:
        raise ConfigError(f"curriculum.stages has {len(curriculum.stages)} entries for {n} stages")
    sizes = stage_sizes(len(ids), n, [o.get("fraction") for o in overrides])
    if sizes[-1] < len(ids):
        log.warning("the last stage trains on %d of %d samples (fraction < 1): the hardest %d are never used",
                    sizes[-1], len(ids), len(ids) - sizes[-1])
    stages = []
    for s in range(n):
        last = s == n - 1 and n > 1
        skew = curriculum.skew_last_stage if last and curriculum.skew_last_stage is not None else base_skew
        values: dict[str, Any] = dict(
            name=f"stage{s + 1}", epochs=curriculum.stage_epochs, max_steps=max_steps_per_stage,
            temperature=_linear(curriculum.t_start, curriculum.t_max, s, n),
            alpha=_linear(curriculum.alpha_start, curriculum.alpha_end, s, n), skew=skew, lr=None,
            plateau_patience=curriculum.plateau_patience, on_policy_fraction=_on_policy(curriculum, s, n))
        values.update({k: v for k, v in overrides[s].items() if k != "fraction"})
        values["teacher"] = curriculum.stage_teacher(s)
        stages.append(Stage(sample_ids=tuple(ids[:sizes[s]]), restart_optimizer=curriculum.restart_optimizer,
                            **values))
    check_stages(stages)
    return stages


def override_every_stage(stages: Sequence[Stage], *, alpha: float | None = None,
                         temperature: float | None = None) -> list[Stage]:
    """The stages with ``alpha`` and/or ``temperature`` (when not None) in every stage: what ``--alpha``
    and ``--temperature`` mean when they are given with the curriculum."""
    changes = {k: v for k, v in (("alpha", alpha), ("temperature", temperature)) if v is not None}
    return [dataclasses.replace(st, **changes) for st in stages] if changes else list(stages)


def cap_total_steps(stages: Sequence[Stage], max_steps: int, batch_size: int,
                    n_samples: int | None = None) -> tuple[list[Stage], list[str]]:
    """Cap the optimizer steps of the whole schedule at ``max_steps`` (``--max-steps`` with the
    curriculum): stages run in order with their planned steps until the cap; the stage the cap falls
    in gets ``max_steps`` = the steps left (its learning-rate schedule is fitted to them), later
    stages are dropped. Returns the stages and one line per changed stage (for the log)."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be a whole number >= 1 (got {max_steps!r})")
    left = max_steps
    out: list[Stage] = []
    notes: list[str] = []
    for st in stages:
        n = len(st.sample_ids) if st.sample_ids is not None else n_samples
        if n is None:
            raise ConfigError("give n_samples when a stage trains on the whole set (sample_ids=None)")
        planned = st.total_steps(n, batch_size)
        if left <= 0:
            notes.append(f"{st.name}: not run (planned {planned} steps)")
            continue
        if planned > left:
            notes.append(f"{st.name}: {left} of {planned} planned steps")
            out.append(dataclasses.replace(st, max_steps=left))
        else:
            out.append(st)
        left -= min(planned, left)
    return out, notes


def _total(stages: Sequence[Stage], n_samples: int | None) -> int:
    if n_samples is not None:
        return n_samples
    counts = [len(s.sample_ids) for s in stages if s.sample_ids is not None]
    if len(counts) != len(stages):
        raise ConfigError("give n_samples when a stage trains on the whole set (sample_ids=None)")
    return max(counts)


def schedule_table(stages: Sequence[Stage], n_samples: int | None = None) -> list[dict[str, Any]]:
    """One row per stage: index (1-based), name, samples, fraction (of ``n_samples``, default the
    largest stage), epochs, max_steps, temperature, alpha, skew, lr, plateau_patience, on_policy_fraction."""
    total = _total(stages, n_samples)
    rows = []
    for i, st in enumerate(stages, start=1):
        samples = total if st.sample_ids is None else len(st.sample_ids)
        rows.append({"index": i, "name": st.name, "samples": samples, "fraction": samples / total,
                     "epochs": st.epochs, "max_steps": st.max_steps, "temperature": st.temperature,
                     "alpha": st.alpha, "skew": st.skew, "lr": st.lr, "plateau_patience": st.plateau_patience,
                     "on_policy_fraction": st.on_policy_fraction})
    return rows


def budget_passes(stages: Sequence[Stage], n_samples: int | None = None, *, batch_size: int | None = None) -> float:
    """The training budget in passes over the data: sum of epochs x fraction (20 for the defaults).

    A stage with ``max_steps`` counts ``max_steps * batch_size`` samples when ``batch_size`` is
    given (otherwise its epochs). Plateau advance can only shorten this.
    """
    total = _total(stages, n_samples)
    passes = 0.0
    for row, st in zip(schedule_table(stages, total), stages):
        if st.max_steps is not None and batch_size:
            passes += st.max_steps * batch_size / total
        else:
            passes += row["epochs"] * row["fraction"]
    return passes


def format_schedule(stages: Sequence[Stage], n_samples: int | None = None, *, batch_size: int | None = None) -> str:
    """The schedule as a small text table, with the budget (stages with ``max_steps`` count
    ``max_steps * batch_size`` samples when ``batch_size`` is given)."""
    rows = schedule_table(stages, n_samples)
    on_policy = any(r["on_policy_fraction"] is not None for r in rows)
    lines = [f"{'stage':<10} {'samples':>8} {'frac':>6} {'epochs':>7} {'T':>6} {'alpha':>6} {'skew':>6}"
             + (f" {'on-pol':>6}" if on_policy else "")]
    for r in rows:
        skew = "-" if r["skew"] is None else f"{r['skew']:.3g}"
        epochs = f"{r['epochs']:.3g}" if r["max_steps"] is None else f"{r['max_steps']}st"
        line = (f"{r['name']:<10} {r['samples']:>8} {r['fraction']:>6.2f} {epochs:>7} "
                f"{r['temperature']:>6.3f} {r['alpha']:>6.3f} {skew:>6}")
        if on_policy:
            lam = r["on_policy_fraction"]
            line += f" {'-' if lam is None else format(lam, '.3g'):>6}"
        lines.append(line)
    lines.append(f"budget: {budget_passes(stages, n_samples, batch_size=batch_size):.3g} passes over the data")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ same sample budget
def nominal_fractions(num_stages: int, fractions: Sequence[float | None] | None = None) -> list[float]:
    """The share of the data each stage trains on, as the same-budget rule counts it: ``s / n`` for
    stage s (1-based) of n equal cumulative slices, or the stage's own fraction (the ``fraction`` of
    ``curriculum.stages[i]``; None, or a list shorter than ``num_stages``, keeps the default of the
    stages it does not cover). Nominal: :func:`stage_sizes` rounds these to whole samples."""
    return [float(f) for f in _exact_fractions(num_stages, fractions)]


def _exact_fractions(num_stages: int, fractions: Sequence[float | None] | None) -> list[Fraction]:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ConfigError(f"the number of stages must be a positive integer (got {num_stages!r})")
    given = list(fractions or [])
    if len(given) > num_stages:
        raise ConfigError(f"{len(given)} stage fractions for {num_stages} stages")
    given += [None] * (num_stages - len(given))
    return [Fraction(s, num_stages) if f is None else Fraction(f) for s, f in enumerate(given, start=1)]


def _passes_per_stage_epoch(num_stages: int, fractions: Sequence[float | None] | None) -> float:
    """Sum of the nominal fractions: the passes over the data of one epoch in every stage, summed exactly
    ((n + 1) / 2 for n equal slices, without the rounding of 1/3 + 2/3 + ... in floats)."""
    total = sum(_exact_fractions(num_stages, fractions))
    if total <= 0:
        raise ConfigError(f"stage fractions must be > 0 (got {nominal_fractions(num_stages, fractions)})")
    return float(total)


def same_budget_stage_epochs(epochs: float, num_stages: int, fractions: Sequence[float | None] | None = None
                             ) -> float:
    """Epochs per stage of a curriculum that trains on as many samples as ``epochs`` epochs over the
    whole set (plain KD): the budget in passes is sum over stages of epochs_s x fraction_s
    (:func:`budget_passes`), so each stage gets ``epochs / sum(fractions)``; ``epochs * 2 / (n + 1)``
    for n equal cumulative slices (20 -> 8 for the 4 default stages). ``fractions`` as in
    :func:`nominal_fractions`. Stages with their own ``epochs`` or ``max_steps`` override are not
    accounted for (the rule sets ``curriculum.stage_epochs``, which they ignore).

    Computed as ``epochs * (1 / sum)``: for equal slices bit for bit the ``epochs * (2 / (n + 1))`` the
    built-in default used before this function, so that its runs keep their exact lengths."""
    return float(epochs) * (1.0 / _passes_per_stage_epoch(num_stages, fractions))


def same_budget_epochs(stage_epochs: float, num_stages: int, fractions: Sequence[float | None] | None = None
                       ) -> float:
    """The inverse of :func:`same_budget_stage_epochs`: the plain-KD epochs over the whole set that
    train on as many samples as ``stage_epochs`` in every stage of the curriculum (``stage_epochs /
    (1 / sum)``, the built-in default's arithmetic)."""
    return float(stage_epochs) / (1.0 / _passes_per_stage_epoch(num_stages, fractions))
