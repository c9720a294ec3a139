"""``pocl report``: PNG plots of distillation runs (training curves, difficulty ranking) and of
``pocl eval`` results (bar chart per set with std over seeds)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="Plot training curves, difficulty rankings and evaluation results (PNG).",
        description="Write PNG plots: for each RUN_DIR (the output folder of `pocl distill`) the training curves "
                    "(train loss and dev CE over steps, stage boundaries, temperature and alpha per stage) and, "
                    "when the run has a ranking.jsonl, the difficulty scores with the stage cut points; for "
                    "--eval-results files (results.json of `pocl eval`) a bar chart per evaluation set with error "
                    "bars = std over seeds. Prints the written files.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="Output folders of `pocl distill`.")
    p.add_argument("--eval-results", nargs="+", default=[], metavar="FILE",
                   help="results.json files (or their folders) written by `pocl eval`; models of all files are "
                        "compared side by side.")
    p.add_argument("--metric", choices=["rouge_l", "exact_match"], default="rouge_l",
                   help="Metric of the evaluation bar chart (default: rouge_l).")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="Where the PNG files go (default: FIRST_RUN_DIR/plots, or the folder of the first results "
                        "file + /plots).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pocl.reporting.plots import report

    files = report(args.run_dirs, args.eval_results, output_dir=args.output_dir, metric=args.metric)
    for f in files:
        print(f)
    return 0
