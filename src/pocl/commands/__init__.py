"""Subcommands of the ``pocl`` CLI. Each module has ``register(subparsers)``, which adds its parser
and sets ``func`` to a function ``(args) -> exit code``."""

from pocl.commands import card, distill, init_student, matrix, rank
from pocl.commands import eval as eval_cmd
from pocl.commands import report as report_cmd
from pocl.commands import teacher_signal as teacher_signal_cmd

COMMANDS = [distill.register, rank.register, eval_cmd.register, report_cmd.register, init_student.register,
            matrix.register, card.register, teacher_signal_cmd.register]
