"""``pocl card``: rewrite the model cards (README.md) of a run's final/ and best/ with `pocl eval` scores."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "card", help="Rewrite the model cards of a run's final/ and best/ (with pocl eval scores).",
        description="Regenerate OUTPUT_DIR/final/README.md (and best/README.md) from the run's summary.json and "
                    "config.yaml, adding the scores of the given `pocl eval` results.json files for the models they "
                    "evaluated (matched by path). Each folder is rewritten atomically with a new manifest; a folder "
                    "whose files do not match its manifest, or that holds files pocl did not write, is refused and "
                    "left unchanged. Give every results file each time: the card is rebuilt from them.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="Output folder of `pocl distill`.")
    p.add_argument("--eval", dest="eval_results", nargs="+", action="extend", default=[], metavar="FILE",
                   help="results.json files (or their folders) written by `pocl eval`.")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pocl.reporting.model_card import refresh_cards

    files = [Path(f) / "results.json" if Path(f).is_dir() else Path(f) for f in args.eval_results]
    for card in refresh_cards(Path(args.run_dir), files):
        print(card)
    return 0
