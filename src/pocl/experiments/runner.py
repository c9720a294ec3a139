"""The whole matrix (``run_matrix``) and its command line, shared by ``pocl matrix`` and the example
script ``examples/experiments/run_matrix.py`` (``main``)."""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import sys
from pathlib import Path

from pocl.errors import ConfigError, PoclError
from pocl.experiments.estimate import print_plan
from pocl.experiments.execute import Interrupted, PoclMain, evaluate, prepare_models, train_all
from pocl.experiments.plan import build_plan, read_json
from pocl.experiments.results import export_results, write_results
from pocl.experiments.spec import Spec, load_spec

DESCRIPTION = ("Run an experiment matrix: {divergence} x {plain KD, KD + POCL} x seeds, plus the ablations of the\n"
               "spec's section 7, evaluate every run and write one results table in the layout of the spec's "
               "section 6.\nThe spec's methods may add TAID and Speculative KD (each without and with POCL) and "
               "POCL with an assistant teacher\nin its first stages: kd, pocl, taid, taid-pocl, skd, skd-pocl, "
               "pocl-assistant.")


def run_matrix(spec: Spec, *, only: list[str] | None = None, pocl_main: PoclMain | None = None,
               rerun_changed: bool = False,
               evaluate_runs: bool = True, train: bool = True, progress: bool = True, plots: bool = True) -> dict:
    """The whole matrix (or the runs matching the ``only`` glob patterns); returns results.json's content.
    ``pocl_main`` (``pocl.cli.main``): run the pocl commands in this process; None: as subprocesses."""
    plan = build_plan(spec)
    selected = [r for r in plan if not only or any(fnmatch.fnmatch(r.name, p) for p in only)]
    if not selected:
        raise ConfigError(f"--only {' '.join(only or [])} matches no run of {spec.path}")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    if train:
        prepare_models(spec, pocl_main=pocl_main)
        statuses = train_all(spec, selected, pocl_main=pocl_main, rerun_changed=rerun_changed)
        failed = {n: s for n, s in statuses.items() if s.startswith("failed")}
    else:
        failed = {}
    evaluations: dict[str, dict | None] = {}
    for r in plan:
        if r in selected and evaluate_runs and r.name not in failed:
            evaluations[r.name] = evaluate(spec, r, progress=progress)
        else:  # runs outside --only still appear in the table when their evaluation is cached
            cached = spec.output_dir / "eval" / r.name / "results.json"
            evaluations[r.name] = read_json(cached) if (cached.parent / "stamp.json").is_file() else None
    data = write_results(spec, plan, evaluations, plots=plots)
    if failed:
        raise PoclError("runs failed: " + ", ".join(f"{n} ({s})" for n, s in failed.items())
                        + f"; logs in {spec.output_dir / 'logs'}")
    return data


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the matrix's arguments (SPEC and the flags) to the parser ``p``; returns nothing."""
    p.add_argument("spec", help="The matrix spec (YAML), e.g. examples/experiments/smollm2_dolly.yaml.")
    p.add_argument("--dry-run", action="store_true", help="Print the plan (runs, budgets, status, estimate) only.")
    p.add_argument("--only", nargs="+", metavar="GLOB", help="Run only the runs whose name matches (e.g. 'kd-*').")
    p.add_argument("--in-process", action="store_true", help="Run pocl in this process instead of subprocesses.")
    p.add_argument("--rerun-changed", action="store_true",
                   help="Retrain finished runs whose config differs from the spec (default: stop and list them).")
    p.add_argument("--no-eval", action="store_true", help="Train only; the table shows cached evaluations.")
    p.add_argument("--table-only", action="store_true", help="No training or evaluation: rebuild the tables.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars in the evaluations.")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="Afterwards copy results.md, results.json, tables/ and plots/ into DIR (e.g. docs/results/).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")


def run_command(args: argparse.Namespace, *, prog: str, pocl_main: PoclMain | None = None) -> int:
    """The matrix for parsed arguments (:func:`add_arguments`): the plan with ``--dry-run``, else the runs,
    the tables and the export. ``pocl_main`` (``pocl.cli.main``) runs the pocl commands with
    ``--in-process``. Returns the exit status: 0, or 130 when interrupted (the message starts with
    ``prog``); a PoclError (exit 2) is the caller's to report."""
    if args.in_process and pocl_main is None:
        raise ConfigError("--in-process needs the pocl entry point (pocl.cli.main) from the caller")
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            print_plan(spec, build_plan(spec))
            return 0
        run_matrix(spec, only=args.only, pocl_main=pocl_main if args.in_process else None,
                   rerun_changed=args.rerun_changed,
                   evaluate_runs=not (args.no_eval or args.table_only), train=not args.table_only,
                   progress=not args.no_progress)
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"results: {spec.output_dir / 'results.md'}, {spec.output_dir / 'results.json'}")
    if args.export:
        for path in export_results(spec, Path(args.export)):
            print(f"exported {path}")
    return 0


def main(argv: list[str] | None = None, *, pocl_main: PoclMain | None = None) -> int:
    """The command line of ``examples/experiments/run_matrix.py`` (the same as ``pocl matrix``); returns
    the exit status: 0, 2 for an error (printed as ``run_matrix: error: ...``), 130 when interrupted.
    ``pocl_main``: ``pocl.cli.main``, for ``--in-process``."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return run_command(args, prog="run_matrix", pocl_main=pocl_main)
    except PoclError as exc:
        print(f"run_matrix: error: {exc}", file=sys.stderr)
        return 2
