"""Exception types. Every error pocl raises on bad user input is a :class:`PoclError`.

The CLI prints these without a traceback (the message is meant for the user); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PoclError(Exception):
    """Base class of the errors caused by user input, files or environment."""


class ConfigError(PoclError):
    """An invalid configuration value (names the field)."""


class DataError(PoclError):
    """A bad data file or row. The message names the file, the line and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = path
        self.line = line
        self.field = field
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(where + message)


class ModelError(PoclError):
    """A model or tokenizer that cannot be loaded or does not fit the other model."""


class CheckpointError(PoclError):
    """A checkpoint, ranking file or cache that is missing, corrupt or does not match the run."""


class UnknownNameError(PoclError, KeyError):
    """A name that is not in a registry; the message suggests the nearest registered names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        name = str(name)
        known = sorted(str(k) for k in known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        message = f"unknown {kind} '{name}'"
        if close:
            message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        message += f" (known: {', '.join(known)})"
        self.name = name
        self.known = known
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def suggest(name: str, known: Iterable[str]) -> str:
    """Return ' (did you mean ...?)' for the nearest of ``known`` to ``name``, or ''. Names that are not
    strings (a YAML key such as ``1:`` or ``true:``) are compared as text."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
