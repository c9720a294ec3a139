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


def main(argv=None) -> int:
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
