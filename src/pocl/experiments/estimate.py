"""The dry run: the time estimate from the spec's measured per-sample figures and the printed plan."""

from __future__ import annotations

from pocl.config.eval import default_set_name, named_specs
from pocl.experiments.plan import (
    Run,
    heal_run,
    model_dirs,
    stage_fractions,
    training_status,
)
from pocl.experiments.spec import Spec


def _count_rows(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def estimate_seconds(spec: Spec, plan: list[Run]) -> dict[str, float] | None:
    """Rough wall time from the spec's measured per-sample figures (``estimate:``): seconds of healing,
    training, ranking, evaluation and in total, plus the sample and generation counts; None when the
    spec has no ``estimate``."""
    est = spec.estimate
    if not est:
        return None
    data = spec.base.get("data") or {}
    n = data.get("max_train_samples") or _count_rows(data["train_file"]) or 0
    epochs = float((spec.base.get("train") or {}).get("epochs", 20))
    train_runs = [r for r in plan if r.config is not None]
    train = len(train_runs) * (n * epochs * est.get("seconds_per_train_sample", 0)
                               + est.get("seconds_per_run_overhead", 0))
    rank = n * est.get("seconds_per_rank_sample", 0) if any(r.is_pocl for r in plan) else 0.0
    prompts = 0
    for _, path in named_specs(list(spec.eval["data"]), kind="data", default_name=default_set_name):
        rows = _count_rows(path) or 0
        prompts += min(rows, spec.eval.get("max_samples") or rows)
    seeds = 1 if spec.eval.get("greedy") else len(spec.eval.get("seeds", [10, 20, 30, 40, 50]))
    student_evals = len(train_runs) + ("student" in spec.reference_models)
    ev = prompts * seeds * (student_evals * est.get("seconds_per_eval_prompt", 0)
                            + ("teacher" in spec.reference_models) * est.get("seconds_per_teacher_eval_prompt", 0))
    heal = heal_run(spec)
    healing = 0.0
    if heal is not None:
        hd = heal.config["data"]
        hn = hd.get("max_train_samples") or _count_rows(hd["train_file"]) or 0
        healing = hn * float(heal.config["train"].get("epochs", 20)) * est.get("seconds_per_heal_sample", 0)
    return {"train": train, "ranking": rank, "eval": ev, "heal": healing, "total": train + rank + ev + healing,
            "train_samples": n, "eval_prompts_per_model": prompts * seeds}


def print_plan(spec: Spec, plan: list[Run]) -> None:
    """Print the plan (``--dry-run``): the models, the healing and ranking steps, every run with its
    row, seed, epochs, sample passes, training status and evaluation cache, and the time estimate."""
    teacher, student = model_dirs(spec)
    print(f"spec: {spec.path}\noutput: {spec.output_dir}")
    if spec.teacher.endswith(".gguf"):
        print(f"teacher: {spec.teacher} -> converted once to {teacher}")
    else:
        print(f"teacher: {teacher}")
    raw_student = model_dirs(spec, healed=False)[1]
    print(f"student: {raw_student}" + (f" (pocl init-student {spec.student} of the teacher)"
                                       if isinstance(spec.student, dict) else ""))
    heal = heal_run(spec)
    if heal is not None:
        d = heal.config["data"]
        print(f"healing: pocl distill --config {spec.output_dir / 'configs' / 'heal.yaml'} ({heal.method} on "
              f"{d['train_file']}, {d.get('max_train_samples') or 'all'} samples, "
              f"{heal.config['train'].get('epochs', 20)} epochs; {training_status(spec, heal)[0]}) -> initial student "
              f"{student}")
    train = [r for r in plan if r.config is not None]
    if any(r.is_pocl for r in train):
        print(f"ranking: pocl rank --config {spec.output_dir / 'configs' / 'ranking.yaml'} (once, shared)")
    print(f"\n{'run':<34} {'row':<30} {'seed':>5} {'epochs':>14} {'passes':>7} {'status':<9} eval")
    for r in plan:
        if r.config is None:
            status, epochs, passes, seed = "-", "-", "-", "-"
        else:
            status = training_status(spec, r)[0]
            tr, cur = r.config["train"], r.config["curriculum"]
            if r.is_pocl:
                fr = stage_fractions(cur)
                epochs = f"{cur['stage_epochs']:.3g}/stage x{len(fr)}"
                passes = f"{cur['stage_epochs'] * sum(fr):.3g}"
            else:
                epochs = f"{float(tr.get('epochs', 20)):.3g}"
                passes = epochs
            seed = str(r.seed)
        ev = "cached" if (spec.output_dir / "eval" / r.name / "stamp.json").is_file() else "todo"
        print(f"{r.name:<34} {r.row:<30} {seed:>5} {epochs:>14} {passes:>7} {status:<9} {ev}")
    print(f"\n{len(train)} training runs, {len(plan)} evaluations; each run: python -m pocl distill --config "
          f"{spec.output_dir / 'configs' / 'RUN.yaml'}")
    est = estimate_seconds(spec, plan)
    if est:
        print(f"estimate ({est['train_samples']} training samples, {est['eval_prompts_per_model']} generations per "
              f"model): healing {est['heal'] / 3600:.2f} h, training {est['train'] / 3600:.2f} h, ranking "
              f"{est['ranking'] / 3600:.2f} h, evaluation {est['eval'] / 3600:.2f} h, total {est['total'] / 3600:.2f} h")
