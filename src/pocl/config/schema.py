"""Typed, validated configuration shared by the CLI, YAML files and the Python API.

Each config section is a dataclass whose fields carry their documentation in
``metadata["help"]``; the same text becomes the ``--flag`` help of the CLI and documents the YAML
key of the same name. Sections validate their values on construction (``__post_init__``) and raise
:class:`pocl.errors.ConfigError` naming ``section.field``.

Precedence when building a config: dataclass defaults < YAML file < command-line flags.

An optional field (one whose default or meaning includes None, "Empty: ..." in its help) is set to None
by YAML null, by an empty string in YAML, and by an empty flag value (``--skew-last-stage ''``); see
:func:`coerce`.

A section built by :meth:`ConfigSection.from_dict` (YAML files, flags, ``DistillConfig.from_dict``)
remembers which fields were *given* (:meth:`ConfigSection.given_fields`), as opposed to left at
their defaults: some settings mean something else, or nothing, in some runs (``--epochs`` under the
POCL curriculum), and a value the user gave must never be ignored without a word.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from pocl.errors import ConfigError, suggest


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           flag: str | None = None, cli: bool = True, metavar: str | None = None,
           affects_weights: bool = True) -> Any:
    """A dataclass field with its documentation (``help``) and CLI settings.

    ``flag`` overrides the generated flag name (``--field-name``); ``cli=False`` keeps a field out
    of the command line (it can still be set from YAML or Python). ``affects_weights=False`` marks a
    setting that never changes the trained weights (output, logging, checkpoint cadence, checks before
    training): it is left out of the training hash, and a resumed run may change it
    (:func:`weight_free_fields`).
    """
    metadata = {"help": help, "flag": flag, "cli": cli, "metavar": metavar, "affects_weights": affects_weights}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def weight_free_fields(section: Any) -> tuple[str, ...]:
    """The fields of a config section (class or instance) declared ``option(..., affects_weights=False)``,
    in declaration order."""
    return tuple(f.name for f in dataclasses.fields(section) if not f.metadata.get("affects_weights", True))


class ConfigSection:
    """Mixin of the config dataclasses: type coercion, validation helpers, dict round trip."""

    section_name: typing.ClassVar[str] = ""

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "") -> ConfigSection:
        """Build the section from a mapping, coercing YAML scalars to the field types.

        Unknown keys raise a ConfigError that suggests the nearest valid key.
        """
        prefix = where or cls.section_name
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key '{prefix}.{key}'{suggest(key, fields)}; valid keys: "
                                  f"{', '.join(fields)}")
            kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
        section = cls(**kwargs)
        section._set_given(kwargs)
        return section

    # -- which values were given ----------------------------------------------------------------
    _GIVEN_ATTR: typing.ClassVar[str] = "_pocl_given_fields"

    def _set_given(self, names) -> None:
        object.__setattr__(self, self._GIVEN_ATTR, frozenset(names))

    def given_fields(self) -> frozenset[str]:
        """The names of the fields that were given rather than left at their defaults.

        Exact for a section built by :meth:`from_dict` (YAML, flags, ``DistillConfig.from_dict``):
        the keys it was given, whatever their values. For a section constructed directly
        (``LossConfig(alpha=0.5)``) the keyword arguments are not recorded; the fields whose values
        differ from the defaults are reported (a value given equal to its default cannot be told
        apart from a default)."""
        given = self.__dict__.get(self._GIVEN_ATTR)
        if given is not None:
            return given
        out = set()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                out.add(f.name)
                continue
            if getattr(self, f.name) != default:
                out.add(f.name)
        return frozenset(out)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if strip_optional(hints[f.name]) is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # 20 and 20.0 are the same setting (and the same config hash)
            if isinstance(value, ConfigSection):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, list):
                value = [v.to_dict() if isinstance(v, ConfigSection) else v for v in value]
            out[f.name] = value
        return out

    # -- validation helpers used by __post_init__ -----------------------------------------------
    def _fail(self, name: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.section_name}.{name}: {message} (got {getattr(self, name)!r})")

    def _check(self, condition: bool, name: str, message: str) -> None:
        if not condition:
            self._fail(name, message)

    def _check_literal(self, name: str) -> None:
        hint = typing.get_type_hints(type(self))[name]
        choices = literal_choices(hint)
        value = getattr(self, name)
        if choices is not None and value not in choices and not (value is None and allows_none(hint)):
            self._fail(name, f"must be one of {', '.join(map(str, choices))}{suggest(str(value), map(str, choices))}")


def literal_choices(hint: Any) -> tuple | None:
    """Choices of a ``Literal[...]`` (or ``Literal[...] | None``) type hint, else None."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) in (typing.Union, types.UnionType):
        for arg in get_args(hint):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def allows_none(hint: Any) -> bool:
    """``X | None`` (or ``Optional[X]``): the field may be None."""
    return get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)


def strip_optional(hint: Any) -> Any:
    """``X`` of ``X | None``; any other hint unchanged."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def is_empty(value: Any) -> bool:
    """An empty (or blank) string: ``--flag ''`` on the command line, ``key: ""`` in YAML."""
    return isinstance(value, str) and not value.strip()


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the type ``hint``; raise ConfigError naming ``where``.

    A field that may be None (``float | None``, ``str | None``...) takes None from YAML null (``key:`` or
    ``key: null``) and from an empty string (``--skew-last-stage ''``, ``key: ""``): "Empty" in a field's
    help is that None (``--skew-last-stage`` empty: ``--skew`` in every stage). A field that may not be None
    refuses both."""
    if value is None or (is_empty(value) and allows_none(hint)):
        if allows_none(hint):
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    base = strip_optional(hint)
    origin = get_origin(base)
    if is_empty(value) and base in (int, float, bool):
        raise ConfigError(f"{where}: a value is required (got an empty string)")
    try:
        if base is Any:
            return value
        if origin is Literal:
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError("expected true or false")
        if base is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer, got a boolean")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError("expected a number, got a boolean")
            number = float(value)  # also parses "1e-4", which YAML 1.1 reads as a string
            if not math.isfinite(number):
                # No setting means anything at NaN or infinity (--epochs inf would crash the step count).
                raise ValueError("expected a finite number")
            return number
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            return str(value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list")
            args = get_args(base)
            item = args[0] if args else Any
            items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, Mapping):
                raise ValueError("expected a mapping")
            return dict(value)
        if isinstance(base, type) and issubclass(base, ConfigSection):
            if isinstance(value, base):
                return value
            if not isinstance(value, Mapping):
                raise TypeError("expected a mapping")
            return base.from_dict(value, where=where)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}: {exc} (got {value!r})") from None
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (dict keys sorted), as hex."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
