"""The dry run: the time estimate from the spec's measured per-sample figures and the printed plan."""

from __future__ import annotations

from pocl.config.eval import default_set_name, named_specs
from pocl.experiments.plan import (
    Run,
    assistant_dir,
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


def skd_seconds_per_sample(spec: Spec, run: Run) -> tuple[float, bool]:
    """(seconds per sample pass of an SKD run, whether assumed): the spec's ``seconds_per_skd_sample``, or
    assumed = ``seconds_per_train_sample`` + skd_fraction x ``seconds_per_teacher_eval_prompt`` x
    on_policy_max_new_tokens / eval.max_new_tokens: a speculative step adds about the cost of the teacher
    writing the answer itself (it checks every drafted block in a forward pass and samples the rejected
    tokens; the student's drafting is cheaper), on the share of steps that are speculative."""
    from pocl.config import DistillConfig

    est = spec.estimate
    if "seconds_per_skd_sample" in est:
        return float(est["seconds_per_skd_sample"]), False
    loss = DistillConfig.from_dict(run.config).loss
    answer = est.get("seconds_per_teacher_eval_prompt", 0) * loss.on_policy_max_new_tokens \
        / float(spec.eval.get("max_new_tokens", 256))
    return est.get("seconds_per_train_sample", 0) + loss.skd_fraction * answer, True


def _layers(options) -> int | None:
    return options.get("num_layers") if isinstance(options, dict) else None


def estimate_seconds(spec: Spec, plan: list[Run]) -> dict[str, float] | None:
    """Rough wall time from the spec's measured per-sample figures (``estimate:``): seconds of healing,
    training, ranking, evaluation and in total, ``todo``: the part not done yet (healing and training runs not
    done, evaluations not cached; the ranking counts while a POCL run is to train), plus the sample and
    generation counts and the figure an SKD run's sample passes are estimated with
    (:func:`skd_seconds_per_sample`); None when the spec has no ``estimate``."""
    est = spec.estimate
    if not est:
        return None
    data = spec.base.get("data") or {}
    n = data.get("max_train_samples") or _count_rows(data["train_file"]) or 0
    epochs = float((spec.base.get("train") or {}).get("epochs", 20))
    prompts = 0
    for _, path in named_specs(list(spec.eval["data"]), kind="data", default_name=default_set_name):
        rows = _count_rows(path) or 0
        prompts += min(rows, spec.eval.get("max_samples") or rows)
    seeds = 1 if spec.eval.get("greedy") else len(spec.eval.get("seeds", [10, 20, 30, 40, 50]))
    parts = {"train": 0.0, "ranking": 0.0, "eval": 0.0, "heal": 0.0}
    todo, skd, pocl_todo = 0.0, None, False
    for r in plan:
        cached = (spec.output_dir / "eval" / r.name / "stamp.json").is_file()
        per_prompt = est.get("seconds_per_teacher_eval_prompt" if r.name == "teacher" else "seconds_per_eval_prompt", 0)
        seconds = prompts * seeds * per_prompt
        parts["eval"] += seconds
        todo += 0.0 if cached else seconds
        if r.config is None:
            continue
        per_sample = est.get("seconds_per_train_sample", 0)
        if r.config["loss"].get("method") == "skd":
            skd = skd_seconds_per_sample(spec, r)
            per_sample = skd[0]
        seconds = n * epochs * per_sample + est.get("seconds_per_run_overhead", 0)
        parts["train"] += seconds
        if training_status(spec, r)[0] != "done":
            todo += seconds
            pocl_todo = pocl_todo or r.is_pocl
    if any(r.is_pocl for r in plan):
        parts["ranking"] = n * est.get("seconds_per_rank_sample", 0)
        todo += parts["ranking"] if pocl_todo else 0.0
    for role in ("student", "assistant"):
        heal = heal_run(spec, role)
        if heal is not None:  # the figure is the student's; the assistant's scales with its layers when known
            hd = heal.config["data"]
            hn = hd.get("max_train_samples") or _count_rows(hd["train_file"]) or 0
            scale = 1.0
            if role == "assistant" and _layers(spec.assistant) and _layers(spec.student):
                scale = _layers(spec.assistant) / _layers(spec.student)
            seconds = hn * float(heal.config["train"].get("epochs", 20)) * est.get("seconds_per_heal_sample", 0) * scale
            parts["heal"] += seconds
            todo += 0.0 if training_status(spec, heal)[0] == "done" else seconds
    return {**parts, "total": sum(parts.values()), "todo": todo, "train_samples": n,
            "eval_prompts_per_model": prompts * seeds,
            "skd_seconds_per_sample": skd[0] if skd else None, "skd_assumed": bool(skd and skd[1])}


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
    if spec.assistant is not None:
        print(f"assistant: {assistant_dir(spec, healed=False)}"
              + (f" (pocl init-student {spec.assistant} of the teacher)" if isinstance(spec.assistant, dict) else "")
              + f"; the teacher of stages 1-{spec.assistant_stages} of the pocl-assistant runs")
    for role, result in (("student", f"initial student {student}"), ("assistant", f"assistant {assistant_dir(spec)}")):
        heal = heal_run(spec, role)
        if heal is not None:
            d = heal.config["data"]
            print(f"healing: pocl distill --config {spec.output_dir / 'configs' / heal.name}.yaml ({heal.method} on "
                  f"{d['train_file']}, {d.get('max_train_samples') or 'all'} samples, "
                  f"{heal.config['train'].get('epochs', 20)} epochs; {training_status(spec, heal)[0]}) -> {result}")
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
              f"{est['ranking'] / 3600:.2f} h, evaluation {est['eval'] / 3600:.2f} h, total {est['total'] / 3600:.2f} h; not done yet: "
              f"{est['todo'] / 3600:.2f} h")
        if est["skd_seconds_per_sample"] is not None:
            how = ("assumed: seconds_per_train_sample + the teacher writing the answer, seconds_per_teacher_eval_prompt "
                   "x on_policy_max_new_tokens / eval max_new_tokens x skd_fraction; measure it and set "
                   "estimate.seconds_per_skd_sample" if est["skd_assumed"] else "estimate.seconds_per_skd_sample")
            print(f"SKD runs: {est['skd_seconds_per_sample']:.3g} s per sample pass ({how})")
