"""``pocl teacher-signal export``: a top-k teacher cache as a Parquet teacher signal file (one row per sample:
top-k token ids and teacher logprobs at T = 1 per response position, and the tails), which other tools
can read and ``--teacher-signal-file`` imports (docs/losses.md, "Importing and exporting teacher signals")."""

from __future__ import annotations

import argparse
from pathlib import Path

from pocl.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "teacher-signal", help="Export a top-k teacher cache as a Parquet teacher signal file.",
        description="Teacher signal files: the teacher's top-k logprobs per response token, keyed by sample id "
                    "(docs/losses.md). Import one into a run with `pocl distill --teacher-signal-file FILE`.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    e = actions.add_parser(
        "export", help="Write a top-k teacher cache as a Parquet file.",
        description="Write the top-k teacher cache of a run (its teacher_cache folder, with train/ and dev/, or one "
                    "cache) as a Parquet file: one row per sample id with, per response position, the top-k token "
                    "ids, their teacher logprobs at T = 1 and the tail (mass outside them at T = 1, logsumexp at "
                    "every cached temperature); the teacher, tokenizer and data fingerprints, k and the pocl "
                    "version are in the schema metadata. Hidden-state caches are not exported (their logits need "
                    "the teacher's LM head): build a top-k cache with --teacher-cache topk. An approximation of the "
                    "teacher, like the cache it comes from.")
    e.add_argument("--cache", required=True, metavar="DIR",
                   help="The run's teacher_cache folder (OUTPUT_DIR/teacher_cache or --teacher-cache-dir) or one "
                        "cache inside it (train/ or dev/).")
    e.add_argument("--out", required=True, metavar="FILE",
                   help="The Parquet file to write (replaced atomically when it exists).")
    e.add_argument("--tokenizer", metavar="PATH",
                   help="The tokenizer that made the cached data (a model folder or hub name), for the file's "
                        "tokenizer fingerprint. Default: the run's (model.tokenizer or model.student of the "
                        "config.yaml next to the cache).")
    e.add_argument("--local-files-only", action="store_true", help="Never contact the hub.")
    e.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run_tokenizer(cache: Path) -> str:
    """model.tokenizer or model.student of the run whose config.yaml is next to (or above) ``cache``."""
    import yaml

    for folder in (cache, *list(cache.parents)[:2]):
        path = folder / "config.yaml"
        if path.is_file():
            model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
            spec = model.get("tokenizer") or model.get("student")
            if spec:
                return str(spec)
    raise ConfigError(f"--cache {cache}: no run config.yaml next to it names the tokenizer; give --tokenizer")


def run_export(args: argparse.Namespace) -> int:
    from pocl.fingerprints import tokenizer_fingerprint
    from pocl.models import load_tokenizer
    from pocl.training.teacher_signal_export import export_cache

    cache = Path(args.cache)
    spec = args.tokenizer or _run_tokenizer(cache.resolve())
    tokenizer = load_tokenizer(spec, local_files_only=args.local_files_only)
    info = export_cache(cache, args.out, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    print(f"teacher signal: {info['rows']} samples, {info['tokens']} response tokens, top-{info['k']} logprobs at "
          f"T = 1, tails at T in {info['temperatures']} (tokenizer {spec})")
    print(f"saved: {info['path']}")
    return 0
