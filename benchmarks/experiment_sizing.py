"""Sizing the real experiment matrix: how long one distillation step, one ranking pass and one evaluation
take on this machine for a teacher -> student pair on Dolly (short runs only, a few minutes).

    python benchmarks/experiment_sizing.py --teacher runs/smollm2/teacher --student runs/smollm2/student-10l \
        --data ../shared/data --output benchmarks/results/experiment_sizing.json

Measures, with pocl's own code paths (``pocl.pipeline.distill``, ``pocl.evaluation.evaluate_records``):

1. tokenised lengths of the Dolly training set (how many samples each ``max_length`` cuts);
2. seconds per optimizer step of plain KD (FKL) for each ``--max-length`` at ``--batch-size``
   (the trainer's own train_seconds over ``--steps`` steps, one epoch over batch x steps samples);
3. seconds to generate answers for ``--eval-samples`` DollyEval prompts with the student and with the
   teacher (sampling at T = 1, the evaluation protocol; ``--max-new-tokens``), with their ROUGE-L
   (the teacher's score tells whether it is a usable teacher as it is);
4. the ranking pass per sample (near-greedy generation + loss) is the student's generation time
   per prompt plus a forward pass: reported from 3;
5. with ``--layer-ce N ...``: the dev cross-entropy of the teacher, of untrained N-layer subsets of it
   and of ``--ce-models`` (is the layer subset a working LM before any training?).

``python benchmarks/experiment_sizing.py power ...`` sizes the evidence matrix for statistical power
instead (no model is run; issue 18): from a pilot pair of evaluated runs that differ only by the training
seed (the noise floor of a POCL - KD comparison), it estimates the variance components of a paired
difference per set (:mod:`pocl.experiments.intervals`), takes the seed-to-seed spread of the paired
differences from an earlier matrix's results.json, and prints the expected 95 % bootstrap half-width on
the average over sets, and the hours on this machine, for a grid of (prompts per set, sampling seeds,
training seeds, training samples); see ``power_main``.

The machine may be shared: the load average before and after, and each measurement's CPU share (process
CPU seconds / wall seconds; 2.0 = both cores of a 2-core machine to itself) are recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _load() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return []


def step_times(teacher: str, student: str, train_file: str, *, max_length: int, batch_size: int, micro: int,
               steps: int) -> dict:
    """Per-step seconds of plain KD (FKL), timed by a step callback of pocl's trainer (the pipeline of
    ``pocl distill``: prepare_run, kd_stages, DistillTrainer)."""
    from pocl.config import DistillConfig
    from pocl.launch import make_accelerator
    from pocl.pipeline import kd_stages, prepare_run
    from pocl.training.trainer import DistillTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DistillConfig.from_dict({
            "model": {"teacher": teacher, "student": student},
            "data": {"train_file": train_file, "max_length": max_length, "max_prompt_length": min(256, max_length // 2),
                     "max_train_samples": batch_size * steps},
            "loss": {"divergence": "fkl"},
            "train": {"output_dir": tmp, "batch_size": batch_size, "micro_batch_size": micro, "max_steps": steps,
                      "epochs": 1, "log_every": 1, "progress": False, "tensorboard": False, "save_every": 10_000},
        })
        accelerator = make_accelerator(cfg)
        inputs = prepare_run(cfg)
        trainer = DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                                 train_data=inputs.train_data, dev_data=None, stages=kd_stages(cfg),
                                 vocab_size=inputs.vocab_size, fused=inputs.fused, fingerprints=inputs.fingerprints,
                                 accelerator=accelerator)
        marks: list[tuple[float, float]] = []
        trainer.step_callbacks.append(lambda _t: marks.append((time.perf_counter(), time.process_time())))
        t0, c0 = time.perf_counter(), time.process_time()
        marks.append((t0, c0))
        result = trainer.train()
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    tokens = [sum(len(s.input_ids) for s in inputs.train_data.samples[i * batch_size:(i + 1) * batch_size])
              for i in range(steps)]
    return {"max_length": max_length, "batch_size": batch_size, "micro_batch_size": micro, "steps": len(wall),
            "step_seconds": wall, "step_cpu_seconds": cpu, "min_seconds_per_step": min(wall),
            "median_seconds_per_step": statistics.median(wall),
            "seconds_per_sample_min": min(wall) / batch_size, "seconds_per_sample_median": statistics.median(wall) / batch_size,
            "tokens_per_sample_mean": statistics.mean(tokens) / batch_size, "train_seconds": result.summary["train_seconds"],
            "cpu_share": sum(cpu) / sum(wall)}


def eval_times(model_path: str, eval_file: str, *, n: int, max_new_tokens: int, batch_size: int, seed: int,
               repeats: int = 1) -> dict:
    from pocl.evaluation import evaluate_records, load_eval_set
    from pocl.generation import DecodingConfig
    from pocl.models import load_model, load_tokenizer

    tok = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    records = load_eval_set(eval_file, max_samples=n).records
    walls, cpus = [], []
    for _ in range(repeats):  # the same generations every time (same seed); the minimum is the least disturbed
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate_records(model, tok, records, decoding=DecodingConfig(max_new_tokens=max_new_tokens),
                               seeds=[seed], batch_size=batch_size)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    seconds, cpu = min(walls), cpus[walls.index(min(walls))]
    s = res.summary()
    return {"model": model_path, "n": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "seconds": seconds, "seconds_all_repeats": walls, "seconds_per_prompt": seconds / n, "cpu_seconds": cpu, "cpu_share": cpu / seconds, "rouge_l": res.rouge_l,
            "generated_tokens_mean": s["generated_tokens_mean"], "stopped_at_eos_fraction": s["stopped_at_eos_fraction"]}


def layer_subset_ce(teacher_path: str, dev_file: str, counts: list[int], *, n: int = 16, offset: int = 600,
                    extra: list[str] = ()) -> dict:
    """Reference cross-entropy (nats per response token, teacher forcing) on ``n`` Dolly dev rows of the
    teacher, of ``pocl.student_init`` layer subsets of it (N layers spread evenly, untrained) and of the
    models in ``extra`` (e.g. a healed student): is the layer subset a working LM before training?"""
    import torch

    from pocl.data import get_template, load_records, tokenize_records
    from pocl.models import load_model, load_tokenizer
    from pocl.student_init import select_layers, shrink_model

    tok = load_tokenizer(teacher_path)
    records = load_records(dev_file).records[offset:offset + n]
    data = tokenize_records(records, tok, get_template("alpaca"), max_length=256, max_prompt_length=128)

    def ce(model) -> float:
        total = count = 0.0
        with torch.no_grad():
            for smp in data.samples:
                labels = torch.tensor([smp.labels])
                loss = model(input_ids=torch.tensor([smp.input_ids]), labels=labels).loss
                k = int((labels[:, 1:] != -100).sum())
                total, count = total + float(loss) * k, count + k
        return total / count

    teacher = load_model(teacher_path).eval()
    layers = teacher.config.num_hidden_layers
    out = {"rows": f"{dev_file} rows {offset}-{offset + n - 1}", "teacher": ce(teacher)}
    for c in counts:
        student, _ = shrink_model(teacher, select_layers(layers, num_kept=c))
        out[f"{c} of {layers} layers, untrained"] = ce(student)
    for path in extra:
        out[path] = ce(load_model(path).eval())
    return out


def length_stats(tokenizer_path: str, train_file: str, limits: list[int]) -> dict:
    from pocl.data import get_template, load_records, tokenize_records
    from pocl.models import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    records = load_records(train_file).records
    data = tokenize_records(records, tok, get_template("alpaca"), max_length=100_000, max_prompt_length=99_999)
    lengths = sorted(len(s.input_ids) for s in data.samples)
    n = len(lengths)
    return {"n": n, "mean": statistics.mean(lengths), "median": lengths[n // 2], "p90": lengths[int(0.9 * n)],
            "fraction_longer_than": {str(m): sum(1 for x in lengths if x > m) / n for m in limits}}


def _save(out: dict, path: str) -> None:
    out["load_now"] = _load()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ power
def _pilot_components(pilot: list[str], metric: str = "rouge_l") -> tuple[dict, dict]:
    """The variance components per set of the difference between the two pilot evaluations
    (``EVAL_DIR:MODEL`` each), and the measured generation cost (seconds per generated answer)."""
    from pocl.experiments.intervals import (
        load_prompt_scores,
        paired_differences_by_prompt,
        variance_components,
    )

    (dir_a, model_a), (dir_b, model_b) = (x.rsplit(":", 1) for x in pilot)
    a, b = load_prompt_scores(dir_a, model_a, metric), load_prompt_scores(dir_b, model_b, metric)
    sets = sorted(a)
    cubes = paired_differences_by_prompt([(a, b)], sets)
    comps = {name: variance_components(cube) for name, cube in cubes.items()}
    cost = []
    for d, m in ((dir_a, model_a), (dir_b, model_b)):
        res = json.loads((Path(d) / "results.json").read_text())["models"][m]
        gens = sum(v["n"] * len(v["rouge_l"]["seeds"]) for v in res["sets"].values())
        cost.append(sum(v["seconds"]["total"] for v in res["sets"].values()) / gens)
    shape = {name: list(cube.shape) for name, cube in cubes.items()}
    return comps, {"seconds_per_generation": statistics.mean(cost), "per_model": cost, "shape": shape}


def _previous_seed_variance(results_json: str) -> dict:
    """The seed-to-seed variance of the per-seed Avg POCL - KD differences in an earlier matrix (pooled over
    its divergences): an upper bound of var(b), since each per-seed difference also carries that matrix's
    evaluation noise."""
    from pocl.experiments.results import paired_differences

    data = json.loads(Path(results_json).read_text())
    sets = list(data["table"]["sets"])
    rows = paired_differences(data["runs"], sets)
    ss, dof = 0.0, 0
    for r in rows:
        vals = r["cols"]["Avg"]["per_seed"]
        m = statistics.mean(vals)
        ss += sum((v - m) ** 2 for v in vals)
        dof += len(vals) - 1
    return {"variance": ss / dof, "dof": dof, "per_divergence_std": {r["divergence"]: r["cols"]["Avg"]["std"]
                                                                     for r in rows}}


def power_main(argv: list[str]) -> int:
    """The power sizing (see the module docstring): ``power --pilot DIR:MODEL DIR:MODEL --previous
    RESULTS_JSON --run-seconds S --train-seconds-per-sample C ...``; writes ``--output`` and prints the grid."""
    import dataclasses

    from pocl.experiments.intervals import predicted_half_width

    p = argparse.ArgumentParser(prog="experiment_sizing.py power", description=power_main.__doc__)
    p.add_argument("--pilot", nargs=2, required=True, metavar="EVAL_DIR:MODEL",
                   help="Two pocl eval outputs of runs that differ only by the training seed.")
    p.add_argument("--previous", required=True, help="An earlier matrix's results.json (seed-to-seed spread).")
    p.add_argument("--train-seconds-per-sample", type=float, required=True,
                   help="Measured seconds per sample pass of one training run (its train_seconds / samples trained).")
    p.add_argument("--run-overhead-seconds", type=float, required=True,
                   help="Measured seconds of one pocl distill call outside its training loop (start, loading, cache, save).")
    p.add_argument("--teacher-eval-factor", type=float, default=3.0,
                   help="The teacher's generation cost over the student's (assumed: 30 vs 10 layers).")
    p.add_argument("--train-runs", type=int, default=29)
    p.add_argument("--eval-models", type=int, default=31, help="Evaluated models, the teacher included.")
    p.add_argument("--prompts", type=int, nargs="+", default=[30, 40, 60, 80])
    p.add_argument("--sampling-seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--training-seeds", type=int, nargs="+", default=[3, 5])
    p.add_argument("--train-samples", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--passes", type=float, default=2.5)
    p.add_argument("--cores", type=int, default=2, help="Processes run side by side (one torch thread each).")
    p.add_argument("--target", type=float, default=1.0, help="Wanted half-width on the Avg (ROUGE-L points).")
    p.add_argument("--output", default="benchmarks/results/experiment_power.json")
    args = p.parse_args(argv)
    comps, cost = _pilot_components(args.pilot)
    prev = _previous_seed_variance(args.previous)
    out: dict = {"benchmark": "experiment_power", "argv": ["power", *argv], "created": time.strftime("%Y-%m-%d"),
                 "pilot": {"components": {k: dataclasses.asdict(v) for k, v in comps.items()}, **cost},
                 "previous_seed_variance": prev, "target_half_width": args.target, "grid": []}
    print("variance components of the pilot difference per set (ROUGE-L points^2):")
    for k, v in comps.items():
        print(f"  {k}: prompt {v.prompt:.1f} (interaction inside it: one pair), sampling {v.sampling:.1f}")
    print(f"seed variance from {args.previous}: {prev['variance']:.3f} (dof {prev['dof']}; an upper bound)")
    print(f"generation: {cost['seconds_per_generation']:.3f} s per answer")
    # The pilot's prompt term holds the seed x prompt interaction of a null pair. Two readings bound the
    # truth: 'noise' puts it all into the interaction (averages over training seeds: the null hypothesis),
    # 'systematic' into the prompt term (a method x prompt effect that more seeds cannot average).
    readings = {
        "noise": [dataclasses.replace(c, prompt=0.0, interaction=c.prompt, seed=prev["variance"]) for c in comps.values()],
        "systematic": [dataclasses.replace(c, interaction=0.0, seed=prev["variance"]) for c in comps.values()],
    }
    print("\nhalf-width: of the bootstrap interval (what results.md reports) and of z x the standard error, each "
          "under the 'noise' / 'systematic' reading; ok: both at most the target; hours on --cores processes")
    print(f"{'prompts':>7} {'S':>2} {'R':>2} | bootstrap hw    | std-error hw  | eval h | "
          + " | ".join(f"N={n} total h" for n in args.train_samples))
    for r in args.training_seeds:
        for prompts in args.prompts:
            for s in args.sampling_seeds:
                hw = {k: predicted_half_width(v, prompts=prompts, sampling_seeds=s, training_seeds=r)
                      for k, v in readings.items()}
                true_hw = {k: predicted_half_width(v, prompts=prompts, sampling_seeds=s, training_seeds=r,
                                                   bootstrap=False) for k, v in readings.items()}
                gens = prompts * len(comps) * s
                eval_s = gens * cost["seconds_per_generation"] * (args.eval_models - 1 + args.teacher_eval_factor)
                runs = args.train_runs * r / 3  # the matrix's runs scale with its training seeds
                totals = {n: (eval_s + runs * (args.run_overhead_seconds
                                               + n * args.passes * args.train_seconds_per_sample)) / 3600 / args.cores
                          for n in args.train_samples}
                out["grid"].append({"prompts_per_set": prompts, "sampling_seeds": s, "training_seeds": r,
                                    "half_width": hw, "half_width_standard_error": true_hw,
                                    "eval_hours_2_cores": eval_s / 3600 / args.cores,
                                    "total_hours_by_train_samples": totals})
                print(f"{prompts:>7} {s:>2} {r:>2} | {hw['noise']:>5.2f} / {hw['systematic']:<5.2f}"
                      f"{' ok' if max(hw['systematic'], true_hw['systematic']) <= args.target else '   '} | "
                      f"{true_hw['noise']:>5.2f} / {true_hw['systematic']:<5.2f} | "
                      f"{eval_s / 3600 / args.cores:6.2f} | " + " | ".join(f"{totals[n]:12.2f}" for n in args.train_samples))
    _save(out, args.output)
    print("written:", args.output)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["power"]:
        return power_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", default="../shared/data", help="The shared data folder (dolly/, eval/).")
    p.add_argument("--max-length", type=int, nargs="+", default=[256])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[128])
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--layer-ce", type=int, nargs="*", default=None, metavar="N",
                   help="Also measure the dev cross-entropy of the teacher, of N-layer subsets of it and of --ce-models.")
    p.add_argument("--ce-models", nargs="*", default=[], metavar="PATH", help="Extra models for --layer-ce.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 avoids OpenMP spin-waits on a shared machine).")
    p.add_argument("--repeats", type=int, default=1, help="Repeats of each evaluation (the minimum is reported).")
    p.add_argument("--skip", nargs="*", default=[], choices=["lengths", "steps", "eval", "teacher_eval"])
    p.add_argument("--output", default="benchmarks/results/experiment_sizing.json")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    train_file, eval_file = str(data / "dolly" / "train.jsonl"), str(data / "eval" / "dolly.jsonl")
    out: dict = {"argv": sys.argv[1:], "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "load_before": _load()}
    if "lengths" not in args.skip:
        out["lengths"] = length_stats(args.student, train_file, [128, 192, 256, 384, 512])
        print("lengths:", json.dumps(out["lengths"]), flush=True)
    if "steps" not in args.skip:
        out["steps"] = []
        for m in args.max_length:
            r = step_times(args.teacher, args.student, train_file, max_length=m, batch_size=args.batch_size,
                           micro=args.micro_batch_size, steps=args.steps)
            print(f"max_length {m}, batch {args.batch_size}: step seconds {[round(x, 1) for x in r['step_seconds']]}, "
                  f"CPU seconds {[round(x, 1) for x in r['step_cpu_seconds']]} (min {r['seconds_per_sample_min']:.3f}, "
                  f"median {r['seconds_per_sample_median']:.3f} s/sample; {r['tokens_per_sample_mean']:.0f} tokens per "
                  f"sample; CPU share {r['cpu_share']:.2f})", flush=True)
            _save(out, args.output)
            out["steps"].append(r)
    for who, path in (("eval", args.student), ("teacher_eval", args.teacher)):
        if who in args.skip:
            continue
        out[who] = []
        for mnt in args.max_new_tokens:
            r = eval_times(path, eval_file, n=args.eval_samples, max_new_tokens=mnt, batch_size=args.eval_batch_size,
                           seed=10, repeats=args.repeats)
            print(f"{who} {mnt} new tokens: {r['seconds']:.1f} s for {r['n']} prompts "
                  f"({r['seconds_per_prompt']:.2f} s/prompt, CPU share {r['cpu_share']:.2f}), ROUGE-L {r['rouge_l']:.2f}, "
                  f"CPU s {r['cpu_seconds']:.0f}, {r['generated_tokens_mean']:.0f} tokens/answer, EOS {r['stopped_at_eos_fraction']:.2f}", flush=True)
            out[who].append(r)
            _save(out, args.output)
    if args.layer_ce is not None:
        out["layer_subset_ce"] = layer_subset_ce(args.teacher, str(data / "dolly" / "dev.jsonl"), args.layer_ce,
                                                 extra=args.ce_models)
        print("cross-entropy:", json.dumps(out["layer_subset_ce"]), flush=True)
    out["load_after"] = _load()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("written:", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
