"""Markdown tables from ``results.json`` (the content written by ``pocl eval``).

The main table has the layout of the spec's section 6 table: one row per model, one column per
evaluation set plus ``Avg`` (the mean over sets), cells ``mean ± std`` of ROUGE-L over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

METRIC_TITLES = {"rouge_l": "ROUGE-L", "exact_match": "Exact match"}


def _cell(entry: Mapping[str, Any] | None, digits: int = 2, with_std: bool = True) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    # one value (e.g. a row trained with one seed in a table of several): there is no spread to show
    if not with_std or len(entry.get("seeds") or (None, None)) < 2:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def model_label(model: str, entry: Mapping[str, Any]) -> str:
    """The model's name in a table, marked when its weights are not finite."""
    bad = entry.get("nonfinite_weights")
    return f"{model} ⚠ non-finite weights ({bad['tensor'] if isinstance(bad, Mapping) else bad})" if bad else model


def nonfinite_warnings(data: Mapping[str, Any]) -> list[str]:
    """One warning line per model whose weights hold NaN or inf (``nonfinite_weights`` in results.json)."""
    lines = []
    for model, entry in data.get("models", {}).items():
        bad = entry.get("nonfinite_weights")
        if bad:
            what = (f"tensor `{bad['tensor']}` holds {bad['nan']} NaN and {bad['inf']} infinite values (of "
                    f"{bad['numel']})" if isinstance(bad, Mapping) else f"`{bad}`")
            lines.append(f"**Warning: model {model} has non-finite weights**: {what}; it was not evaluated.")
    return lines


def results_table(data: Mapping[str, Any], metric: str = "rouge_l", *, digits: int = 2) -> str:
    """Rows = models, columns = sets + Avg, cells ``mean ± std`` (std over seeds; one seed: mean only)."""
    sets = list(data["sets"])
    with_std = len(data.get("seeds", [])) > 1
    rows = []
    for model, entry in data["models"].items():
        cells = [_cell(entry["sets"].get(s, {}).get(metric), digits, with_std) for s in sets]
        avg = entry.get("avg", {}).get(metric) if len(sets) > 1 else None
        rows.append([model_label(model, entry), *cells] + ([_cell(avg, digits, with_std)] if len(sets) > 1 else []))
    header = ["model", *sets] + (["Avg"] if len(sets) > 1 else [])
    return "\n".join(_table(header, rows))


def breakdown_tables(data: Mapping[str, Any], metric: str = "rouge_l", *, digits: int = 2) -> str:
    """One table per ranked set: rows = models, columns = difficulty buckets."""
    bd = data.get("breakdown") or {}
    with_std = len(data.get("seeds", [])) > 1
    by_set: dict[str, dict[str, Any]] = {}
    for model, per_set in bd.items():
        for set_name, entry in per_set.items():
            by_set.setdefault(set_name, {})[model] = entry
    parts = []
    for set_name, per_model in by_set.items():
        first = next(iter(per_model.values()))
        cov = first["coverage"]
        buckets = first["buckets"]
        header = ["model"] + [f"{b['name']} (n={b['n']}, ranks {b['rank_min']}–{b['rank_max']})" if b["n"]
                              else f"{b['name']} (n=0)" for b in buckets]
        rows = [[model] + [_cell(b.get(metric), digits, with_std) for b in entry["buckets"]]
                for model, entry in per_model.items()]
        note = (f"Ranking `{first['ranking']}` covers {cov['covered']} of {cov['evaluated']} evaluated samples "
                f"({100 * cov['fraction']:.1f}%)")
        note += "." if cov["covered"] == cov["evaluated"] else f"; {cov['missing']} unranked samples are left out."
        parts.append(f"### {METRIC_TITLES.get(metric, metric)} by difficulty on {set_name}\n\n{note}\n\n"
                     + "\n".join(_table(header, rows)))
    return "\n\n".join(parts)


def answer_length_table(data: Mapping[str, Any]) -> str:
    """Per model and set: generated tokens per answer and, in brackets, the share of answers that ended with
    EOS (the rest ran to max_new_tokens); Avg weighs the sets equally. Empty for results.json files written
    before these figures were recorded."""
    sets = list(data.get("sets", {}))
    rows = []
    for model, entry in data.get("models", {}).items():
        cells = [entry["sets"].get(s, {}) for s in sets]
        if not sets or any("generated_tokens_mean" not in c for c in cells):
            continue
        tokens = [c["generated_tokens_mean"] for c in cells]
        eos = [c["stopped_at_eos_fraction"] for c in cells]
        rows.append([model_label(model, entry)]
                    + [f"{t:.1f} ({100 * e:.0f} %)" for t, e in zip(tokens, eos)]
                    + [f"{sum(tokens) / len(tokens):.1f} ({100 * sum(eos) / len(eos):.0f} %)"])
    return "\n".join(_table(["model", *sets, "Avg"], rows)) if rows else ""


def markdown_report(data: Mapping[str, Any]) -> str:
    """The whole results.md: settings line, ROUGE-L table, exact-match table, answer lengths, breakdown tables."""
    dec = data.get("decoding", {})
    seeds = data.get("seeds", [])
    if dec.get("do_sample", True):
        decoding = (f"sampling T={dec.get('temperature')}, top-p {dec.get('top_p')}, "
                    f"top-k {dec.get('top_k') or 'off'}")
    else:
        decoding = "greedy"
    decoding += (f", no_repeat_ngram_size {dec.get('no_repeat_ngram_size')}, at most "
                 f"{dec.get('max_new_tokens')} new tokens")
    n = ", ".join(f"{name} {info['n']}" for name, info in data.get("sets", {}).items())
    spread = (f"mean ± {data.get('std', 'sample')} std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
              if len(seeds) > 1 else f"one pass, seed {seeds[0] if seeds else '?'}")
    # results.json files written before the option existed compared whitespace-normalised text
    em_norm = data.get("em_normalization", "whitespace")
    lines = ["# Evaluation results", "",
             (f"{decoding}; {spread}. Samples per set: {n}. Scores × 100; Avg = mean over sets; exact match after "
             f"{em_norm} normalisation."), ""]
    warnings = nonfinite_warnings(data)
    if warnings:
        lines += [*warnings, ""]
    lines += [f"## {METRIC_TITLES['rouge_l']}", "", results_table(data, "rouge_l"), "",
              f"## {METRIC_TITLES['exact_match']}", "", results_table(data, "exact_match"), ""]
    answers = answer_length_table(data)
    if answers:  # ROUGE-L F rewards long answers against long references: read a score next to its lengths
        lines += ["## Answer length", "", ("Generated tokens per answer (in brackets: the share that ended with EOS; "
                  "the others ran to the token cap)."), "", answers, ""]
    bd = breakdown_tables(data, "rouge_l")
    if bd:
        lines += ["## By difficulty", "", bd, ""]
    return "\n".join(lines)
