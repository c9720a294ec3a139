"""Command-line flags generated from the config dataclasses (their field docs are the help texts), so
the CLI, the YAML keys and the Python API cannot drift apart; and the config a command builds from
defaults < ``--config`` YAML < flags. Used by the commands (``pocl.commands.*``) and by ``pocl.cli``;
imports neither, so there is no import cycle."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from typing import Any

from pocl.config import DistillConfig
from pocl.config.schema import ConfigSection, allows_none, coerce, literal_choices, strip_optional
from pocl.errors import ConfigError


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
        base = strip_optional(hint)
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
        elif typing.get_origin(base) is list:  # e.g. --stage-teachers A B
            item = (typing.get_args(base) or (str,))[0]
            kwargs.update(nargs="+", type=_parser_for(item, f.name), metavar=f.metadata.get("metavar") or _metavar(item))
        else:
            kwargs["type"] = _parser_for(hint, f.name)
            kwargs["metavar"] = f.metadata.get("metavar") or _metavar(base)
        group.add_argument(flag_name(f), **kwargs)


def _metavar(base: Any) -> str:
    return {int: "N", float: "X", str: "STR"}.get(base, "VALUE")


def _parser_for(hint: Any, name: str):
    def parse(text: str) -> Any:
        if allows_none(hint) and text.lower() in ("none", "null"):
            return None
        try:
            return coerce(text, hint, name)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(strip_optional(hint), "__name__", "value")
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


def build_config(args: argparse.Namespace, sections=None) -> DistillConfig:
    """The DistillConfig of a command: defaults < --config YAML < flags. The config remembers which
    settings the file and the flags gave (``DistillConfig.given()``), as opposed to defaults; an
    ``eval:`` section of the file (read by `pocl eval`) is ignored. ``sections`` is not used (kept for
    existing callers)."""
    overrides = collect_overrides(args)
    if getattr(args, "config", None):
        return DistillConfig.from_yaml(args.config, overrides)
    return DistillConfig.from_dict(overrides)
