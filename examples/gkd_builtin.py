"""GKD with and without POCL on the built-in suite, at the same sample budget (a tiny-scale check of
the spec's "GKD / +POCL" row).

Reuses what ``pocl distill`` (the built-in default) trained: the teacher ``BASE/teacher/final``, the
student base ``BASE/student-base/final`` and the data ``BASE/data/`` (BASE = runs/default); nothing
there is written. Runs, in ``OUT`` (runs/gkd-compare):

* ``gkd``: the GKD baseline of the spec -- on-policy steps with probability 0.5 (the student samples
  at T = 1, top-p 1; at most ``--max-new-tokens`` tokens), JSD(0.9) in the POCL/DistiLLM convention,
  alpha = 1, a replay buffer of 1000 student samples -- for ``--epochs`` epochs over all the data;
* ``gkd-pocl``: the same objective inside the POCL curriculum (ranking by the student base, 4 Baby Step
  stages, T 1 -> 2 and alpha 0.7 -> 1.0 as in POCL, lambda_on 0.5 in every stage) with
  ``--epochs * 2 / 5`` epochs per stage: the same number of samples (4 epochs <-> 1.6 per stage);
* with ``--with-kd``: the same two runs without on-policy steps (plain JSD KD, KD + POCL) for context.

Each model is evaluated on the test split like the built-in default does (``evaluate_records``:
sampling at T = 1 over seeds 10..50, mean and std; and greedy), and everything is written to
``OUT/results.json``. Re-running reuses finished runs (and resumes interrupted ones).

    python examples/gkd_builtin.py [--base runs/default] [--out runs/gkd-compare] [--epochs 4] [--with-kd]

Without the trained models in BASE, ``--build-base`` trains the same teacher and student base into
``OUT/base`` first (the built-in default's own code, settings and seeds; BASE is never written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path


def _base_paths(base: Path) -> dict[str, Path]:
    return {"teacher": base / "teacher" / "final", "student": base / "student-base" / "final",
            "train": base / "data" / "train.jsonl", "dev": base / "data" / "dev.jsonl",
            "test": base / "data" / "test.jsonl"}


def _missing(base: Path) -> list[str]:
    return [str(p) for p in _base_paths(base).values() if not p.exists()]


def _build_base(base: Path, s, progress: bool) -> None:
    """Steps 1-3 of the built-in default (suite, tokenizer, teacher, student base; same settings and
    seeds, the recipe's own code) into ``base``; finished parts are reused."""
    from pocl.recipes.builtin_default import new_llama, prepare_suite, train_sft

    print(f"building the teacher and the student base in {base} (the built-in default's steps 1-3)", flush=True)
    paths, tokenizer = prepare_suite(base, s)
    train_sft(new_llama(s.teacher_arch, len(tokenizer), tokenizer, s.seed), tokenizer, paths["train"],
              paths["dev"], base / "teacher", epochs=s.teacher_epochs, lr=s.teacher_lr, s=s, progress=progress,
              name="teacher")
    train_sft(new_llama(s.student_arch, len(tokenizer), tokenizer, s.seed + 1), tokenizer,
              paths["student_pretrain"], None, base / "student-base", epochs=s.student_pretrain_epochs,
              lr=s.student_pretrain_lr, s=s, progress=progress, name="student-base")


def _reuse_ranking(sources: list[Path], run_dir: Path) -> None:
    """Copy an existing POCL ranking (the built-in default's, or another run's here: same student base,
    data and ranking settings) into the run folder; it is reused only if its stamp matches (otherwise
    measured again, in the run folder), and the source is never written."""
    dst = run_dir / "ranking.jsonl"
    for folder in sources:
        if dst.exists():
            return
        if (folder / "ranking.jsonl").exists() and (folder / "ranking.meta.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / "ranking.jsonl", dst)
            shutil.copy2(folder / "ranking.meta.json", run_dir / "ranking.meta.json")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/default", help="the built-in default's output folder (read only)")
    parser.add_argument("--out", default="runs/gkd-compare", help="where the runs and results.json go")
    parser.add_argument("--epochs", type=float, default=4.0, help="epochs of the GKD baseline (POCL: 2/5 of it "
                        "per stage, the same sample budget)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="on-policy response length")
    parser.add_argument("--on-policy-fraction", type=float, default=0.5)
    parser.add_argument("--replay-buffer-size", type=int, default=1000)
    parser.add_argument("--with-kd", action="store_true", help="also plain JSD KD and KD + POCL, same budget")
    parser.add_argument("--with-teacher", action="store_true", help="also evaluate the teacher")
    parser.add_argument("--build-base", action="store_true", help="when BASE lacks the trained models, train "
                        "the same teacher and student base into OUT/base (the built-in default's steps 1-3) and use "
                        "those; BASE is never written")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from pocl.config import DistillConfig
    from pocl.curriculum import same_budget_stage_epochs
    from pocl.models import load_tokenizer
    from pocl.pipeline import distill
    from pocl.recipes.builtin_default import EVAL_SEEDS, BuiltinSettings, evaluate_models

    base, out = Path(args.base), Path(args.out)
    s = BuiltinSettings()
    t_start = time.perf_counter()
    if _missing(base):
        if not args.build_base:
            sys.exit(f"missing {', '.join(_missing(base))}: run `pocl distill` (the built-in default) first, pass "
                     "--base to a folder that has them, or --build-base")
        print(f"{base} lacks {', '.join(_missing(base))}", flush=True)
        base = out / "base"
        _build_base(base, s, args.progress)
    paths = _base_paths(base)
    tokenizer = load_tokenizer(str(paths["student"]))
    n_stages = 4
    stage_epochs = same_budget_stage_epochs(args.epochs, n_stages)  # the same sample budget as --epochs of KD

    def config(name: str, *, on_policy: bool, pocl: bool) -> DistillConfig:
        loss = {"divergence": "jsd", "jsd_lambda": 0.9, "alpha": 1.0, "temperature": 1.0}
        if on_policy:
            loss.update(on_policy_fraction=args.on_policy_fraction, on_policy_max_new_tokens=args.max_new_tokens,
                        replay_buffer_size=args.replay_buffer_size, replay_reuse_prob=0.5)
        curriculum = {"rank_max_new_tokens": s.eval_max_new_tokens, "rank_batch_size": s.generation_batch_size}
        if pocl:
            curriculum.update(curriculum="pocl", num_stages=n_stages, stage_epochs=stage_epochs)
        train = {"output_dir": str(out / name), "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size,
                 "epochs": args.epochs, "seed": s.seed, "log_every": 20, "save_total_limit": 1,
                 "progress": args.progress, "tensorboard": False}
        if pocl:
            # The stages set alpha (0.7 -> 1), T (1 -> 2) and their length (stage_epochs: the same budget).
            loss = {k: v for k, v in loss.items() if k not in ("alpha", "temperature")}
            train.pop("epochs")
        return DistillConfig.from_dict({
            "model": {"teacher": str(paths["teacher"]), "student": str(paths["student"])},
            "data": {"train_file": str(paths["train"]), "dev_file": str(paths["dev"]), "max_length": s.max_length,
                     "max_prompt_length": s.max_prompt_length},
            "loss": loss,
            "optim": {"lr": s.kd_lr, "min_lr": s.kd_lr * 0.05},
            "train": train,
            "curriculum": curriculum,
        })

    runs = [("gkd", True, False), ("gkd-pocl", True, True)]
    if args.with_kd:
        runs += [("kd", False, False), ("kd-pocl", False, True)]
    results: dict = {"runs": {}}
    finals = {}
    for name, on_policy, pocl in runs:
        cfg = config(name, on_policy=on_policy, pocl=pocl)
        if pocl:
            _reuse_ranking([base / "pocl", out / "gkd-pocl"], out / name)
        print(f"{name}: {'GKD' if on_policy else 'KD'}{' + POCL' if pocl else ''} -> {out / name}", flush=True)
        t0 = time.perf_counter()
        result = distill(cfg)
        if result.status != "completed":
            sys.exit("interrupted: run the same command again to resume")
        sm = result.summary
        finals[name] = result.final_dir
        results["runs"][name] = {
            "wall_seconds": time.perf_counter() - t0, "train_seconds": sm["train_seconds"],
            "generation_seconds": sm.get("generation_seconds", 0.0), "global_steps": sm["global_steps"],
            "on_policy_steps": sm.get("on_policy_steps", 0), "replayed_steps": sm.get("replayed_steps", 0),
            "samples_seen": sm["global_steps"] * s.batch_size,
            "ranking_seconds": (sm.get("ranking") or {}).get("measure_seconds"),
            "ranking_action": (sm.get("ranking") or {}).get("action"),
            "stages": [{k: st.get(k) for k in ("name", "num_samples", "steps", "temperature", "alpha",
                                                "on_policy_fraction", "on_policy_steps", "replayed_steps")}
                       for st in sm["stages"]],
            "config": cfg.to_dict()}
        print(f"  {sm['global_steps']} steps ({sm.get('on_policy_steps', 0)} on-policy, "
              f"{sm.get('replayed_steps', 0)} from the replay buffer) in {sm['train_seconds']:.0f} s "
              f"(generation {sm.get('generation_seconds', 0.0):.0f} s)", flush=True)

    print("evaluating on the test split (sampled over 5 seeds, and greedy)", flush=True)
    models = {"student (initial)": paths["student"]}
    if args.with_teacher:
        models = {"teacher": paths["teacher"], **models}
    labels = {"gkd": "GKD", "gkd-pocl": "GKD + POCL", "kd": "JSD KD", "kd-pocl": "JSD KD + POCL"}
    models.update({labels[name]: finals[name] for name, *_ in runs})
    t0 = time.perf_counter()
    scores = evaluate_models(models, paths["test"], tokenizer, s)
    results.update(scores=scores, eval_seconds=time.perf_counter() - t0, total_seconds=time.perf_counter() - t_start,
                   settings={"epochs": args.epochs, "stage_epochs": stage_epochs, "max_new_tokens": args.max_new_tokens,
                             "on_policy_fraction": args.on_policy_fraction,
                             "replay_buffer_size": args.replay_buffer_size, "eval_seeds": list(EVAL_SEEDS),
                             "builtin": dataclasses.asdict(s), "base": str(base)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")

    width = max(len(k) for k in scores) + 2
    print(f"\n{'model':<{width}}{'ROUGE-L (5 seeds)':>20}{'EM (5 seeds)':>16}{'RL greedy':>11}{'EM greedy':>11}")
    for name, sc in scores.items():
        print(f"{name:<{width}}{sc['rouge_l']:>12.2f} ± {sc['rouge_l_std']:<5.2f}{sc['exact_match']:>8.2f} ± "
              f"{sc['exact_match_std']:<5.2f}{sc['greedy_rouge_l']:>11.2f}{sc['greedy_exact_match']:>11.2f}")
    print(f"\ntotal {results['total_seconds']:.0f} s; results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
