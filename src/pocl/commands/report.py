"""``pocl report``: PNG plots of distillation runs (training curves, difficulty ranking) and of
``pocl eval`` results (bar chart per set with std over seeds).

Every argument is checked for what it is before anything is drawn: a value of ``--eval-results`` that is
a run folder of ``pocl distill`` is a RUN_DIR (``--eval-results X RUN_DIR`` is ``RUN_DIR --eval-results
X``); an argument that is neither what its place asks for nor a run folder is a one-line error (exit 2)
naming it."""

from __future__ import annotations

import argparse
from pathlib import Path

from pocl.errors import ConfigError

#: Files of which any one makes a folder a run folder of `pocl distill` (for telling RUN_DIR from results).
RUN_MARKERS = ("metrics.jsonl", "summary.json", "config.yaml")


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="Plot training curves, difficulty rankings and evaluation results (PNG).",
        description="Write PNG plots: for each RUN_DIR (the output folder of `pocl distill`) the training curves "
                    "(train loss and dev CE over steps, stage boundaries, temperature and alpha per stage; an "
                    "interrupted run is drawn up to its last step and marked so) and, when the run has a "
                    "ranking.jsonl, the difficulty scores with the stage cut points; for --eval-results files "
                    "(results.json of `pocl eval`) a bar chart per evaluation set with error bars = std over "
                    "seeds. Give at least one RUN_DIR or --eval-results file. Prints the written files.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="Output folders of `pocl distill`.")
    p.add_argument("--eval-results", nargs="+", action="extend", default=[], metavar="FILE",
                   help="results.json files (or their folders) written by `pocl eval`; models of all files are "
                        "compared side by side. Takes one or more values and may be repeated. A value that is a "
                        "run folder of `pocl distill` (it has metrics.jsonl, summary.json or config.yaml and no "
                        "results.json) is taken as a RUN_DIR, so `--eval-results X RUN_DIR` and `RUN_DIR "
                        "--eval-results X` are the same; any other value that is not a results file or folder "
                        "is an error.")
    p.add_argument("--metric", choices=["rouge_l", "exact_match"], default="rouge_l",
                   help="Metric of the evaluation bar chart (default: rouge_l).")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="Where the PNG files go (default: FIRST_RUN_DIR/plots, or the folder of the first results "
                        "file + /plots).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=run)


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and not (path / "results.json").is_file() and \
        any((path / name).is_file() for name in RUN_MARKERS)


def _runs_inside(path: Path) -> list[str]:
    """Names of the run folders directly inside ``path`` (the built-in default's runs/default holds two)."""
    try:
        return sorted(p.name + "/" for p in path.iterdir() if _is_run_folder(p))
    except OSError:
        return []


def _not_a_run(path: Path, *, after_flag: bool) -> str:
    if not path.exists():
        if after_flag:
            return f"--eval-results {path}: not found (neither a results.json of `pocl eval` nor a run folder)"
        return f"run folder not found: {path}"
    inside = _runs_inside(path) if path.is_dir() else []
    hint = f" (its run folders: {', '.join(inside)})" if inside else ""
    if after_flag:
        return (f"--eval-results {path}: neither a results.json of `pocl eval` (or a folder holding one) nor a run "
                f"folder of `pocl distill` (no {', '.join(RUN_MARKERS)}){hint}")
    if path.is_file() or (path / "results.json").is_file():
        return (f"{path}: not a run folder of `pocl distill`; give evaluation results with --eval-results "
                f"{path}")
    return f"{path}: not a run folder of `pocl distill` (no {', '.join(RUN_MARKERS)}){hint}"


def sort_inputs(run_dirs: list[str], eval_results: list[str]) -> tuple[list[str], list[str]]:
    """(run folders, results files) of the command line: values of --eval-results that are run folders move
    to the run folders (in command-line order after the positional ones); any argument that is not what it
    should be raises a ConfigError naming it; no arguments at all raise one too."""
    if not run_dirs and not eval_results:
        raise ConfigError("nothing to plot: give one or more RUN_DIR (output folders of `pocl distill`) and/or "
                          "--eval-results FILE (results.json of `pocl eval`); see pocl report --help")
    runs, results = [], []
    for value in run_dirs:
        path = Path(value)
        if not _is_run_folder(path):
            raise ConfigError(_not_a_run(path, after_flag=False))
        runs.append(value)
    for value in eval_results:
        path = Path(value)
        if path.is_file() or (path.is_dir() and (path / "results.json").is_file()):
            results.append(value)  # its content is checked when it is read
        elif _is_run_folder(path):
            runs.append(value)
        else:
            raise ConfigError(_not_a_run(path, after_flag=True))
    return runs, results


def run(args: argparse.Namespace) -> int:
    from pocl.reporting.plots import report

    run_dirs, eval_results = sort_inputs(list(args.run_dirs), list(args.eval_results))
    files = report(run_dirs, eval_results, output_dir=args.output_dir, metric=args.metric)
    for f in files:
        print(f)
    return 0
