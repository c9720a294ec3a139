"""``pocl eval``: several models x several sets, per-difficulty breakdowns, and the output files
(``generations.jsonl``, ``results.json``, ``results.md``).

The scoring of one model on one set (:func:`evaluate_records`, the result classes, the average over
sets) is in :mod:`pocl.evaluation.scoring` and re-exported here; the trainer can call
:func:`evaluate_records` for a dev ROUGE-L.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pocl._version import __version__
from pocl.artifacts import atomic_open, atomic_write
from pocl.data import get_template
from pocl.errors import ConfigError
from pocl.evaluation.scoring import (METRICS, SampleResult, SeedResult, SetResult, average_over_sets, decoding_dict,
                                     evaluate_records, generation_rows)
from pocl.generation import DecodingConfig, effective_settings, special_token_ids

log = logging.getLogger("pocl.eval")

SCHEMA = "pocl.eval/1"

__all__ = ["METRICS", "SCHEMA", "EvalReport", "SampleResult", "SeedResult", "SetResult", "atomic_write_text",
           "average_over_sets", "decoding_dict", "evaluate_records", "generation_record", "generation_rows",
           "run_eval", "versions"]


# ------------------------------------------------------------------------------------------ files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`pocl.artifacts.atomic_write`), creating its folder."""
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
    # Always with the tokenizer: a chat template needs it, and so does a conversation row under any template.
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
