"""The ``pocl`` command line. Flags are generated from the config dataclasses (their field docs are
the help texts), so the CLI, the YAML keys and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Sequence
from typing import Any

from pocl import __version__
from pocl.configuration import ConfigSection, _allows_none, _strip_optional, coerce, literal_choices
from pocl.errors import ConfigError, PoclError

log = logging.getLogger("pocl")


# ---------------------------------------------------------------------------------------- flags
def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_section_flags(parser: argparse.ArgumentParser, section: type[ConfigSection], title: str,
                      exclude: Sequence[str] = ()) -> None:
    """Add one flag per field of ``section``; values land in ``args.<section>__<field>``."""
    group = parser.add_argument_group(title, (section.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        if not f.metadata.get("cli", True) or f.name in exclude:
            continue
        hint = hints[f.name]
        base = _strip_optional(hint)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        help_text = help_text.replace("%", "%%")
        if default is not None:
            help_text += f" (default: {default})"
        dest = f"{section.section_name}__{f.name}"
        kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=help_text)
        choices = literal_choices(hint)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            kwargs["choices"] = list(choices)
        else:
            kwargs["type"] = _parser_for(hint, f.name)
            kwargs["metavar"] = f.metadata.get("metavar") or _metavar(base)
        group.add_argument(flag_name(f), **kwargs)


def _metavar(base: Any) -> str:
    return {int: "N", float: "X", str: "STR"}.get(base, "VALUE")


def _parser_for(hint: Any, name: str):
    def parse(text: str) -> Any:
        if _allows_none(hint) and text.lower() in ("none", "null"):
            return None
        try:
            return coerce(text, hint, name)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(_strip_optional(hint), "__name__", "value")
    return parse


def collect_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` of the flags the user actually gave (flags default to
    ``argparse.SUPPRESS``: a flag that was not given is absent)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "__" in key:
            section, name = key.split("__", 1)
            out.setdefault(section, {})[name] = value
    return out


# ---------------------------------------------------------------------------------------- main
def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING  # in multi-process runs only the main process reports progress
    logging.basicConfig(level=level, format="[%(name)s] %(message)s", stream=sys.stderr, force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def build_config(args: argparse.Namespace, sections=None):
    """The DistillConfig of a command: defaults < --config YAML < flags. The config remembers which
    settings the file and the flags gave (``DistillConfig.given()``), as opposed to defaults; an
    ``eval:`` section of the file (read by `pocl eval`) is ignored."""
    from pocl.config import DistillConfig

    overrides = collect_overrides(args)
    if getattr(args, "config", None):
        return DistillConfig.from_yaml(args.config, overrides)
    return DistillConfig.from_dict(overrides)


def make_parser() -> argparse.ArgumentParser:
    from pocl.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="pocl",
        description="White-box knowledge distillation of causal LMs with the POCL curriculum.",
        epilog="Run `pocl distill` with no model or data arguments to train and distil the built-in default "
               "on the built-in task suite. Docs: README.md and docs/.")
    parser.add_argument("--version", action="version", version=f"pocl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(getattr(args, "verbose", False))
    installed, previous = _sigterm_as_ctrl_c()
    try:
        return args.func(args)
    except PoclError as exc:
        print(f"pocl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocl: interrupted", file=sys.stderr)
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_ctrl_c():
    """SIGTERM (a job scheduler, `kill`, torchrun stopping its workers) behaves like Ctrl-C everywhere:
    during training the trainer's own handler saves a checkpoint and stops; outside it (loading, the
    ranking pass, writing final/) the command stops at once with exit status 130, with the ranking's
    finished batches kept. Returns (installed, the previous handler)."""
    if threading.current_thread() is not threading.main_thread():
        return False, None
    return True, signal.signal(signal.SIGTERM, _interrupt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
