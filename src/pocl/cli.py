"""The ``pocl`` command line: the entry point. It assembles the parser from the commands
(``pocl.commands.*``, each with ``register(subparsers)``), sets up logging and maps errors to exit
codes. The flags are generated from the config dataclasses by :mod:`pocl.commands.flags` (re-exported
here: ``flag_name``, ``add_section_flags``, ``collect_overrides``, ``build_config``)."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Sequence

from pocl._version import __version__
from pocl.commands import COMMANDS
# Re-exported: the flag helpers lived here before pocl.commands.flags, and tests and scripts import them from here.
from pocl.commands.flags import add_section_flags, build_config, collect_overrides, flag_name  # noqa: F401
from pocl.errors import PoclError

log = logging.getLogger("pocl")

#: Libraries that give their own logger a stream handler of its own (and, huggingface_hub and datasets
#: always, transformers when CI is set, let records propagate too): each line would be printed twice.
_LIBRARY_LOGGERS = ("transformers", "huggingface_hub", "datasets")


class _OnceFilter(logging.Filter):
    """On the root handler: drop a record that a handler of a logger below the root has already
    printed (a library that installs its own handler and still propagates). Every line once."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name) if record.name and record.name != "root" else None
        while logger is not None and logger is not logging.root:
            if any(record.levelno >= h.level for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def _route_library_logs() -> None:
    """Send the log records of the libraries in :data:`_LIBRARY_LOGGERS` that are loaded to pocl's handler
    only (their own default stream handlers are removed): one copy of each line, in pocl's format, on
    the stream pocl logs to. A library loaded later is deduplicated by :class:`_OnceFilter`."""
    for name in _LIBRARY_LOGGERS:
        if name not in sys.modules:
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING  # in multi-process runs only the main process reports progress
    logging.basicConfig(level=level, format="[%(name)s] %(message)s", stream=sys.stderr, force=True)
    for handler in logging.root.handlers:
        handler.addFilter(_OnceFilter())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers  # also loads huggingface_hub, which installs its own handler on import

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    _route_library_logs()


class PoclArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that refuses abbreviated flags (``--diverg`` for ``--divergence``) and reports a
    bad command line as one line plus a hint, not the usage block: ``pocl distill: error: MESSAGE (see
    pocl distill --help)``, exit status 2. Subparsers are made of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """'unrecognized argument --divergnce; did you mean --divergence?' for the flags (or, with none, the
    other arguments) in ``extras`` that ``parser`` does not know."""
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-") and e != "-"]
    named = flags or list(extras)
    message = f"unrecognized argument{'s' if len(named) > 1 else ''} {', '.join(named)}"
    if flags:
        known = {opt.lstrip("-"): opt for action in parser._actions for opt in action.option_strings
                 if opt.startswith("--")}
        close = difflib.get_close_matches(flags[0].lstrip("-"), list(known), n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {known[close[0]]}?"
    return message


def make_parser() -> argparse.ArgumentParser:
    parser = PoclArgumentParser(
        prog="pocl",
        description="White-box knowledge distillation of causal LMs with the POCL curriculum.",
        epilog="Run `pocl distill` with no model or data arguments to train and distil the built-in default "
               "on the built-in task suite. Docs: README.md and docs/.")
    parser.add_argument("--version", action="version", version=f"pocl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=PoclArgumentParser)
    for register in COMMANDS:
        register(sub)
    for command_parser in sub.choices.values():  # also where a command passes its own parser settings
        command_parser.allow_abbrev = False
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` whose unknown flags get a did-you-mean from the command's own flags."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = getattr(args, "command", None)
        sub = _subparsers(parser).get(command) if command else None
        target = sub or parser
        target.error(unrecognized_message(target, extras))
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # A command that runs other pocl command lines in this process (`pocl matrix --in-process`) does so
    # through this function; it cannot import pocl.cli, which imports every command.
    args.pocl_main = main
    _setup_logging(getattr(args, "verbose", False))
    installed, previous = _sigterm_as_ctrl_c()
    try:
        return args.func(args)
    except PoclError as exc:
        print(f"pocl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not a file or folder of the user's: a bug or an unexpected failure
            raise
        print(f"pocl: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocl: interrupted", file=sys.stderr)
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


#: What the innermost function of a failed file operation was doing, for the one-line message.
_FILE_OPERATIONS = {"mkdir": "create the folder", "makedirs": "create the folder", "write_text": "write",
                    "write_bytes": "write", "touch": "create", "replace": "move", "rename": "move",
                    "move": "move", "unlink": "remove", "rmdir": "remove", "rmtree": "remove", "copy": "copy to",
                    "copy2": "copy to", "copyfile": "copy to", "copytree": "copy to", "open": "open",
                    "read_text": "read", "read_bytes": "read"}


def os_error_message(exc: OSError) -> str:
    """'cannot create the folder runs/x: Permission denied (errno 13)': a failed file operation on a path
    the user gave (an unwritable --output-dir, a parent that is a file, a full disk), without a traceback.
    The operation is named from the innermost known function of the traceback (default: 'access')."""
    operation = "access"
    tb, names = exc.__traceback__, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    for name in reversed(names):
        if name in _FILE_OPERATIONS:
            operation = _FILE_OPERATIONS[name]
            break
    target = str(exc.filename) + (f" -> {exc.filename2}" if getattr(exc, "filename2", None) else "")
    reason = exc.strerror or type(exc).__name__
    errno = f" (errno {exc.errno})" if exc.errno is not None else ""
    return f"cannot {operation} {target}: {reason}{errno}"


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
