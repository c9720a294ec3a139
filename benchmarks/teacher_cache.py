"""Benchmark: the built-in default (POCL and the plain KD baseline) with and without the teacher cache.

Runs :func:`pocl.recipes.builtin_default.run_builtin_default` (what ``pocl distill`` without model
arguments runs) with ``loss.teacher_cache`` off and on, back to back in one process, in ``--pairs``
pairs whose order alternates (off, on, then on, off, ...), so that a trend in the machine's load
hits both variants alike. The teacher and the pre-trained student base are trained once (by the
first run, or taken from ``--prerequisites``, a finished built-in default folder) and copied into
each variant's folder, where the recipe reuses them; everything after them (the POCL ranking pass,
the teacher-cache pass, the four POCL stages, the KD baseline, the evaluation on the test split)
runs anew in every run.

Reported per run: wall time of the POCL distillation (ranking + cache pass + training), of the KD
baseline, of the evaluation, and of the whole run; the cache pass's own time and size; the test
scores of both distilled students (sampled at T = 1 over five seeds and greedy: exact match and
ROUGE-L). Reported per pair and as the median over pairs: the wall-time ratios cache on / off; and
the score differences on - off (training is deterministic on CPU: every pair gives the same scores,
which the result file checks).

The machine may be shared: the load average before and after every variant is recorded. Torch runs
with one intra-op thread (``--threads``), as in ``generation_batching.py``: on a loaded 2-core machine
two threads make identical runs vary several-fold.

    python benchmarks/teacher_cache.py                      # writes benchmarks/results/teacher_cache.json
    python benchmarks/teacher_cache.py --prerequisites runs/default   # reuse a finished built-in default
    python benchmarks/teacher_cache.py --quick              # a small smoke run (minutes), another file
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (benchmarks/_common.py: machine and version stamps, load average, JSON)

PREREQUISITES = ("data", "tokenizer", "teacher", "student-base")  # what every variant shares


def _quick_settings():
    from pocl.recipes.builtin_default import BuiltinSettings

    return BuiltinSettings(n_train=160, n_dev=32, n_test=32, n_student_pretrain=64, teacher_epochs=2,
                           student_pretrain_epochs=1, kd_epochs=2)


def _copy_prerequisites(source: Path, target: Path) -> None:
    for name in PREREQUISITES:
        if (source / name).exists() and not (target / name).exists():
            shutil.copytree(source / name, target / name)


#: The cache of the "on" variant (--cached), set by main().
CACHED_MODE = ["hidden"]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def tail_mass(cache_dir: Path) -> dict:
    """How much of the teacher's probability the tail bucket holds, per temperature of the cache:
    P(tail) = exp(tail_lse_T - logsumexp(z_topk / T, tail_lse_T)) over every cached response token."""
    from pocl.training.teacher_cache import TeacherCache

    cache = TeacherCache(cache_dir)
    rows = cache.lookup(cache.sample_ids)
    out = {}
    for column, t in enumerate(rows.temperatures):
        tail_lse = rows.tail_lse[:, column:column + 1].double()
        lse = torch.logsumexp(torch.cat([rows.logits.double() / t, tail_lse], -1), -1)
        mass = (tail_lse[:, 0] - lse).exp()
        q = torch.quantile(mass, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        out[f"T={t:g}"] = {"tokens": mass.numel(), "mean": float(mass.mean()), "median": q[0], "p90": q[1],
                           "p99": q[2], "max": float(mass.max())}
    return out


def run_variant(cache: str, out: Path, settings, *, prerequisites: Path | None) -> dict:
    from pocl.recipes.builtin_default import run_builtin_default

    for name in ("pocl", "kd", "results.json"):  # distil afresh; keep the shared teacher and student base
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if prerequisites is not None:
        _copy_prerequisites(prerequisites, out)
    load_before = _common.load()
    t0 = time.perf_counter()
    # "on" is the cached variant: --cached (hidden, the exact default; or topk, an approximation accepted here)
    loss = {"teacher_cache": "off"} if cache == "off" else {"teacher_cache": CACHED_MODE[0]}
    if loss["teacher_cache"] == "topk":
        loss["accept_approximation"] = "topk-cache"
    report = run_builtin_default(user_overrides={"train": {"output_dir": str(out), "progress": False},
                                                 "loss": loss}, settings=settings)
    wall = time.perf_counter() - t0
    if report.get("status") != "completed":
        raise SystemExit(f"variant teacher_cache={cache} did not complete: {report.get('status')}")
    t = report["timings"]
    students = {key: name for key, name in (("pocl", next(k for k in report["scores"] if k.endswith("+ POCL"))),
                                            ("kd", next(k for k in report["scores"] if k.endswith(" KD"))))}
    scores = {key: {m: report["scores"][name][m] for m in ("exact_match", "exact_match_std", "rouge_l",
                                                            "rouge_l_std", "greedy_exact_match", "greedy_rouge_l")}
              for key, name in students.items()}
    # the per-data-set entries of summary.json's teacher_cache (it also holds signal, exact, error_vs_live)
    cache_info = {key: {split: v for split, v in (report[f"{key}_summary"].get("teacher_cache") or {}).items()
                        if split in ("train", "dev")} for key in ("pocl", "kd")}
    cache_seconds = {key: sum(v["seconds"] for v in (info or {}).values()) for key, info in cache_info.items()}
    prerequisites_seconds = t["teacher_seconds"] + t["student_base_seconds"]
    return {
        "teacher_cache": cache, "output_dir": str(out), "wall_seconds": wall,
        "seconds": {"pocl_distill": t["pocl_seconds"], "pocl_ranking": t["pocl_ranking_seconds"],
                    "pocl_cache_pass": cache_seconds["pocl"], "pocl_training": t["pocl_training_seconds"],
                    "pocl_training_and_cache_pass": t["pocl_training_seconds"] + cache_seconds["pocl"],
                    "kd_distill": t["kd_seconds"], "kd_cache_pass": cache_seconds["kd"],
                    "kd_training": t["kd_training_seconds"],
                    "kd_training_and_cache_pass": t["kd_training_seconds"] + cache_seconds["kd"],
                    "evaluation": t["eval_seconds"], "teacher_and_student_base": prerequisites_seconds,
                    "distillation": t["pocl_seconds"] + t["kd_seconds"],
                    # what runs anew in every variant: POCL, KD and the evaluation
                    "full_run_after_prerequisites": wall - prerequisites_seconds},
        "cache_pass": {key: None if not info else {
            split: {k: v[k] for k in ("action", "shards", "computed", "tokens", "seconds")}
            for split, v in info.items()} for key, info in cache_info.items()},
        "cache_bytes": {key: _folder_bytes(out / key / "teacher_cache") for key in ("pocl", "kd")},
        "pocl_tail_mass": (tail_mass(out / "pocl" / "teacher_cache" / "train")
                           if cache == "on" and CACHED_MODE[0] == "topk" else None),
        "scores": scores, "load_average": {"before": load_before, "after": _common.load()},
    }


def compare(runs: dict[str, dict]) -> dict:
    """Ratios on / off and score differences on - off of one pair."""
    off, on = runs["off"], runs["on"]
    ratios = {key: on["seconds"][key] / off["seconds"][key]
              for key in ("pocl_distill", "pocl_training_and_cache_pass", "kd_distill", "kd_training_and_cache_pass",
                          "distillation", "full_run_after_prerequisites")}
    score_diff = {student: {m: on["scores"][student][m] - off["scores"][student][m]
                            for m in ("exact_match", "rouge_l", "greedy_exact_match", "greedy_rouge_l")}
                  for student in ("pocl", "kd")}
    return {"wall_time_ratio_on_over_off": ratios, "score_difference_on_minus_off": score_diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the variants run (default: runs/bench-teacher-cache, or -quick)")
    ap.add_argument("--prerequisites", type=Path, default=None,
                    help="a finished built-in default folder whose data, tokenizer, teacher and student base to reuse")
    ap.add_argument("--pairs", type=int, default=2, help="pairs of runs (off and on); the order alternates")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="small settings: a smoke run")
    ap.add_argument("--cached", choices=["hidden", "topk"], default="hidden",
                    help="the cache of the 'on' variant: hidden (exact, the default) or topk (an approximation; the "
                         "committed results/teacher_cache.json was measured with topk, k = 64, before hidden existed)")
    ap.add_argument("--output", type=Path, default=None,
                    help="result file (default: benchmarks/results/teacher_cache.json; with --quick: "
                         "runs/bench-teacher-cache-quick/teacher_cache.json)")
    args = ap.parse_args(argv)
    CACHED_MODE[0] = args.cached
    from pocl.config import LossConfig
    from pocl.recipes.builtin_default import BuiltinSettings

    torch.set_num_threads(args.threads)
    settings = _quick_settings() if args.quick else BuiltinSettings()
    work = args.work_dir or _common.ROOT / ("runs/bench-teacher-cache" + ("-quick" if args.quick else ""))
    output = args.output or (work / "teacher_cache.json" if args.quick else
                             _common.RESULTS / "teacher_cache.json")
    started, t0, load_before = _common.now(), time.perf_counter(), _common.load()
    runs: list[dict] = []
    pairs: list[dict] = []
    source = args.prerequisites
    for pair in range(args.pairs):
        order = ["off", "on"] if pair % 2 == 0 else ["on", "off"]
        done = {}
        for cache in order:
            print(f"=== pair {pair + 1}: teacher_cache={cache} ===", flush=True)
            done[cache] = run_variant(cache, work / cache, settings, prerequisites=source)
            done[cache]["pair"] = pair
            runs.append(done[cache])
            source = source or work / cache  # the other variant reuses this run's teacher and student base
            print(f"=== pair {pair + 1}: teacher_cache={cache}: {done[cache]['wall_seconds']:.0f} s (POCL "
                  f"{done[cache]['seconds']['pocl_distill']:.0f} s, KD {done[cache]['seconds']['kd_distill']:.0f} s)",
                  flush=True)
        pairs.append({"pair": pair, "order": order, **compare(done)})
    ratios = {key: {"median": statistics.median(p["wall_time_ratio_on_over_off"][key] for p in pairs),
                    "per_pair": [p["wall_time_ratio_on_over_off"][key] for p in pairs]}
              for key in pairs[0]["wall_time_ratio_on_over_off"]}
    result = {
        "benchmark": "teacher_cache", "created": started,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": _common.machine(), "versions": _common.versions(), "torch_threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(settings),
        "teacher_cache_settings": dict({k: getattr(LossConfig(), k) for k in ("teacher_cache_topk", "teacher_cache_dtype")},
                                       cached=args.cached),
        "note": "runs back to back in one process, pairs in alternating order, on a machine shared with other "
                "jobs (see load_average); the ranking pass is the same work in every run and shows the noise",
        "runs": runs, "pairs": pairs, "wall_time_ratio_on_over_off": ratios,
        "score_difference_on_minus_off": pairs[0]["score_difference_on_minus_off"],
        "scores_repeat_exactly": all(r["scores"] == next(x for x in runs if x["teacher_cache"] == r["teacher_cache"])
                                     ["scores"] for r in runs),
        "wall_seconds": time.perf_counter() - t0, "load_average": {"before": load_before, "after": _common.load()},
    }
    _common.write_json(output, result)
    ratio = {key: value["median"] for key, value in ratios.items()}
    diff = result["score_difference_on_minus_off"]["pocl"]
    print(f"wall-time ratio on/off (median of {args.pairs} pairs): POCL distill {ratio['pocl_distill']:.3f}, KD "
          f"{ratio['kd_distill']:.3f}, both {ratio['distillation']:.3f}; POCL student on - off: ROUGE-L "
          f"{diff['rouge_l']:+.2f}, "
          f"exact match {diff['exact_match']:+.2f}; written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
