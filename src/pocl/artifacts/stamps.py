"""Stamps: what an artifact was computed from, its hash, and why a stored one no longer applies.

A :class:`Stamp` holds the readable inputs of an artifact (the model's fingerprint, the data's hash,
the settings ...). Its :attr:`Stamp.hash` is :func:`pocl.fingerprints.stamp_hash` of those inputs, the
value stored next to the artifact; an artifact is reused only while the stored hash equals the
current one. When they differ, :meth:`Stamp.why_stale` compares the stored inputs with the current
ones and says what changed in plain words (``teacher (fingerprint) 'a1' -> 'b2', dtype 'float32' ->
'bfloat16'``), the line the log and the error messages show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pocl.fingerprints import stamp_hash

__all__ = ["Stamp", "describe_changes"]


def _fmt(value: Any) -> str:
    return "None" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "",
                     labels: Mapping[str, str] | None = None, *, quote: bool = False) -> list[str]:
    """``key old -> new`` for every differing key, current keys first; nested dicts by their own keys
    (``a.b 1 -> 2``). ``labels`` gives a readable name for a (dotted) key; ``quote`` writes the values
    with ``repr`` (``'a' -> 'b'``) instead of plainly."""
    labels = labels or {}
    show = repr if quote else _fmt
    keys = [k for k in new if k in old] + [k for k in new if k not in old] + [k for k in old if k not in new]
    out = []
    for k in dict.fromkeys(keys):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        name = labels.get(f"{prefix}{k}", f"{prefix}{k}")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += describe_changes(a, b, f"{prefix}{k}.", labels, quote=quote)
        elif a is None and isinstance(b, Mapping):  # a stamp from before the key existed
            out.append(f"{name} not recorded -> {len(b)} settings")
        else:
            out.append(f"{name} {show(a)} -> {show(b)}")
    return out


@dataclasses.dataclass(frozen=True)
class Stamp:
    """The inputs an artifact depends on (a JSON-able mapping) and readable names for some keys.

    ``Stamp(inputs).hash`` is stored with the artifact; ``why_stale(stored_inputs)`` explains a
    mismatch. Two stamps with equal inputs have equal hashes whatever their labels."""

    inputs: Mapping[str, Any]
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def hash(self) -> str:
        """:func:`pocl.fingerprints.stamp_hash` of the inputs (16 hex digits)."""
        return stamp_hash(dict(self.inputs))

    def matches(self, stored_hash: Any) -> bool:
        """Whether an artifact stored with ``stored_hash`` was computed from these inputs."""
        return stored_hash == self.hash

    def changes(self, stored_inputs: Mapping[str, Any] | None) -> list[str]:
        """One line per input that differs from ``stored_inputs`` (nested keys dotted), values quoted."""
        return describe_changes(dict(stored_inputs or {}), dict(self.inputs), labels=self.labels, quote=True)

    def why_stale(self, stored_inputs: Mapping[str, Any] | None, *, default: str = "another stamp") -> str:
        """What differs between the stored inputs and these, in words (``default`` when the stored
        inputs are missing or equal: an artifact whose hash differs for a reason the inputs do not show)."""
        return ", ".join(self.changes(stored_inputs)) or default
