"""``pocl eval``: generate answers with one or more models on one or more evaluation sets and score them
(ROUGE-L and exact match, mean ± std over seeds); see docs/evaluation.md."""

from __future__ import annotations

import argparse

from pocl.commands.flags import add_section_flags, collect_overrides
from pocl.config.eval import EvalConfig


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="Evaluate models on instruction test sets (ROUGE-L, exact match, over seeds).",
        description="Generate an answer for every sample of every evaluation set with every model, once per seed, "
                    "and score it against the references: ROUGE-L F x 100 (rouge-score, Porter stemmer, max over "
                    "references) and exact match (after SQuAD answer normalisation by default). Defaults are the "
                    "POCL protocol: sampling at T=1, top-p 1, no top-k, no_repeat_ngram_size 6, at most 256 new "
                    "tokens, seeds 10 20 30 40 50; every decoding setting is passed to transformers explicitly "
                    "(the model's own generation_config is ignored) and recorded in results.json. Writes "
                    "generations.jsonl, results.json and results.md to --output-dir and prints the table. Every "
                    "option can also be set in the 'eval:' section of a YAML file (--config); flags override it.")
    p.add_argument("--config", metavar="FILE", help="YAML file with an 'eval:' section (other sections are ignored).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.add_argument("--model", dest="eval__models", action="append", metavar="[NAME=]PATH", default=argparse.SUPPRESS,
                   help="A model to evaluate (repeatable): a model folder (e.g. RUN/final), a hub name or a .gguf "
                        "file, optionally named NAME=PATH. Default name: the folder name (RUN/final for a run's "
                        "final or best folder), or the .gguf file stem.")
    p.add_argument("--data", dest="eval__data", action="append", metavar="[NAME=]PATH", default=argparse.SUPPRESS,
                   help="An evaluation set (repeatable): .jsonl or .json with instruction/input/output (output may "
                        "be a list of references) or the other layouts of docs/evaluation.md. Default name: the file "
                        "stem.")
    p.add_argument("--seeds", dest="eval__seeds", type=int, nargs="+", metavar="SEED", default=argparse.SUPPRESS,
                   help="Sampling seeds (default: 10 20 30 40 50); the score is the mean over seeds.")
    p.add_argument("--ranking", dest="eval__ranking", action="append", metavar="[SET=]FILE", default=argparse.SUPPRESS,
                   help="A ranking.jsonl of an evaluated set, written by `pocl rank --train-file EVAL_FILE` "
                        "(repeatable; SET may be left out with one set): adds ROUGE-L per difficulty quartile. "
                        "Every evaluated sample must be in it with the same sample hash (id, prompt, references); "
                        "a ranking of another data set stops the run before any generation.")
    add_section_flags(p, EvalConfig, "evaluation options")
    p.set_defaults(func=run)


def build_eval_config(args: argparse.Namespace):
    """EvalConfig from defaults < --config YAML (eval: section) < flags."""
    overrides = collect_overrides(args).get("eval", {})
    if getattr(args, "config", None):
        return EvalConfig.from_yaml(args.config, overrides)
    return EvalConfig.from_dict(overrides)


def run(args: argparse.Namespace) -> int:
    from pocl.evaluation.runner import run_eval  # torch and transformers: not loaded by `pocl eval --help`

    config = build_eval_config(args)
    report = run_eval(config)
    print()
    print(report.markdown)
    print("files: " + ", ".join(str(f) for f in report.files))
    return 0
