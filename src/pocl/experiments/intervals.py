"""Paired differences between two methods with their uncertainty: per-prompt scores from ``pocl eval``'s
``generations.jsonl``, the 95 % bootstrap confidence interval of (method A − method B) paired by training
seed and prompt, the variance components of that difference, and the half-width a design of
(prompts, sampling seeds, training seeds) can expect (used by ``benchmarks/experiment_sizing.py``).

The model behind the interval and the sizing, for one evaluation set: the difference of the two methods'
scores on prompt p, training-seed pair r and sampling seed s is

    d[r, p, s] = mu + b[r] + a[p] + c[r, p] + e[r, p, s]

b: how much one pair of training runs differs as a whole (the training seed); a: how much a prompt favours
one method; c: the training-seed x prompt interaction; e: the sampling noise. The estimate is the mean of d
over r, p, s (per set) and the mean of the per-set means (Avg). Its variance is

    var(b)/R + (var(a)/P + var(c)/(P R) + var(e)/(P R S)) averaged over the sets and divided by their number

(b is shared by the sets: the same trained models answer every set). The bootstrap resamples what the
claim generalises over, training-seed pairs (shared by the sets) and prompts (within each set), so its
interval covers all four terms; it is a percentile interval of ``n_boot`` replicates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pocl.errors import DataError

__all__ = ["Interval", "VarianceComponents", "bootstrap_paired", "load_prompt_scores", "paired_differences_by_prompt",
           "predicted_half_width", "variance_components"]

#: set name -> prompt id -> sampling seed -> score (× 100).
PromptScores = dict[str, dict[str, dict[int, float]]]


def load_prompt_scores(eval_dir: str | Path, model: str, metric: str = "rouge_l") -> PromptScores:
    """The per-prompt, per-sampling-seed ``metric`` of ``model`` from ``EVAL_DIR/generations.jsonl``
    (one row per model, set, prompt and seed, as ``pocl eval`` writes it). A row that is not JSON or
    lacks a field raises DataError naming the file, the line and the field; a repeated (set, id, seed)
    too."""
    path = Path(eval_dir) / "generations.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found (evaluate the model with pocl eval first)")
    out: PromptScores = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if row.get("model") != model:
                continue
            for field in ("set", "id", "seed", metric):
                if field not in row:
                    raise DataError(f"{path}:{lineno}: field '{field}' is missing")
            value = row[metric]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise DataError(f"{path}:{lineno}: field '{metric}' must be a finite number (got {value!r})")
            seeds = out.setdefault(str(row["set"]), {}).setdefault(str(row["id"]), {})
            if int(row["seed"]) in seeds:
                raise DataError(f"{path}:{lineno}: set {row['set']!r}, id {row['id']!r}, seed {row['seed']} "
                                "appears twice")
            seeds[int(row["seed"])] = float(value)
    if not out:
        raise DataError(f"{path}: no rows of model {model!r}")
    return out


def paired_differences_by_prompt(pairs: Sequence[tuple[PromptScores, PromptScores]],
                                 sets: Sequence[str]) -> dict[str, np.ndarray]:
    """set -> array [R, P, S] of (A − B) for the R pairs ``(scores_A, scores_B)`` (one per training seed),
    the P prompts and the S sampling seeds. Every model must have been evaluated on the same prompts
    and seeds: a mismatch raises DataError naming the pair, the set and what differs."""
    if not pairs:
        raise DataError("no pairs of runs to compare")
    out = {}
    for name in sets:
        ref = pairs[0][0].get(name)
        if ref is None:
            raise DataError(f"set {name!r}: not in the evaluation of pair 1")
        ids = sorted(ref)
        seeds = sorted(ref[ids[0]])
        cube = np.empty((len(pairs), len(ids), len(seeds)))
        for r, (a, b) in enumerate(pairs):
            for side, scores in (("A", a), ("B", b)):
                got = scores.get(name, {})
                if sorted(got) != ids or any(sorted(got[i]) != seeds for i in ids):
                    raise DataError(f"pair {r + 1}, model {side}, set {name!r}: evaluated on other prompts or "
                                    f"sampling seeds than pair 1 ({len(got)} prompts vs {len(ids)})")
            cube[r] = [[a[name][i][s] - b[name][i][s] for s in seeds] for i in ids]
        out[name] = cube
    return out


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean and its percentile bootstrap interval; ``n``: training-seed pairs, prompts, sampling seeds."""

    mean: float
    low: float
    high: float
    n: tuple[int, int, int]

    @property
    def half_width(self) -> float:
        """Half the interval's width."""
        return (self.high - self.low) / 2

    def format(self) -> str:
        """``+1.23 [+0.10, +2.40]``."""
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def bootstrap_paired(diffs: Mapping[str, np.ndarray], *, n_boot: int = 4000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Interval]:
    """Per set and "Avg" (the mean over sets) the mean difference and its percentile bootstrap interval.
    ``diffs``: set -> [R, P, S] (:func:`paired_differences_by_prompt`). Each replicate draws R training-seed
    pairs with replacement (the same draw for every set) and, per set, P prompts with replacement."""
    if not diffs:
        raise DataError("no sets to compare")
    rng = np.random.default_rng(seed)
    r_count = {d.shape[0] for d in diffs.values()}
    if len(r_count) != 1:
        raise DataError(f"the sets have different numbers of training-seed pairs: {sorted(r_count)}")
    r = r_count.pop()
    seed_draw = rng.integers(0, r, size=(n_boot, r))
    per_set = {}
    for name, d in diffs.items():
        by_prompt = d.mean(axis=2)  # [R, P]: the sampling seeds are nested in (pair, prompt)
        prompt_draw = rng.integers(0, by_prompt.shape[1], size=(n_boot, by_prompt.shape[1]))
        # replicate b: mean over the drawn pairs of the mean over the drawn prompts (the same prompt draw
        # for every pair of a replicate: the prompts are crossed with the pairs, as in the data)
        per_set[name] = np.stack([by_prompt[np.ix_(seed_draw[b], prompt_draw[b])].mean() for b in range(n_boot)])
    tail = (1 - level) / 2 * 100

    def interval(point: float, reps: np.ndarray, shape: tuple[int, int, int]) -> Interval:
        low, high = np.percentile(reps, [tail, 100 - tail])
        return Interval(float(point), float(low), float(high), shape)

    out = {name: interval(float(diffs[name].mean()), per_set[name], diffs[name].shape) for name in diffs}
    avg_point = float(np.mean([diffs[name].mean() for name in diffs]))
    shapes = [d.shape for d in diffs.values()]
    out["Avg"] = interval(avg_point, np.mean(np.stack(list(per_set.values())), axis=0),
                          (r, sum(s[1] for s in shapes), shapes[0][2]))
    return out


@dataclasses.dataclass(frozen=True)
class VarianceComponents:
    """Method-of-moments estimates (clipped at 0) of the terms of the module's model for one set:
    ``seed`` var(b), ``prompt`` var(a), ``interaction`` var(c), ``sampling`` var(e). With one training-seed
    pair, b is not identifiable (``seed`` is nan) and c is inside ``prompt``."""

    seed: float
    prompt: float
    interaction: float
    sampling: float


def variance_components(d: np.ndarray) -> VarianceComponents:
    """The variance components of one set's differences ``d`` [R, P, S] (two-way crossed random effects
    with replication, balanced; needs S >= 2 for the sampling term)."""
    r, p, s = d.shape
    if s < 2:
        raise DataError("the sampling-noise term needs at least 2 sampling seeds per prompt")
    cell = d.mean(axis=2)  # [R, P]
    ms_within = float(((d - cell[..., None]) ** 2).sum() / (r * p * (s - 1)))
    grand = cell.mean()
    pm, rm = cell.mean(axis=0), cell.mean(axis=1)
    ms_prompt = float(r * s * ((pm - grand) ** 2).sum() / max(p - 1, 1))
    if r == 1:
        return VarianceComponents(seed=float("nan"), prompt=max((ms_prompt - ms_within) / s, 0.0), interaction=0.0,
                                  sampling=ms_within)
    ms_seed = float(p * s * ((rm - grand) ** 2).sum() / (r - 1))
    resid = cell - pm[None, :] - rm[:, None] + grand
    ms_inter = float(s * (resid ** 2).sum() / ((r - 1) * (p - 1)))
    return VarianceComponents(seed=max((ms_seed - ms_inter) / (p * s), 0.0),
                              prompt=max((ms_prompt - ms_inter) / (r * s), 0.0),
                              interaction=max((ms_inter - ms_within) / s, 0.0), sampling=ms_within)


def predicted_half_width(components: Sequence[VarianceComponents], *, prompts: int, sampling_seeds: int,
                         training_seeds: int, seed_variance: float | None = None, z: float = 1.959964,
                         bootstrap: bool = True) -> float:
    """The expected half-width of the interval on the Avg over ``len(components)`` sets (one entry per
    set) for a design of ``prompts`` per set, ``sampling_seeds`` and ``training_seeds`` pairs:
    ``z`` × the standard error of the module's model. ``seed_variance`` replaces the components' var(b)
    (needed when they came from one pair).

    With ``bootstrap`` (default) it predicts the interval :func:`bootstrap_paired` reports. The expected
    variance of its replicates, worked out from the decomposition of the resampled means, differs from
    the true one in two ways: the interaction and sampling noise, w = var(c) + var(e)/S, enter a second
    time through the pairs' means and through the pair x prompt residuals, + 2 (R - 1) / R^2 x w / P per
    set (the known conservatism of a two-level bootstrap); the seed term is var(b) (R - 1) / R^2 instead
    of var(b) / R (few pairs under-spread). ``bootstrap=False``: the standard error itself."""
    if not components:
        raise ValueError("no variance components")
    n_sets = len(components)
    r = training_seeds
    double = 2 * (r - 1) / r ** 2 if bootstrap else 0.0
    within = sum(c.prompt / prompts + c.interaction / (prompts * r) + c.sampling / (prompts * r * sampling_seeds)
                 + double * (c.interaction + c.sampling / sampling_seeds) / prompts
                 for c in components) / n_sets ** 2
    if seed_variance is None:
        seeds = [c.seed for c in components]
        if any(math.isnan(v) for v in seeds):
            raise ValueError("the components come from one training-seed pair: pass seed_variance")
        seed_variance = sum(seeds) / n_sets
    seed_factor = (r - 1) / r ** 2 if bootstrap else 1 / r
    return z * math.sqrt(within + seed_variance * seed_factor)
