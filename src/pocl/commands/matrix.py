"""``pocl matrix``: run an experiment matrix from one YAML spec ({divergence} x {plain KD, KD + POCL} x
seeds plus ablations), evaluate every run and write one results table (:mod:`pocl.experiments`)."""

from __future__ import annotations

import argparse

from pocl.experiments import add_arguments, run_command


def register(sub) -> None:
    p = sub.add_parser(
        "matrix", help="Run an experiment matrix (divergences x {KD, KD+POCL, ...} x seeds, ablations) from a YAML "
                       "spec.",
        description="Run the experiment matrix of SPEC: {divergence} x {plain KD, KD + POCL} x seeds (or the spec's "
                    "methods: also TAID, Speculative KD, each with and without POCL, and POCL with an assistant "
                    "teacher) plus the ablations, each run a `pocl distill` at the same sample budget (as a subprocess; log in "
                    "OUTPUT/logs), every run and the reference models evaluated with `pocl eval` (cached), then "
                    "OUTPUT/results.md, results.json and bar charts. Every step is skipped when its result is "
                    "already there: run the same command again to resume. See docs/experiments.md.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A spec error or a failed run is a PoclError: pocl.cli prints it and exits 2; interrupted: 130.
    return run_command(args, prog="pocl", pocl_main=args.pocl_main)
