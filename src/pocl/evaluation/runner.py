"""Generation-based evaluation: generate answers for an evaluation set over several seeds and score them.

:func:`evaluate_records` is the reusable core (one model, one set); the trainer can call it for a
dev ROUGE-L. :func:`run_eval` is ``pocl eval``: several models x several sets, per-difficulty
breakdowns, and the output files (``generations.jsonl``, ``results.json``, ``results.md``).

Scores: for each seed, the ROUGE-L F-measure x 100 (max over a sample's references) and the exact
match x 100 (after the ``em_normalization``, SQuAD's by default) are averaged over the samples; the
reported score is the mean of these per-seed values and the spread is their standard deviation
over seeds (``std="sample"``: divide by n - 1, the default; ``"population"``: divide by n; one
seed: 0).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pocl._version import __version__
from pocl.atomic import atomic_open, atomic_write
from pocl.data import PromptTemplate, Record, get_template, tokenize_prompts
from pocl.errors import ConfigError, DataError
from pocl.evaluation.metrics import DEFAULT_EM_NORMALIZATION, EM_NORMALIZATIONS, exact_match, mean_std, rouge_l
from pocl.generation import DecodingConfig, effective_settings, generate, special_token_ids

log = logging.getLogger("pocl.eval")
logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." at INFO

METRICS = ("rouge_l", "exact_match")
SCHEMA = "pocl.eval/1"


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


# ------------------------------------------------------------------------------------------ files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`pocl.atomic.atomic_write`), creating its folder."""
    atomic_write(path, text, make_parents=True)


def versions() -> dict[str, str]:
    import transformers

    out = {"pocl": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["rouge_score"] = version("rouge-score")
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


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


# ------------------------------------------------------------------------------------------ pocl eval
@dataclasses.dataclass
class EvalReport:
    """What :func:`run_eval` produced: results per model and set, the output files, the Markdown."""

    results: dict[str, dict[str, SetResult]]
    breakdowns: dict[str, dict[str, Any]]
    data: dict[str, Any]  # the content of results.json
    markdown: str
    files: list[Path]


def _device(cpu: bool) -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")


def generation_record(decoding: DecodingConfig) -> dict[str, Any]:
    """The ``generation_config`` entry of results.json: the settings handed to transformers'
    ``generate`` (read back from the ``GenerationConfig`` pocl builds; the token ids, which depend on
    each model's tokenizer, are in each model's entry), and the transformers version that read them."""
    import transformers

    settings = effective_settings(decoding, eos_token_id=None, pad_token_id=None)
    for key in ("eos_token_id", "pad_token_id"):
        settings.pop(key, None)
    return {"transformers_version": transformers.__version__,
            "model_generation_config": "ignored: hidden during generation, every setting is pocl's",
            "settings": settings}


def _ranking_template(path: str, config, models: Sequence[tuple[str, str]], tokenizers: dict[str, Any]):
    """The prompt template a ranking's sample hashes were computed with: the one stamped in its
    ``ranking.meta.json`` (template name and ``use_prompt_field``), else the evaluation's own. A
    template that needs a tokenizer (``chat``) gets the evaluation's (``--tokenizer``, else the
    first model's). Returns (template, a note for error messages)."""
    from pocl.evaluation.breakdown import ranking_settings
    from pocl.models import load_tokenizer

    settings = ranking_settings(path)
    if settings is not None:
        name, use_prompt_field = settings["template"], settings.get("use_prompt_field")
        note = f" '{name}' (from the ranking's metadata)"
    else:
        name, use_prompt_field = config.template, config.use_prompt_field
        note = f" '{name}' (the evaluation's; the ranking has no metadata file)"
    try:
        return get_template(name, use_prompt_field=use_prompt_field), note
    except ConfigError:  # needs a tokenizer
        spec = config.tokenizer or models[0][1]
        if spec not in tokenizers:
            tokenizers[spec] = load_tokenizer(spec, local_files_only=config.local_files_only,
                                              trust_remote_code=config.trust_remote_code)
        return get_template(name, tokenizer=tokenizers[spec], use_prompt_field=use_prompt_field), note


def _model_phrase(name: str, spec: str) -> str:
    return f"the model '{name}'" + (f" ({spec})" if spec != name else "")


def _check_loaded_context(context, config) -> None:
    """A loaded model whose context the check before loading could not read (its config file was not
    readable as such) must fit the lengths too: refused rather than failing inside the model."""
    if context is not None and config.max_prompt_length + config.max_new_tokens > context.length:
        raise ConfigError(f"eval.max_new_tokens: prompts of up to {config.max_prompt_length} tokens "
                          f"(--max-prompt-length) + {config.max_new_tokens} new tokens (--max-new-tokens) do not fit "
                          f"the context of {context.describe()}; give lengths whose sum is at most {context.length}")


def run_eval(config) -> EvalReport:
    """``pocl eval``: every model on every set, then the output files. ``config`` is an EvalConfig."""
    from pocl.evaluation.breakdown import breakdown, load_ranking, ranking_specs, verify_ranking
    from pocl.config.eval import default_model_name, named_specs
    from pocl.evaluation.formats import describe, load_eval_set
    from pocl.evaluation.report import markdown_report
    from pocl.model_checks import first_nonfinite_tensor, split_model_spec
    from pocl.models import count_parameters, load_model, load_tokenizer, resolve_dtype

    t_start = time.perf_counter()
    if not config.models:
        raise ConfigError("eval.models: give at least one --model [NAME=]PATH")
    if not config.data:
        raise ConfigError("eval.data: give at least one --data [NAME=]PATH")
    models = named_specs(config.models, kind="model", default_name=default_model_name)
    # Before anything is loaded: never into a model being evaluated, nor into a folder pocl did not write.
    from pocl.training.output_dirs import check_output_dir

    check_output_dir(config.output_dir, inputs=[(f"model '{name}'", spec) for name, spec in models], kind="eval")
    from pocl.config.eval import default_set_name

    sets = [load_eval_set(path, name=name, max_samples=config.max_samples)
            for name, path in named_specs(config.data, kind="data", default_name=default_set_name)]
    for s in sets:
        log.info("%s", describe(s))

    # Rankings are checked before any generation, so a wrong file fails in seconds, not hours: every
    # evaluated sample must be in the ranking with the sample hash that `pocl rank` wrote for it.
    rankings = {}
    tokenizers: dict[str, Any] = {}
    for set_name, path in ranking_specs(config.ranking, [s.name for s in sets]).items():
        ranking = load_ranking(path)
        eval_set = next(s for s in sets if s.name == set_name)
        template, note = _ranking_template(path, config, models, tokenizers)
        coverage = verify_ranking(ranking, eval_set.records, template, set_name=set_name, set_path=eval_set.path,
                                  template_note=note)
        log.info("ranking %s: all %d evaluated samples of '%s' are ranked, with matching sample hashes", path,
                 coverage["evaluated"], set_name)
        rankings[set_name] = ranking

    for _, spec in models:  # every model path checked before the first model is loaded and run
        split_model_spec(config.tokenizer or spec, kind="tokenizer")
        split_model_spec(spec)
    # Prompt + answer must fit the smallest context of the models (read from their config files, before any
    # model is loaded; every model is evaluated with the same settings): given lengths that cannot fit
    # are refused, defaults are clipped (one warning) and the clipped values are the ones recorded.
    from pocl.context_length import context_of, fit_eval_config, read_context, smallest

    opts = {"local_files_only": config.local_files_only, "trust_remote_code": config.trust_remote_code}
    context = smallest([read_context(spec, _model_phrase(name, spec), **opts) for name, spec in models])
    config, context_fit = fit_eval_config(config, context)
    device = _device(config.cpu)
    dtype = resolve_dtype(config.dtype, device)
    decoding = config.decoding()
    seeds = config.eval_seeds
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_path = out_dir / "generations.jsonl"
    results: dict[str, dict[str, SetResult]] = {}
    model_info: dict[str, dict[str, Any]] = {}
    with atomic_open(gen_path) as gen_fh:  # generations.jsonl appears whole, or not at all
        for model_name, spec in models:
            t0 = time.perf_counter()
            tokenizer = load_tokenizer(config.tokenizer or spec, **opts)
            # Validated on load (files, manifest), but non-finite weights are reported, not refused:
            # the model is marked in the table and in results.json.
            model = load_model(spec, dtype=dtype, check_finite=False, **opts).to(device)
            model.eval()
            _check_loaded_context(context_of(model, _model_phrase(model_name, spec)), config)
            nonfinite = first_nonfinite_tensor(model)
            if nonfinite is not None:
                log.warning("model %s (%s) has NON-FINITE WEIGHTS: %s; not evaluated (its answers would be "
                            "meaningless), marked in the tables and results.json", model_name, spec,
                            nonfinite.describe())
            load_seconds = time.perf_counter() - t0
            template = get_template(config.template, tokenizer=tokenizer, use_prompt_field=config.use_prompt_field)
            eos, pad = special_token_ids(tokenizer)
            model_info[model_name] = {"path": spec, "parameters": count_parameters(model),
                                      "load_seconds": load_seconds,
                                      # None, or the first tensor holding NaN/inf (name and counts)
                                      "nonfinite_weights": None if nonfinite is None else nonfinite.to_dict(),
                                      # exactly what pocl.generation.generate hands to transformers
                                      "generation_config": effective_settings(decoding, eos_token_id=eos,
                                                                              pad_token_id=pad)}
            log.info("model %s: %s (%s parameters, %s, %s)", model_name, spec,
                     f"{model_info[model_name]['parameters']:,}", str(dtype).replace("torch.", ""), device)
            results[model_name] = {}
            if nonfinite is not None:  # no scores: sampling from NaN probabilities fails or scores garbage
                del model
                continue
            for eval_set in sets:
                res = evaluate_records(model, tokenizer, eval_set.records, template=template, decoding=decoding,
                                       seeds=seeds, batch_size=config.batch_size,
                                       max_prompt_length=config.max_prompt_length, std=config.std,
                                       em_normalization=config.em_normalization, name=eval_set.name,
                                       progress=config.progress)
                results[model_name][eval_set.name] = res
                for row in generation_rows(model_name, res):
                    gen_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                log.info("%s on %s: ROUGE-L %.2f ± %.2f, EM %.2f ± %.2f (%d samples x %d seeds, %.1f s)",
                         model_name, eval_set.name, res.rouge_l, res.rouge_l_std, res.exact_match,
                         res.exact_match_std, res.n, len(seeds), res.seconds)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    breakdowns: dict[str, dict[str, Any]] = {}
    for set_name, ranking in rankings.items():
        for model_name in results:
            if set_name not in results[model_name]:  # not evaluated (non-finite weights)
                continue
            breakdowns.setdefault(model_name, {})[set_name] = breakdown(
                results[model_name][set_name], ranking, num_buckets=config.num_buckets, std=config.std).to_dict()

    data = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "settings": config.to_dict(),
        "decoding": decoding_dict(decoding),
        "generation_config": generation_record(decoding),
        # the smallest context of the models and the default lengths clipped to fit it (null: unknown)
        "context": context_fit.record() if context_fit is not None else None,
        "seeds": seeds,
        "std": config.std,
        "em_normalization": config.em_normalization,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "sets": {s.name: {"path": s.path, "n": len(s), "total_rows": s.total_rows, "layout": s.layout,
                          "references_per_sample": sum(len(r.references) for r in s.records) / len(s)}
                 for s in sets},
        "models": {},
        "breakdown": breakdowns or None,
        "wall_seconds": None,
    }
    for model_name, per_set in results.items():
        entry = dict(model_info[model_name])
        entry["sets"] = {name: r.summary() for name, r in per_set.items()}
        entry["avg"] = ({m: average_over_sets(list(per_set.values()), m, std=config.std) for m in METRICS}
                        if per_set else {})  # empty: not evaluated (non-finite weights)
        data["models"][model_name] = entry
    data["wall_seconds"] = time.perf_counter() - t_start
    markdown = markdown_report(data)
    files = [gen_path, out_dir / "results.json", out_dir / "results.md"]
    atomic_write_text(files[1], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(files[2], markdown)
    return EvalReport(results=results, breakdowns=breakdowns, data=data, markdown=markdown, files=files)
