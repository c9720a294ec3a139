"""Subcommands of the ``pocl`` CLI. Each module has ``register(subparsers)``, which adds its parser
and sets ``func`` to a function ``(args) -> exit code``."""

from pocl.commands import distill

COMMANDS = [distill.register]
