"""The results of a matrix: one record per run (config essentials, budget, times, scores), the table in
``pocl eval``'s results.json layout (mean ± std over the training seeds), the paired POCL − KD
differences, ``results.md`` / ``results.json`` / bar charts, and their export."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from pocl.artifacts import atomic_write
from pocl.evaluation.metrics import mean_std
from pocl.evaluation.report import answer_length_table, results_table
from pocl.experiments.intervals import (
    bootstrap_paired,
    load_prompt_scores,
    paired_differences_by_prompt,
)
from pocl.experiments.plan import (
    Run,
    assistant_dir,
    heal_run,
    model_dirs,
    read_json,
    row_order,
    run_dir,
)
from pocl.experiments.spec import SCHEMA, Spec
from pocl.reporting.plots import plot_eval_comparison


def samples_trained(summary: dict, batch_size: int) -> int:
    """The number of samples the run's optimizer steps trained on, from ``summary.json``'s stages: an
    epoch of a stage with n samples is ceil(n / batch_size) windows, the last one n mod batch_size."""
    total = 0
    for st in summary.get("stages", []):
        n, steps = int(st["num_samples"]), int(st["steps"])
        spe = max(1, math.ceil(n / batch_size))
        sizes = [min(batch_size, n - k * batch_size) for k in range(spe)]
        full, rest = divmod(steps, spe)
        total += full * n + sum(sizes[:rest])
    return total


# ------------------------------------------------------------------------------------------ tables
def _entry(values: list[float], seeds: list) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "seeds": list(seeds), "per_seed": list(values)}


def run_record(spec: Spec, run: Run, evaluation: dict | None) -> dict:
    """One run's line of results.json: config essentials, budget, times, scores per set and Avg."""
    rec: dict[str, Any] = {"name": run.name, "row": run.row, "group": run.group, "seed": run.seed,
                           "method": run.method, "divergence": run.divergence}
    if run.config is not None:
        folder = run_dir(spec, run)
        rec["output_dir"] = str(folder)
        rec["command"] = f"pocl distill --config {spec.output_dir / 'configs' / (run.name + '.yaml')}"
        summary = read_json(folder / "summary.json") or {}
        rec["status"] = summary.get("status", "not started")
        if summary.get("status") == "completed":
            bs = int(run.config["train"].get("batch_size", 64))
            n_all = max(int(st["num_samples"]) for st in summary["stages"])
            seen = samples_trained(summary, bs)
            rank = summary.get("ranking") or {}
            rec.update(
                train_samples=n_all, samples_trained=seen, sample_passes=seen / n_all,
                planned_passes=sum(float(st["epochs"]) * int(st["num_samples"]) for st in summary["stages"]) / n_all,
                steps=summary["global_steps"], train_seconds=summary["train_seconds"],
                ranking_seconds=rank.get("measure_seconds") if run.is_pocl else None,
                ranking_action=rank.get("action") if run.is_pocl else None,
                stages=[{k: st.get(k) for k in ("name", "num_samples", "epochs", "steps", "temperature", "alpha",
                                                "skew", "train_seconds")} for st in summary["stages"]],
                best_metric=summary.get("best_metric"), selection_metric=summary.get("selection_metric"))
            if run.is_pocl:
                rec["measurer"] = summary.get("measurer")
    else:
        rec.update(status="reference", output_dir=str(run.model_path))
    if evaluation is not None:
        m = evaluation["models"][run.name]
        rec["eval_dir"] = str(spec.output_dir / "eval" / run.name)
        rec["eval_seeds"] = evaluation["seeds"]
        rec["scores"] = {metric: {s: m["sets"][s][metric]["mean"] for s in evaluation["sets"]}
                         | {"Avg": m["avg"][metric]["mean"]} for metric in ("rouge_l", "exact_match")}
        rec["scores_eval_seed_std"] = {metric: {s: m["sets"][s][metric]["std"] for s in evaluation["sets"]}
                                       | {"Avg": m["avg"][metric]["std"]} for metric in ("rouge_l", "exact_match")}
        rec["eval_seconds"] = sum(m["sets"][s]["seconds"]["total"] for s in evaluation["sets"])
        # How long the answers are and how often they end: ROUGE-L F against long references rewards length,
        # so a change in either can move a score without any change in what the answers say.
        rec["answers"] = {s: {"generated_tokens": m["sets"][s]["generated_tokens_mean"],
                              "stopped_at_eos": m["sets"][s]["stopped_at_eos_fraction"]}
                          for s in evaluation["sets"] if "generated_tokens_mean" in m["sets"][s]}
    return rec


def build_table(records: list[dict], sets: list[str], rows: list[str], seeds: list[int]) -> dict:
    """The table in ``pocl eval``'s results.json layout (so its Markdown and plot code apply): one
    "model" per method row; per set and Avg the mean ± std over the row's training seeds of each run's
    score (a reference model, trained once, shows the std over the evaluation seeds)."""
    table = {"schema": SCHEMA, "sets": {s: {} for s in sets}, "seeds": seeds, "std": "sample", "models": {}}
    for row in rows:
        recs = sorted((r for r in records if r["row"] == row and "scores" in r), key=lambda r: r["seed"] or 0)
        if not recs:
            continue
        entry: dict[str, Any] = {"sets": {s: {} for s in sets}, "avg": {}, "runs": [r["name"] for r in recs]}
        for metric in ("rouge_l", "exact_match"):
            for col in sets + ["Avg"]:
                if recs[0]["group"] == "reference":
                    cell = {"mean": recs[0]["scores"][metric][col],
                            "std": recs[0]["scores_eval_seed_std"][metric][col], "seeds": recs[0]["eval_seeds"],
                            "per_seed": None}
                else:
                    cell = _entry([r["scores"][metric][col] for r in recs], [r["seed"] for r in recs])
                (entry["avg"] if col == "Avg" else entry["sets"][col])[metric] = cell
        for col in sets:  # the answers' length, averaged over the row's runs (pocl eval's keys)
            per_run = [r["answers"][col] for r in recs if col in r.get("answers", {})]
            if len(per_run) == len(recs):
                entry["sets"][col]["generated_tokens_mean"] = sum(a["generated_tokens"] for a in per_run) / len(recs)
                entry["sets"][col]["stopped_at_eos_fraction"] = sum(a["stopped_at_eos"] for a in per_run) / len(recs)
        table["models"][row] = entry
    return table


def _cost_rows(records: list[dict], rows: list[str]) -> list[list[str]]:
    out = []
    kd = {(r["divergence"], r["seed"]): r for r in records if r["method"] == "kd" and "samples_trained" in r}
    for r in list(kd.values()):  # a run without a divergence (TAID): the KD run of its seed (the first divergence)
        kd.setdefault((None, r["seed"]), r)
    for row in rows:
        recs = [r for r in records if r["row"] == row and "samples_trained" in r]
        if not recs:
            continue

        def mean(key: str, recs: list[dict] = recs) -> float:
            return sum(r[key] for r in recs) / len(recs)

        rank = [r["ranking_seconds"] for r in recs if r.get("ranking_seconds") is not None]
        rank_s = sum(rank) / len(rank) if rank else None
        share = "–" if rank_s is None else f"{100 * rank_s / (rank_s + mean('train_seconds')):.1f}%"
        same = []
        for r in recs:
            ref = kd.get((r["divergence"], r["seed"]))
            if r["group"] in ("main", "ablation") and r["method"] != "kd" and ref is not None:
                same.append(r["samples_trained"] == ref["samples_trained"])
        budget = "–" if not same else ("yes" if all(same) else f"NO ({sum(same)}/{len(same)})")
        out.append([row, str(len(recs)), f"{mean('samples_trained'):.0f}", f"{mean('sample_passes'):.3g}", budget,
                    f"{mean('train_seconds'):.1f}", "–" if rank_s is None else f"{rank_s:.1f}", share])
    return out


def paired_differences(records: list[dict], sets: list[str], metric: str = "rouge_l") -> list[dict]:
    """KD + POCL minus plain KD, paired by divergence and training seed: per set and Avg the mean and
    sample std of the per-seed differences and the number of seeds on which POCL scored higher. (All runs
    start from the same initial student and use the same evaluation seeds; the training seed sets the
    shuffling, so the pairing is a convention and the win count says whether the sign is consistent.)"""
    kd = {(r["divergence"], r["seed"]): r for r in records
          if r["group"] == "main" and r["method"] == "kd" and "scores" in r}
    out = []
    for div in dict.fromkeys(r["divergence"] for r in records if r["group"] == "main"):
        pairs = [(r, kd[(div, r["seed"])]) for r in records
                 if r["group"] == "main" and r["method"] == "pocl" and r["divergence"] == div and "scores" in r
                 and (div, r["seed"]) in kd]
        if not pairs:
            continue
        row = {"divergence": div, "seeds": [r["seed"] for r, _ in pairs], "cols": {}}
        for col in sets + ["Avg"]:
            d = [p["scores"][metric][col] - k["scores"][metric][col] for p, k in pairs]
            mean, std = mean_std(d)
            std = std if len(d) > 1 else float("nan")  # one pair: no spread (not 0)
            row["cols"][col] = {"mean": mean, "std": std, "wins": sum(x > 0 for x in d), "n": len(d), "per_seed": d}
        out.append(row)
    return out


#: The paired comparisons of the main matrix, (A, B) = A − B per divergence and seed: each method with POCL
#: minus the same method without, and the assistant teacher minus POCL with the teacher alone.
PAIRED_METHODS = (("pocl", "kd"), ("taid-pocl", "taid"), ("skd-pocl", "skd"), ("pocl-assistant", "pocl"))


def paired_intervals(records: list[dict], sets: list[str], metric: str = "rouge_l", *,
                     n_boot: int = 4000) -> list[dict]:
    """The differences with their 95 % bootstrap intervals, paired by training seed and prompt
    (:mod:`pocl.experiments.intervals`): per divergence KD + POCL − KD, TAID + POCL − TAID, SKD + POCL − SKD
    and POCL with the assistant teacher − POCL (``PAIRED_METHODS``, when both are in the matrix), and each
    ablation − the full POCL run of its divergence, over the seeds both sides have evaluated. One dict per comparison:
    ``label``, ``seeds``, ``cols`` (set / "Avg" -> Interval as a dict with ``half_width``)."""
    done = [r for r in records if "eval_dir" in r and r["group"] in ("main", "ablation")]
    main = {(r["method"], r["divergence"], r["seed"]): r for r in done if r["group"] == "main"}
    comparisons: list[tuple[str, list[tuple[dict, dict]]]] = []
    for a, b in PAIRED_METHODS:
        for div in dict.fromkeys(r["divergence"] for r in done if r["group"] == "main"):
            pairs = [(r, main[(b, div, r["seed"])]) for r in done if r["group"] == "main" and r["method"] == a
                     and r["divergence"] == div and (b, div, r["seed"]) in main]
            if pairs:
                comparisons.append((f"{pairs[0][0]['row']} − {pairs[0][1]['row']}", pairs))
    for row in dict.fromkeys(r["row"] for r in done if r["group"] == "ablation"):
        pairs = [(r, main[("pocl", r["divergence"], r["seed"])]) for r in done if r["row"] == row
                 and ("pocl", r["divergence"], r["seed"]) in main]
        if pairs:
            comparisons.append((f"{row} − {pairs[0][1]['row']}", pairs))
    out = []
    for label, pairs in comparisons:
        if not pairs:
            continue
        cubes = paired_differences_by_prompt(
            [(load_prompt_scores(a["eval_dir"], a["name"], metric), load_prompt_scores(b["eval_dir"], b["name"], metric))
             for a, b in pairs], sets)
        intervals = bootstrap_paired(cubes, n_boot=n_boot)
        out.append({"label": label, "seeds": [a["seed"] for a, _ in pairs], "metric": metric,
                    "cols": {k: {**dataclasses.asdict(v), "half_width": v.half_width} for k, v in intervals.items()}})
    return out


def _interval_lines(intervals: list[dict], sets: list[str]) -> list[str]:
    if not intervals:
        return []
    shape = intervals[0]["cols"]["Avg"]["n"]
    lines = ["## Differences with 95 % bootstrap intervals, paired by training seed and prompt (ROUGE-L)", "",
             ("Mean difference [2.5th, 97.5th percentile of 4,000 bootstrap replicates], resampling the training-seed "
              "pairs (the same draw for every set) and the prompts within each set; Avg = mean over the sets. "
              f"Main rows: {shape[0]} seed pairs × {shape[1]} prompts (all sets) × {shape[2]} sampling seeds; "
              "each method with POCL against the same method without it, the assistant teacher against POCL with "
              "the teacher alone. Ablations: against the full POCL run of the same seed(s)."), "",
             "| comparison | seeds | " + " | ".join(sets + ["Avg"]) + " | Avg half-width |",
             "|" + "---|" * (len(sets) + 4)]
    for row in intervals:
        cells = [f"{c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
                 for c in (row["cols"][k] for k in sets + ["Avg"])]
        lines.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells)
                     + f" | {row['cols']['Avg']['half_width']:.2f} |")
    return lines + [""]


def _paired_lines(records: list[dict], sets: list[str]) -> list[str]:
    lines = []
    for metric, title in (("rouge_l", "ROUGE-L"), ("exact_match", "exact match")):
        rows = paired_differences(records, sets, metric)
        if not rows:
            continue
        lines += [f"## KD + POCL minus KD, paired by seed ({title})", "",
                  ("Per divergence and set: mean ± sample std over the training seeds of (POCL run − KD run of the "
                   "same seed), and on how many seeds POCL scored higher."), "",
                  "| divergence | " + " | ".join(sets + ["Avg"]) + " |", "|" + "---|" * (len(sets) + 2)]
        for r in rows:
            cells = []
            for col in sets + ["Avg"]:
                c = r["cols"][col]
                std = "" if math.isnan(c["std"]) else f" ± {c['std']:.2f}"
                cells.append(f"{c['mean']:+.2f}{std} ({c['wins']}/{c['n']})")
            lines.append(f"| {r['divergence'].upper()} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(spec: Spec, table: dict, records: list[dict], rows: list[str], intervals: list[dict] = ()) -> str:
    """The text of results.md: the ROUGE-L and exact-match tables, the paired POCL − KD differences (by
    seed, and with their bootstrap ``intervals`` by seed and prompt: :func:`paired_intervals`), the answer
    lengths and the budget and cost table."""
    train = [r for r in records if r["group"] != "reference"]
    done = sum(1 for r in train if "scores" in r)
    ev = next((r for r in records if "eval_seeds" in r), {})
    lines = [f"# Experiment matrix `{spec.path.name}`", "",
             (f"{done} of {len(train)} training runs evaluated. Each run's score is the mean over the evaluation "
              f"seeds {ev.get('eval_seeds', '?')} (`pocl eval` protocol of `{spec.path.name}`); a cell is the mean ± "
              f"sample std of that score over the training seeds {spec.seeds} (teacher and initial student: one "
              "model, ± = std over the evaluation seeds). Avg = mean over the sets. Scores × 100."), ""]
    for metric, title in (("rouge_l", "ROUGE-L"), ("exact_match", "Exact match")):
        text = results_table(table, metric)
        lines += [f"## {title}", "", text.replace("| model |", "| method |", 1), ""]
    lines += _paired_lines(records, list(table["sets"]))
    lines += _interval_lines(intervals, list(table["sets"]))
    answers = answer_length_table(table)
    if answers:
        lines += ["## Answer length", "",
                  ("Per method and set: generated tokens per answer (mean over prompts, evaluation seeds and training "
                   "seeds) and, in brackets, the share of answers that ended with EOS; the others were cut at the "
                   "evaluation's max_new_tokens. Avg: over the sets."), "",
                  answers.replace("| model |", "| method |", 1), ""]
    header = ["method", "runs", "samples trained", "passes", "same budget as KD", "train s", "ranking s",
              "ranking share"]
    body = _cost_rows(records, rows)
    lines += ["## Budget and cost", "",
              ("Samples trained = optimizer steps × their batches, from each run's summary.json; passes = that / "
               "training-set size; same budget: equal to the KD run of the same divergence (TAID: the first) and seed. Ranking s = "
               "the measurement pass of the initial student (made once, shared by every POCL run); share = ranking "
               "/ (ranking + training)."), "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def write_results(spec: Spec, plan: list[Run], evaluations: dict[str, dict | None], *, plots: bool = True) -> dict:
    """Write OUTPUT/results.json, results.md and (with ``plots``) tables/ and plots/ from the runs'
    evaluations (run name -> results.json of ``pocl eval``, or None); returns results.json's content."""
    records = [run_record(spec, r, evaluations.get(r.name)) for r in plan]
    sets = next((list(e["sets"]) for e in evaluations.values() if e), [])
    rows = row_order(plan)
    table = build_table(records, sets, rows, spec.seeds)
    intervals = paired_intervals(records, sets) if sets else []
    out = spec.output_dir
    teacher, student = model_dirs(spec)
    models: dict[str, Any] = {"teacher": teacher, "teacher_source": spec.teacher, "initial_student": student,
                              "student_init": read_json(Path(model_dirs(spec, healed=False)[1]) / "init_student.json")}
    if spec.assistant is not None:
        models.update(assistant=assistant_dir(spec), assistant_stages=spec.assistant_stages,
                      assistant_init=read_json(Path(assistant_dir(spec, healed=False)) / "init_student.json"))
    for role in ("student", "assistant"):
        heal = heal_run(spec, role)
        if heal is not None:
            hs = read_json(run_dir(spec, heal) / "summary.json") or {}
            models[heal.name] = {"command": f"pocl distill --config {spec.output_dir / 'configs' / heal.name}.yaml",
                                 "status": hs.get("status"), "steps": hs.get("global_steps"),
                                 "train_seconds": hs.get("train_seconds"), "method": heal.method}
    data = {"schema": SCHEMA, "spec": str(spec.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "models": models, "table": table, "paired_intervals": intervals, "runs": records}
    atomic_write(out / "results.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n", make_parents=True)
    atomic_write(out / "results.md", markdown(spec, table, records, rows, intervals), make_parents=True)
    if plots and intervals:
        from pocl.reporting.interval_plot import plot_paired_intervals

        plot_paired_intervals(intervals, out / "plots" / "paired_intervals.png", reference=1.93,
                              reference_label="the paper's average POCL effect (+1.93)")
    if plots and table["models"]:
        groups = {r.row: r.group for r in plan}
        for part, keep in (("main", ("reference", "baseline", "main")), ("ablations", ("ablation",))):
            chosen = [row for row in table["models"] if groups[row] in keep]
            if part == "ablations" and chosen:  # next to the full POCL and KD rows of the same divergences
                divs = {r.divergence.upper() for r in plan if r.group == "ablation"}
                chosen = [row for row in table["models"] if row in {d for d in divs} | {d + "+POCL" for d in divs}] \
                    + chosen
            if not chosen:
                continue
            sub = dict(table, models={row: table["models"][row] for row in chosen})
            atomic_write(out / "tables" / f"{part}.json", json.dumps(sub, indent=2, ensure_ascii=False) + "\n",
                         make_parents=True)
            plot_eval_comparison([out / "tables" / f"{part}.json"], out / "plots" / f"{part}_rouge_l.png",
                                 title=f"ROUGE-L, {part} (error bars: std over training seeds)")
    return data


def export_results(spec: Spec, dest: Path) -> list[Path]:
    """Copy the matrix's results (tables, JSON, plots) into ``dest``, e.g. a documentation folder;
    returns the files written."""
    written = []
    for rel in ["results.md", "results.json"] + sorted(
            str(p.relative_to(spec.output_dir)) for sub in ("tables", "plots")
            for p in (spec.output_dir / sub).glob("*") if p.is_file()):
        src, dst = spec.output_dir / rel, dest / rel
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    return written
