"""Scoring of one model on one evaluation set: generate an answer per sample over several seeds
and score it against the references (:func:`evaluate_records`), the result classes, the average
over sets and the ``generations.jsonl`` rows.

Scores: for each seed, the ROUGE-L F-measure x 100 (max over a sample's references) and the exact
match x 100 (after the ``em_normalization``, SQuAD's by default) are averaged over the samples; the
reported score is the mean of these per-seed values and the spread is their standard deviation
over seeds (``std="sample"``: divide by n - 1, the default; ``"population"``: divide by n; one
seed: 0). The command that runs several models on several sets is :mod:`pocl.evaluation.runner`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pocl.data import PromptTemplate, Record, get_template, tokenize_prompts
from pocl.errors import ConfigError, DataError
from pocl.evaluation.metrics import DEFAULT_EM_NORMALIZATION, EM_NORMALIZATIONS, exact_match, mean_std, rouge_l
from pocl.generation import DecodingConfig, generate

log = logging.getLogger("pocl.eval")
logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." at INFO

METRICS = ("rouge_l", "exact_match")


@dataclasses.dataclass
class SampleResult:
    """One sample: its prompt and references, and per seed its generation and scores."""

    id: str
    prompt: str
    references: list[str]
    generations: list[str]
    rouge_l: list[float]
    exact_match: list[float]
    generated_tokens: list[int]
    stopped_at_eos: list[bool]
    prompt_tokens: int
    prompt_truncated: bool


@dataclasses.dataclass
class SeedResult:
    """One seed's pass over the set: means over the samples."""

    seed: int
    rouge_l: float
    exact_match: float
    seconds: float
    generated_tokens: int
    stopped_at_eos: int


@dataclasses.dataclass
class SetResult:
    """The result of one model on one set. ``per_seed[i]`` belongs to ``seeds[i]``."""

    name: str
    seeds: list[int]
    per_seed: list[SeedResult]
    samples: list[SampleResult]
    decoding: dict[str, Any]
    std: str = "sample"
    em_normalization: str = DEFAULT_EM_NORMALIZATION

    @property
    def n(self) -> int:
        return len(self.samples)

    def values(self, metric: str) -> list[float]:
        """The per-seed means of ``metric`` (``rouge_l`` or ``exact_match``)."""
        _check_metric(metric)
        return [getattr(s, metric) for s in self.per_seed]

    def mean_std(self, metric: str) -> tuple[float, float]:
        return mean_std(self.values(metric), std=self.std)

    @property
    def rouge_l(self) -> float:
        return self.mean_std("rouge_l")[0]

    @property
    def rouge_l_std(self) -> float:
        return self.mean_std("rouge_l")[1]

    @property
    def exact_match(self) -> float:
        return self.mean_std("exact_match")[0]

    @property
    def exact_match_std(self) -> float:
        return self.mean_std("exact_match")[1]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.per_seed)

    def metric_summary(self, metric: str) -> dict[str, Any]:
        mean, std = self.mean_std(metric)
        return {"mean": mean, "std": std, "seeds": list(self.seeds), "per_seed": self.values(metric)}

    def summary(self) -> dict[str, Any]:
        """The aggregates (everything but the per-sample lists) as JSON-able data."""
        n_gen = max(self.n * len(self.seeds), 1)
        return {
            "n": self.n,
            **{m: self.metric_summary(m) for m in METRICS},
            "seconds": {"total": self.seconds, "per_seed": [s.seconds for s in self.per_seed]},
            "samples_per_second": (self.n * len(self.seeds)) / max(self.seconds, 1e-9),
            "generated_tokens_mean": sum(s.generated_tokens for s in self.per_seed) / n_gen,
            "stopped_at_eos_fraction": sum(s.stopped_at_eos for s in self.per_seed) / n_gen,
            "prompts_truncated": sum(s.prompt_truncated for s in self.samples),
        }


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def decoding_dict(decoding: DecodingConfig) -> dict[str, Any]:
    d = dataclasses.asdict(decoding)
    if not decoding.do_sample:  # sampling knobs do not apply
        for key in ("temperature", "top_p", "top_k"):
            d.pop(key, None)
    return d


def evaluate_records(model: torch.nn.Module, tokenizer, records: Sequence[Record], *,
                     template: str | PromptTemplate = "alpaca", decoding: DecodingConfig | None = None,
                     seeds: Sequence[int] = (10, 20, 30, 40, 50), batch_size: int = 32,
                     max_prompt_length: int = 256, truncation_side: str = "left", std: str = "sample",
                     em_normalization: str = DEFAULT_EM_NORMALIZATION, name: str = "",
                     progress: bool | Callable[[int], None] = False) -> SetResult:
    """Generate an answer to every record once per seed and score it against the record's references.

    Generation is batched (prompts grouped by length, left padding, KV cache; see
    :func:`pocl.generation.generate`); a seed's pass is reproducible for the same prompts, batch
    size and seed. ``template`` renders prompts (a record's ready-made ``prompt`` field is used with
    the Alpaca template, as in training); prompts longer than ``max_prompt_length`` tokens keep
    their end. ``decoding`` defaults to the spec's protocol (sampling at T = 1, top-p 1, no top-k,
    ``no_repeat_ngram_size=6``, 256 new tokens). ``em_normalization``: how answers and references
    are normalised before exact match (``"squad"``, the papers' protocol, or ``"whitespace"``; see
    :mod:`pocl.evaluation.metrics`). ``progress``: True for a progress bar, or a callable called with
    the number of generations done after each batch.
    """
    records = list(records)
    if not records:
        raise DataError(f"evaluation set '{name or '?'}' has no samples")
    for r in records:
        if not r.has_output:
            raise DataError(f"sample '{r.id}' has no reference output; evaluation needs one", path=r.source,
                            line=r.line, field="output")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("evaluate_records needs at least one seed")
    if std not in ("sample", "population"):
        raise ConfigError(f"std must be 'sample' or 'population', got {std!r}")
    if em_normalization not in EM_NORMALIZATIONS:
        raise ConfigError(f"em_normalization must be one of {', '.join(EM_NORMALIZATIONS)}, got {em_normalization!r}")
    decoding = decoding or DecodingConfig()
    template = template if isinstance(template, PromptTemplate) else get_template(template, tokenizer=tokenizer)
    texts = [template.render(r) for r in records]
    full = tokenize_prompts(records, tokenizer, template, max_prompt_length=sys.maxsize // 2,
                            truncation_side=truncation_side)
    long_idx = [i for i, p in enumerate(full) if len(p) > max_prompt_length]
    prompts = list(full)
    if long_idx:
        cut = tokenize_prompts([records[i] for i in long_idx], tokenizer, template,
                               max_prompt_length=max_prompt_length, truncation_side=truncation_side)
        for i, ids in zip(long_idx, cut):
            prompts[i] = ids
        log.info("%s: %d of %d prompts were longer than %d tokens and were cut on the %s", name or "set",
                 len(long_idx), len(records), max_prompt_length, truncation_side)

    bar = None
    callback: Callable[[int], None] | None = None
    if callable(progress):
        callback = progress
    elif progress:
        from pocl.progress import make_progress

        bar = make_progress(len(records) * len(seeds), desc=f"generate {name}".strip(), unit="sample", leave=False)
        callback = bar.update
    long_set = set(long_idx)
    samples = [SampleResult(id=r.id, prompt=t, references=r.references, generations=[], rouge_l=[],
                            exact_match=[], generated_tokens=[], stopped_at_eos=[], prompt_tokens=len(p),
                            prompt_truncated=i in long_set)
               for i, (r, t, p) in enumerate(zip(records, texts, prompts))]
    per_seed: list[SeedResult] = []
    try:
        for seed in seeds:
            t0 = time.perf_counter()
            gens = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed,
                            progress=callback)
            seconds = time.perf_counter() - t0
            for s, g in zip(samples, gens):
                s.generations.append(g.text)
                s.rouge_l.append(rouge_l(g.text, s.references))
                s.exact_match.append(exact_match(g.text, s.references, normalization=em_normalization))
                s.generated_tokens.append(len(g.token_ids))
                s.stopped_at_eos.append(g.stopped_at_eos)
            k = len(per_seed)
            per_seed.append(SeedResult(
                seed=seed, rouge_l=sum(s.rouge_l[k] for s in samples) / len(samples),
                exact_match=sum(s.exact_match[k] for s in samples) / len(samples), seconds=seconds,
                generated_tokens=sum(s.generated_tokens[k] for s in samples),
                stopped_at_eos=sum(s.stopped_at_eos[k] for s in samples)))
    finally:
        if bar is not None:
            bar.close()
    return SetResult(name=name, seeds=seeds, per_seed=per_seed, samples=samples, decoding=decoding_dict(decoding),
                     std=std, em_normalization=em_normalization)


def average_over_sets(results: Sequence[SetResult], metric: str, *, std: str = "sample") -> dict[str, Any]:
    """The average over sets: per seed the mean of the sets' per-seed scores, then mean/std over seeds.

    All sets must have been run with the same seeds.
    """
    _check_metric(metric)
    if not results:
        raise ValueError("no results to average")
    seeds = results[0].seeds
    for r in results[1:]:
        if r.seeds != seeds:
            raise ValueError(f"sets were run with different seeds ({seeds} vs {r.seeds}); cannot average per seed")
    per_seed = [sum(r.values(metric)[k] for r in results) / len(results) for k in range(len(seeds))]
    mean, sd = mean_std(per_seed, std=std)
    return {"mean": mean, "std": sd, "seeds": list(seeds), "per_seed": per_seed, "sets": [r.name for r in results]}


def generation_rows(model_name: str, result: SetResult) -> list[dict[str, Any]]:
    """The ``generations.jsonl`` rows of one model on one set: one per sample and seed."""
    rows = []
    for s in result.samples:
        ref: Any = s.references[0] if len(s.references) == 1 else s.references
        for k, seed in enumerate(result.seeds):
            rows.append({"model": model_name, "set": result.name, "id": s.id, "prompt": s.prompt,
                         "reference": ref, "generation": s.generations[k], "seed": seed,
                         "rouge_l": s.rouge_l[k], "exact_match": s.exact_match[k],
                         "generated_tokens": s.generated_tokens[k], "stopped_at_eos": s.stopped_at_eos[k],
                         "prompt_truncated": s.prompt_truncated})
    return rows

