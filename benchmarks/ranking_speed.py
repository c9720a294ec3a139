"""Benchmark: the POCL ranking pass (difficulty measurer) -- batched vs one prompt at a time, and its share of a run.

Two questions (issue 6, item 4):

1. **Speed of the measurer.** Samples/s of :func:`pocl.curriculum.difficulty.measure_difficulty` (the loss signal,
   length-grouped batches through the chunked LM head, and the ROUGE-L signal, batched length-grouped near-greedy
   generation plus scoring) at the built-in default's batch size, against the same function with ``batch_size=1``
   (one prompt at a time for both signals). The model is the built-in default's *initial student*
   (``runs/default/student-base/final``), the records its training split, the settings the built-in POCL run's
   (``rank_max_new_tokens`` 24, ``rank_batch_size`` 64, T = 0.01, ``no_repeat_ngram_size`` 6). One prompt at a time
   is slow, so it runs on ``--single-samples`` records spread evenly over the length-sorted training set; the
   batched pass runs on the same subset *and* on the whole training set. Modes are interleaved within each repeat.
2. **Share of a whole POCL run.** ``timings.pocl_ranking_seconds`` against ``timings.pocl_training_seconds`` (and
   against ``pocl_seconds``, the whole ``distill`` call of the POCL run: ranking, stages, dev evaluations,
   checkpoints) of ``runs/default/results.json``, written by ``pocl distill`` with no arguments, which this script
   runs in a scratch folder (``--scratch``) unless ``--reuse`` points to a completed run. An estimate for the
   paper's setting follows by arithmetic (see ``paper_estimate``).

    python benchmarks/ranking_speed.py                    # runs the built-in default first (48 min on the loaded 2-core machine)
    python benchmarks/ranking_speed.py --reuse /tmp/x     # reuse /tmp/x/runs/default/results.json (status completed)
    python benchmarks/ranking_speed.py --quick            # smoke run on a finished run (few samples, 1 repeat)

Writes ``benchmarks/results/ranking_speed.json`` and ``.md``. One torch thread by default (``--threads``), also for
the ``pocl distill`` subprocess (``OMP_NUM_THREADS``), on a shared 2-core machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_OUT = C.RESULTS / "ranking_speed.json"


def run_builtin(scratch: Path, threads: int) -> dict:
    """``pocl distill`` with no arguments in ``scratch`` (writes ``scratch/runs/default``)."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "pocl", "distill"]
    print(f"running {' '.join(cmd)} in {scratch} (OMP_NUM_THREADS={threads})", flush=True)
    load_before = C.load()
    t0 = time.perf_counter()
    log_path = scratch / "pocl_distill.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pocl distill failed (exit {proc.returncode}); see {log_path}")
    return {"command": f"cd {scratch} && OMP_NUM_THREADS={threads} {' '.join(cmd)}", "wall_seconds": round(wall, 1),
            "log": str(log_path), "load_average": {"before": load_before, "after": C.load()}}


def run_share(results: dict) -> dict:
    t = results["timings"]
    rank, train = t["pocl_ranking_seconds"], t["pocl_training_seconds"]
    stages = results["pocl_summary"].get("stages", [])
    passes = sum(s["num_samples"] * s["epochs"] for s in stages) / max(1, results["settings"]["n_train"])
    return {"pocl_ranking_seconds": rank, "pocl_training_seconds": train, "pocl_seconds": t["pocl_seconds"],
            "ranking_over_ranking_plus_training": rank / (rank + train),
            "ranking_over_pocl_run": rank / t["pocl_seconds"],
            "ranking_signal_seconds": dict(results["pocl_summary"].get("ranking", {}).get("timings") or {},
                                           measure_seconds=rank),
            "training_passes_over_the_data": passes,
            "stage_epochs": [s["epochs"] for s in stages], "stage_samples": [s["num_samples"] for s in stages],
            "n_train": results["settings"]["n_train"]}


def paper_estimate(measured: dict) -> dict:
    """Ranking share for the paper's setting by arithmetic (FLOPs; stated assumptions).

    Per training sample and pass, a KD step costs a teacher forward (2·P_t·L FLOPs) plus a student forward and
    backward (6·P_s·L). The ranking pass costs, once per sample, a student loss forward (2·P_s·L) and a generation of
    G new tokens (about 2·P_s·(prompt + G) with the KV cache). The paper's budget is 4 stages x 8 epochs on
    25/50/75/100 % = 20 passes. With a teacher cache (``loss.teacher_cache`` hidden, the default, or topk) the teacher
    runs once per sample instead of once per pass, so training costs ``(2·P_t + passes·6·P_s)·L`` and the ranking's
    share is larger: both are given. FLOPs understate generation time: decoding runs one token at a time and is bound
    by latency, not arithmetic, so the estimate is a lower bound of the share; the measured built-in run gives the
    ratio of seconds per FLOP between generation and training on this machine (its training FLOPs counted with the
    teacher passes it really made), used for the corrected estimate.
    """
    # Teacher -> student pairs of the size the KD papers on Dolly use (GPT-2 XL -> GPT-2 base as in MiniLLM and
    # DistiLLM; OpenLLaMA-2 7B -> 3B as in DistiLLM) and a current one; parameters including embeddings.
    cases = {"GPT-2 XL 1.5B -> GPT-2 base 124M": (1.56e9, 0.124e9),
             "OpenLLaMA-2 7B -> OpenLLaMA-2 3B": (6.7e9, 3.4e9),
             "Qwen2.5-7B -> Qwen2.5-0.5B": (7.6e9, 0.49e9)}
    prompt, response, gen = 128, 128, 256   # typical Dolly lengths (tokens), max new tokens of the measurer
    passes = 20
    L = prompt + response
    out = {"assumptions": {"prompt_tokens": prompt, "response_tokens": response, "max_new_tokens": gen,
                           "training_passes": passes, "generated_tokens_per_sample": gen,
                           "note": "generation assumed to run to the 256-token limit (worst case)"}, "cases": {}}
    # Seconds-per-FLOP correction from the built-in run: how much slower per FLOP the measurer is than training.
    b = measured
    corr = None
    if b:
        s = b["settings"]
        pt, ps = b["teacher_parameters"], b["student_parameters"]
        lt = s["mean_prompt_tokens"] + s["mean_response_tokens"]
        passes_b = b["training_passes_over_the_data"]
        teacher_passes_b = 1.0 if b.get("teacher_cache", "off") != "off" else passes_b  # "on" (older runs), hidden, topk
        train_flops = b["n_train"] * (teacher_passes_b * 2 * pt + passes_b * 6 * ps) * lt
        rank_flops = b["n_train"] * (2 * ps * lt + 2 * ps * (s["mean_prompt_tokens"] + s["mean_generated_tokens"]))
        corr = (b["pocl_ranking_seconds"] / rank_flops) / (b["pocl_training_seconds"] / train_flops)
        out["builtin_flops"] = {"training": train_flops, "ranking": rank_flops, "teacher_passes": teacher_passes_b,
                                "flop_share": rank_flops / (rank_flops + train_flops),
                                "seconds_per_flop_ratio_ranking_over_training": corr}
    for name, (pt, ps) in cases.items():
        rank = 2 * ps * L + 2 * ps * (prompt + gen)
        row = {"teacher_parameters": pt, "student_parameters": ps}
        for teacher, teacher_passes in (("live", passes), ("cached", 1)):
            train = (teacher_passes * 2 * pt + passes * 6 * ps) * L
            # The seconds-per-FLOP ratio (ranking over training) at which ranking would reach 10 % of ranking + training.
            sub = {"flop_share": rank / (rank + train), "seconds_per_flop_ratio_for_10pct": (0.1 / 0.9) * train / rank}
            if corr is not None:
                sub["share_with_builtin_seconds_per_flop_ratio"] = corr * rank / (corr * rank + train)
            if teacher == "live":  # the live teacher's figures also at the top level (the earlier layout)
                row.update(sub)
            row[f"{teacher}_teacher"] = sub
        out["cases"][name] = row
    return out


def measured_inputs(result: dict) -> dict:
    """What :func:`paper_estimate` needs from a finished result (the teacher's size is read from its folder)."""
    from pocl.models import load_model

    results_file = Path(result["builtin_run"]["results_file"])
    results = json.loads(results_file.read_text(encoding="utf-8"))
    teacher_dir = Path(results["pocl_config"]["model"]["teacher"])
    if not teacher_dir.is_absolute():  # relative to the folder `pocl distill` ran in
        teacher_dir = results_file.parent.parent.parent / teacher_dir
    teacher = load_model(str(teacher_dir))
    sp = result["speed"]
    return dict(result["share"], teacher_cache=results["pocl_config"].get("loss", {}).get("teacher_cache", "off"),
                settings=dict(sp["settings"],
                                               mean_generated_tokens=sp["runs"]["batched_all"]["mean_generated_tokens"]),
                teacher_parameters=sum(p.numel() for p in teacher.parameters()),
                student_parameters=sp["model"]["parameters"])


def measure_speed(run_dir: Path, args) -> dict:
    import torch

    from pocl.config import DistillConfig
    from pocl.curriculum.difficulty import measure_difficulty, ranking_decoding
    from pocl.data import get_template, load_records, tokenize_records
    from pocl.models import load_model, load_tokenizer

    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    cfg = DistillConfig.from_dict(results["pocl_config"])
    student_dir = Path(cfg.model.student)
    if not student_dir.is_absolute():
        student_dir = run_dir.parent.parent / student_dir
    train_file = Path(cfg.data.train_file)
    if not train_file.is_absolute():
        train_file = run_dir.parent.parent / train_file
    tokenizer = load_tokenizer(str(student_dir))
    model = load_model(str(student_dir), dtype=torch.float32)
    records = load_records(train_file).records[: args.max_samples]
    cc, dc = cfg.curriculum, cfg.data
    template = get_template(dc.template, tokenizer=tokenizer, use_prompt_field=dc.use_prompt_field)
    decoding = ranking_decoding(cc)
    common = dict(template=template, max_length=dc.max_length, max_prompt_length=dc.max_prompt_length,
                  truncation_side=dc.truncation_side, decoding=decoding, seed=cfg.train.seed, progress=False)
    # (chunk_size: the measurer's own default, as pocl.curriculum.ranking calls it)
    data = tokenize_records(records, tokenizer, template, max_length=dc.max_length,
                            max_prompt_length=dc.max_prompt_length, truncation_side=dc.truncation_side)
    order = sorted(range(len(records)), key=lambda i: (len(data[i].input_ids), i))
    k = min(args.single_samples, len(records))
    subset_idx = sorted(order[round(j * (len(order) - 1) / max(k - 1, 1))] for j in range(k))
    subset = [records[i] for i in subset_idx]
    bs = cc.rank_batch_size
    modes = [("batched_all", records, bs), ("batched_subset", subset, bs), ("one_at_a_time_subset", subset, 1)]
    measure_difficulty(model, tokenizer, records[:4], batch_size=4, **common)  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m, _, _ in modes}
    signal_seconds: dict[str, list[dict]] = {m: [] for m, _, _ in modes}
    outputs: dict[str, list] = {}
    load_before = C.load()
    for rep in range(args.repeats):
        for mode, recs, b in modes:
            if mode == "batched_all" and rep >= args.full_repeats:
                continue
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            outputs[mode] = measure_difficulty(model, tokenizer, recs, batch_size=b, timings=timings, **common)
            seconds[mode].append(time.perf_counter() - t0)
            signal_seconds[mode].append({k2: round(v, 3) for k2, v in timings.items()})
            print(f"round {rep + 1}: {mode} ({len(recs)} samples, batch {b}): {seconds[mode][-1]:.1f} s "
                  f"({len(recs) / seconds[mode][-1]:.1f} samples/s)", flush=True)
    runs = {}
    for mode, recs, b in modes:
        s = seconds[mode]
        gen_tokens = [len(tokenizer(d.generation or "", add_special_tokens=False)["input_ids"])
                      for d in outputs[mode]]
        runs[mode] = {"samples": len(recs), "batch_size": b, "seconds": C.stats(s),
                      "samples_per_s_median": len(recs) / statistics.median(s),
                      "samples_per_s_best": len(recs) / min(s), "signal_seconds": signal_seconds[mode],
                      "mean_generated_tokens": statistics.fmean(gen_tokens)}
    single = runs["one_at_a_time_subset"]
    # Same samples, batched vs one at a time: the loss signal must agree; near-greedy (T = 0.01) answers are
    # sampled with a per-batch seed, so they may differ in rare near-ties.
    a, b1 = outputs["batched_subset"], outputs["one_at_a_time_subset"]
    loss_diff = max(abs(x.loss - y.loss) for x, y in zip(a, b1))
    same_text = sum(x.generation == y.generation for x, y in zip(a, b1)) / len(a)
    prompt_tokens = [s.prompt_length for s in data]
    response_tokens = [len(s.input_ids) - s.prompt_length for s in data]
    return {
        "model": {"what": "the built-in default's initial student (student-base/final)", "path": str(student_dir),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": f"{train_file} ({len(records)} records); subset: {len(subset)} records evenly spread over the "
                "length-sorted set",
        "settings": {"rank_batch_size": bs, "rank_max_new_tokens": cc.rank_max_new_tokens,
                     "rank_temperature": cc.rank_temperature, "rank_no_repeat_ngram_size": cc.rank_no_repeat_ngram_size,
                     "max_length": dc.max_length, "max_prompt_length": dc.max_prompt_length,
                     "signals": ["loss", "rouge_l"], "repeats": args.repeats, "full_repeats": args.full_repeats,
                     "mean_prompt_tokens": statistics.fmean(prompt_tokens),
                     "mean_response_tokens": statistics.fmean(response_tokens)},
        "runs": runs,
        "speedup_same_subset_median": runs["batched_subset"]["samples_per_s_median"] / single["samples_per_s_median"],
        "speedup_same_subset_best": runs["batched_subset"]["samples_per_s_best"] / single["samples_per_s_best"],
        "speedup_full_set_vs_single_median": runs["batched_all"]["samples_per_s_median"] / single["samples_per_s_median"],
        "agreement_batched_vs_single": {"max_abs_loss_difference": loss_diff,
                                        "fraction_identical_generations": same_text},
        "load_average": {"before": load_before, "after": C.load()},
    }


def write_markdown(result: dict, path: Path) -> None:
    sp, sh = result["speed"], result["share"]
    lines = [C.header_md("Ranking pass: batched vs one at a time, share of a POCL run", result)]
    lines += ["## Measurer speed (loss + ROUGE-L signals)", "",
              "| mode | samples | batch | seconds (median / min) | samples/s (median) |", "|---|---|---|---|---|"]
    for mode, r in sp["runs"].items():
        lines.append(f"| {mode} | {r['samples']} | {r['batch_size']} | {r['seconds']['median']:.2f} / "
                     f"{r['seconds']['min']:.2f} | {r['samples_per_s_median']:.2f} |")
    lines += ["", f"Speed-up, same subset, batched over one at a time: x{sp['speedup_same_subset_median']:.2f} "
              f"(median), x{sp['speedup_same_subset_best']:.2f} (best); whole training set batched over one at a "
              f"time: x{sp['speedup_full_set_vs_single_median']:.2f} (target >= 5x).", "",
              f"Agreement on the subset: max |loss difference| {sp['agreement_batched_vs_single']['max_abs_loss_difference']:.2e}, "
              f"identical generations {sp['agreement_batched_vs_single']['fraction_identical_generations']:.3f}.", "",
              "## Share of the built-in POCL run", "",
              f"- ranking {sh['pocl_ranking_seconds']:.1f} s, training {sh['pocl_training_seconds']:.1f} s, whole POCL "
              f"distill call {sh['pocl_seconds']:.1f} s",
              f"- ranking / (ranking + training) = {100 * sh['ranking_over_ranking_plus_training']:.1f} %; ranking / "
              f"whole POCL call = {100 * sh['ranking_over_pocl_run']:.1f} % (target <= 10 %)",
              f"- training passes over the data: {sh['training_passes_over_the_data']:.2f}", "",
              "## Paper setting (arithmetic)", ""]
    pe = result["paper_estimate"]
    if "builtin_flops" in pe:
        bf = pe["builtin_flops"]
        lines.append(f"Built-in run: ranking is {100 * bf['flop_share']:.2f} % of the FLOPs but took "
                     f"{100 * sh['ranking_over_ranking_plus_training']:.1f} % of the time: per FLOP the measurer "
                     f"is x{bf['seconds_per_flop_ratio_ranking_over_training']:.1f} slower than training here.")
        lines.append("")
    lines += ["| teacher -> student | teacher in training | FLOP share | share with the built-in seconds-per-FLOP "
              "ratio | ratio at which the share reaches 10 % |", "|---|---|---|---|---|"]
    for name, row in pe["cases"].items():
        for teacher in ("live", "cached"):
            sub = row.get(f"{teacher}_teacher", row if teacher == "live" else None)
            if sub is None:
                continue
            lines.append(f"| {name} | {teacher} | {100 * sub['flop_share']:.2f} % | "
                         f"{100 * sub.get('share_with_builtin_seconds_per_flop_ratio', float('nan')):.1f} % | "
                         f"x{sub['seconds_per_flop_ratio_for_10pct']:.1f} |")
    lines += ["", f"Assumptions: {json.dumps(pe['assumptions'])}", ""]
    C.write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="default: benchmarks/results/ranking_speed.json (a --quick run: /tmp)")
    p.add_argument("--scratch", default="/tmp/pocl-bench-ranking", help="folder in which `pocl distill` runs")
    p.add_argument("--reuse", default=None, help="folder holding runs/default/results.json of a finished run")
    p.add_argument("--single-samples", type=int, default=240, help="records measured one at a time")
    p.add_argument("--max-samples", type=int, default=None, help="limit the training records (smoke runs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--full-repeats", type=int, default=2, help="repeats of the batched pass over the whole set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--estimate-only", action="store_true",
                   help="recompute paper_estimate and the Markdown from an existing --output JSON (no measuring)")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / f"{DEFAULT_OUT.stem}_quick.json") if args.quick \
            else str(DEFAULT_OUT)
    if args.estimate_only:
        out = Path(args.output)
        result = json.loads(out.read_text(encoding="utf-8"))
        measured = result.get("paper_estimate", {}).get("measured_inputs")
        if not measured or "teacher_cache" not in measured:  # older results: read the run again
            measured = measured_inputs(result)
        result["paper_estimate"] = dict(paper_estimate(measured), measured_inputs=measured, doc=paper_estimate.__doc__)
        C.write_json(out, result)
        write_markdown(result, out.with_suffix(".md"))
        print(json.dumps(result["paper_estimate"]["cases"], indent=1))
        return 0
    if args.quick:
        args.single_samples, args.max_samples, args.repeats, args.full_repeats = 16, 128, 1, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {"benchmark": "ranking_speed", "created": C.now(),
              "command": "python benchmarks/ranking_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()}}
    base = Path(args.reuse) if args.reuse else Path(args.scratch)
    run_dir = base / "runs" / "default"
    if args.reuse:
        log = base / "pocl_distill.log"
        result["builtin_run"] = {"reused": str(run_dir),
                                 "log": str(log) if log.is_file() else None,
                                 "note": "produced earlier by `python benchmarks/ranking_speed.py --scratch "
                                         f"{base}` (same command without --reuse) when the log is present"}
    else:
        result["builtin_run"] = run_builtin(base, args.threads)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    if results.get("status") != "completed":
        raise SystemExit(f"{run_dir / 'results.json'}: status {results.get('status')!r}, not completed")
    result["builtin_run"]["results_file"] = str(run_dir / "results.json")
    result["builtin_run"]["timings"] = results["timings"]
    result["share"] = run_share(results)
    result["speed"] = measure_speed(run_dir, args)
    measured = measured_inputs(result)
    result["paper_estimate"] = dict(paper_estimate(measured), measured_inputs=measured, doc=paper_estimate.__doc__)
    result["targets"] = {
        "measurer_speedup_ge_5x": result["speed"]["speedup_same_subset_median"] >= 5,
        "ranking_share_le_10pct_of_ranking_plus_training": result["share"]["ranking_over_ranking_plus_training"] <= 0.10,
        "ranking_share_le_10pct_of_whole_pocl_call": result["share"]["ranking_over_pocl_run"] <= 0.10}
    result["load_average"]["after"] = C.load()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output)
    C.write_json(out, result)
    write_markdown(result, out.with_suffix(".md"))
    print(json.dumps({"speed": {k: v for k, v in result["speed"].items() if k.startswith("speedup")},
                      "share": result["share"]["ranking_over_ranking_plus_training"],
                      "targets": result["targets"]}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
