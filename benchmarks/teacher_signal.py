"""Benchmark: the teacher signals on a real model pair: live, the exact hidden-state cache (the default),
the hidden cache in float16, and the top-k cache (an approximation).

Two parts, one process, on SmolLM2-135M-Instruct (teacher) -> a 10-layer student made from it by
``pocl init-student``, on the first ``--samples`` rows of Dolly's training split:

1. **Error against the live teacher.** For each cache and each divergence (FKL, RKL, JSD, SRKL), the
   trainer's own check (``DistillTrainer._measure_signal_error``: the initial student, the first 16
   training samples, every POCL stage temperature 1, 1.33, 1.67, 2) gives the relative error of the
   divergence and, for top-k, the teacher's probability outside the cached tokens. Also the cache's
   build time and bytes per token.
2. **A short POCL run per signal** (four Baby Step stages over the file order, one epoch each, T 1 -> 2,
   alpha 0.7 -> 1): the mean training loss, divergence and CE of every stage, the training wall time
   (the cache pass excluded, reported apart) and seconds per step.

    python benchmarks/teacher_signal.py --teacher runs/smol-teacher --student runs/smol-10l \\
        --train-file ../shared/data/dolly/train.jsonl            # writes benchmarks/results/teacher_signal.json
    python benchmarks/teacher_signal.py --table benchmarks/results/teacher_signal.json   # its tables

``runs/smol-teacher`` is the GGUF teacher saved as a normal folder (``pocl init-student --teacher
$G --num-layers 30 --output-dir runs/smol-teacher``: all 30 layers) so that it is dequantised once;
``runs/smol-10l`` is ``pocl init-student --teacher $G --num-layers 10`` (docs/experiments.md). The
run order of part 2 is interleaved by repetition (``--repeats``) so that machine load affects every
signal alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from pocl.config import DistillConfig  # noqa: E402
from pocl.curriculum.schedule import baby_step_stages  # noqa: E402
from pocl.pipeline import prepare_run  # noqa: E402
from pocl.training.metrics import read_metrics  # noqa: E402
from pocl.training.trainer import DistillTrainer  # noqa: E402

#: name -> loss settings of each signal.
SIGNALS = {
    "live": {"teacher_cache": "off"},
    "hidden": {"teacher_cache": "hidden", "teacher_cache_dtype": "float32"},
    "hidden-fp16": {"teacher_cache": "hidden", "teacher_cache_dtype": "float16",
                    "accept_approximation": "half-precision-cache"},
    "topk-64": {"teacher_cache": "topk", "teacher_cache_topk": 64, "accept_approximation": "topk-cache"},
    "topk-256": {"teacher_cache": "topk", "teacher_cache_topk": 256, "accept_approximation": "topk-cache"},
}


def _config(args, out: Path, loss: dict) -> DistillConfig:
    return DistillConfig.from_dict({
        "model": {"teacher": args.teacher, "student": args.student},
        "data": {"train_file": args.train_file, "max_train_samples": args.samples, "max_length": args.max_length,
                 "max_prompt_length": args.max_length // 2},
        "loss": {"divergence": "srkl", **loss, "teacher_cache_dir": str(out / "cache" / loss.get("teacher_cache", "")
                                                                         / loss.get("teacher_cache_dtype", "")
                                                                         / str(loss.get("teacher_cache_topk", "")))},
        "optim": {"lr": args.lr},
        "train": {"output_dir": str(out), "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                  "epochs": 1, "seed": 10, "progress": False, "tensorboard": False, "log_every": 1,
                  "overwrite": True},
        "curriculum": {"stage_epochs": 1},
    })


def _stages(cfg: DistillConfig, inputs):
    return baby_step_stages(inputs.train_data.ids, cfg.curriculum, base_skew=cfg.loss.skew)


def _trainer(cfg, inputs, stages) -> DistillTrainer:
    return DistillTrainer(config=cfg, student=inputs.student, tokenizer=inputs.tokenizer, teacher=inputs.teacher,
                          train_data=inputs.train_data, dev_data=None, stages=stages, vocab_size=inputs.vocab_size,
                          fused=inputs.fused, fingerprints=inputs.fingerprints)


def measure_errors(args, work: Path) -> dict:
    """Part 1: every cache against the live teacher, per divergence and temperature, with the initial student."""
    cfg0 = _config(args, work / "errors", {})
    inputs = prepare_run(cfg0)
    stages = _stages(cfg0, inputs)
    out = {}
    for name, loss in SIGNALS.items():
        if name == "live":
            continue
        rows = {}
        build = None
        for divergence in ("fkl", "rkl", "jsd", "srkl"):
            cfg = _config(args, work / "errors" / name, dict(loss, divergence=divergence))
            trainer = _trainer(cfg, inputs, stages)
            trainer.prepare_teacher_cache()
            info = trainer.summary_extra["teacher_cache"]
            if build is None:
                build = {k: info["train"][k] for k in ("action", "seconds", "tokens", "bytes", "bytes_per_token")}
            errors = trainer._measure_signal_error(trainer.train_signal)
            rows[divergence] = [e.to_dict() for e in errors]
            print(f"{name:12s} {divergence:5s} " + "  ".join(
                f"T={e.temperature:.2f}: {100 * e.relative_error:+8.3f} %" for e in errors), flush=True)
        out[name] = {"build": build, "errors": rows}
    return out


def train_one(args, work: Path, name: str, repeat: int) -> dict:
    """Part 2: one short POCL run with this signal; per-stage losses and timings."""
    out = work / "runs" / f"{name}-r{repeat}"
    cfg = _config(args, out, SIGNALS[name])
    inputs = prepare_run(cfg)
    trainer = _trainer(cfg, inputs, _stages(cfg, inputs))
    t0 = time.perf_counter()
    trainer.prepare_teacher_cache()
    cache_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = trainer.train()  # its prepare_teacher_cache() finds the cache complete and reuses it
    train_seconds = time.perf_counter() - t1
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    stages = []
    for s in result.summary["stages"]:
        mine = [r for r in records if r["stage"] == s["name"]]
        stages.append({"stage": s["name"], "temperature": s["temperature"], "alpha": s["alpha"],
                       "samples": s["num_samples"], "steps": s["steps"],
                       **{key: statistics.fmean(r[key] for r in mine) for key in ("loss", "kd", "ce")}})
    steps = result.summary["global_steps"]
    row = {"signal": name, "repeat": repeat, "cache_seconds": cache_seconds, "train_seconds": train_seconds,
           "seconds_per_step": train_seconds / max(steps, 1), "steps": steps, "stages": stages,
           "teacher_cache": result.summary.get("teacher_cache")}
    print(f"{name:12s} r{repeat}: cache {cache_seconds:6.1f} s, training {train_seconds:6.1f} s "
          f"({row['seconds_per_step']:.2f} s/step); kd per stage " +
          " ".join(f"{s['kd']:.4f}" for s in stages), flush=True)
    return row


def tables(result: dict) -> str:
    """Markdown tables of a result file (what benchmarks/README.md shows)."""
    lines = []
    errors = result.get("errors_vs_live") or {}
    if errors:
        temps = [e["temperature"] for e in next(iter(next(iter(errors.values()))["errors"].values()))]
        lines += ["| cache | bytes / token | build s | divergence | " + " | ".join(f"T = {t:.3g}" for t in temps) + " |",
                  "|---|---|---|---|" + "---|" * len(temps)]
        for name, entry in errors.items():
            b = entry["build"]
            for i, (div, rows) in enumerate(entry["errors"].items()):
                head = f"| {name} | {b['bytes_per_token']:.0f} | {b['seconds']:.1f} |" if i == 0 else "| | | |"
                cells = [f"{100 * r['relative_error']:+.2g} %" if abs(r["relative_error"]) >= 1e-4
                         else f"{r['relative_error']:+.1e}" for r in rows]
                lines.append(f"{head} {div} | " + " | ".join(cells) + " |")
            masses = [r["tail_mass"] for r in next(iter(entry["errors"].values()))]
            if masses[0] is not None:
                lines.append("| | | | teacher mass outside | " + " | ".join(f"{100 * m:.1f} %" for m in masses) + " |")
        lines.append("")
    runs = result.get("runs") or []
    if runs:
        stages = [s["stage"] for s in runs[0]["stages"]]
        lines += ["| signal | cache pass s | training s | s / step | " + " | ".join(
                      f"{s} (T {r['temperature']:.3g}, α {r['alpha']:.2g}) loss / kd" for s, r in
                      zip(stages, runs[0]["stages"])) + " |",
                  "|---|---|---|---|" + "---|" * len(stages)]
        for r in runs:
            lines.append(f"| {r['signal']} (r{r['repeat']}) | {r['cache_seconds']:.1f} | {r['train_seconds']:.1f} | "
                         f"{r['seconds_per_step']:.2f} | " + " | ".join(f"{s['loss']:.4f} / {s['kd']:.4f}"
                                                                    for s in r["stages"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/smol-teacher")
    p.add_argument("--student", default="runs/smol-10l")
    p.add_argument("--train-file", default=str(_common.ROOT.parent / "shared/data/dolly/train.jsonl"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--signals", nargs="+", default=["live", "hidden", "topk-64"], choices=list(SIGNALS))
    p.add_argument("--work-dir", type=Path, default=_common.ROOT / "runs/bench-teacher-signal")
    p.add_argument("--output", type=Path, default=_common.RESULTS / "teacher_signal.json")
    p.add_argument("--skip-errors", action="store_true",
                   help="only part 2; part 1 is kept from --output when it exists (its date and commit recorded)")
    p.add_argument("--table", type=Path, metavar="RESULT_JSON", help="print the Markdown tables of a result file")
    args = p.parse_args(argv)
    if args.table:
        print(tables(json.loads(args.table.read_text(encoding="utf-8"))))
        return 0
    for path in (args.teacher, args.student, args.train_file):
        if not Path(path).exists():
            raise SystemExit(f"{path} does not exist (see the module docstring for how to make the models)")
    logging.basicConfig(level=logging.WARNING)
    started = _common.now()
    t0 = time.perf_counter()
    errors, errors_from = {}, None
    if args.skip_errors and args.output.is_file():  # keep part 1 of the previous result file
        previous = json.loads(args.output.read_text(encoding="utf-8"))
        errors, errors_from = previous.get("errors_vs_live") or {}, previous.get("errors_from") or {
            "created": previous.get("created"), "git": previous.get("git")}
    elif not args.skip_errors:
        errors = measure_errors(args, args.work_dir)
    runs = [train_one(args, args.work_dir, name, r) for r in range(args.repeats) for name in args.signals]
    result = {"benchmark": "teacher_signal", "created": started, "seconds": time.perf_counter() - t0,
              "machine": _common.machine(), "git": _common.git_state(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "errors_vs_live": errors, "errors_from": errors_from, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(tables(result))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
