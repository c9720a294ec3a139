"""Reading raw rows from instruction-data sources, before any row is validated.

Each reader yields ``(line, row)`` pairs: ``line`` is the 1-based line of a JSONL file, the 1-based
element index of a JSON array, or the 1-based row of a ``datasets`` dataset; ``row`` is the decoded
value, or a :class:`BadRaw` when the row could not even be decoded (bad UTF-8, bad JSON).
File-level problems (a missing or unreadable path, an empty file, a JSON document that holds no
rows) raise :class:`pocl.errors.DataError`. :func:`resolve_source` picks the reader for a source;
:mod:`pocl.data.records` validates the rows into :class:`~pocl.data.records.Record` objects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pocl.errors import DataError

_JSON_SUFFIXES = (".jsonl", ".json")
# suffixes that mark a source as a local path even when it does not exist (never a hub name)
_PATH_SUFFIXES = _JSON_SUFFIXES + (".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip")


class RowError(Exception):
    """A problem with one row: the field it concerns (``None`` for the whole row) and why."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# raw row readers: each yields (line, row or BadRaw)

#: a raw row: (1-based line, decoded value or a BadRaw)
RawRow = tuple[int, Any]


class BadRaw:
    """A row that could not even be decoded (bad UTF-8, bad JSON)."""

    def __init__(self, field: str | None, reason: str):
        self.error = RowError(field, reason)


def read_jsonl(path: Path) -> Iterator[RawRow]:
    """The rows of a JSON Lines file, by 1-based line; blank lines are not rows."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=str(path)) from None
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte order mark
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, BadRaw(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                       f"column {e.start + 1}): {e.reason}")
            continue
        if not text.strip():
            continue  # blank lines are not rows
        try:
            value = json.loads(text)
        except RecursionError:
            yield number, BadRaw(None, "invalid JSON: nested too deeply")
            continue
        except ValueError as e:  # JSONDecodeError, and int strings past the digit limit
            yield number, BadRaw(None, f"invalid JSON: {e}")
            continue
        yield number, value


def read_json(path: Path, split: str | None) -> Iterator[RawRow]:
    """The rows of a JSON array (or of an object's list-valued key), by 1-based element index."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path=str(path)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{data[e.start]:02x}): {e.reason}",
                        path=str(path), line=line) from None
    if not text.strip():
        raise DataError("no rows: the file is empty", path=str(path))
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply", path=str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (line {e.lineno} column {e.colno})",
                        path=str(path), line=e.lineno) from None
    except ValueError as e:
        raise DataError(f"invalid JSON: {e}", path=str(path)) from None
    if isinstance(value, dict):
        lists = {k: v for k, v in value.items() if isinstance(v, list)}
        if split is not None and split in lists:
            value = lists[split]
        elif len(lists) == 1:
            value = next(iter(lists.values()))
        else:
            keys = ", ".join(repr(k) for k in value) or "none"
            what = "no list-valued key" if not lists else "several list-valued keys"
            hint = "; pass split= to choose one" if lists else ""
            raise DataError(f"a JSON object must hold the rows under one list-valued key "
                            f"(e.g. 'data'); found {what} (keys: {keys}){hint}", path=str(path))
    if not isinstance(value, list):
        raise DataError(f"expected a JSON array of objects, got {type_name(value)}",
                        path=str(path))
    yield from enumerate(value, start=1)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _iter_hf(dataset: Any) -> Iterator[RawRow]:
    yield from enumerate(dataset, start=1)


def _saved_dataset_has_no_shards(path: Path, split: str | None) -> bool:
    """datasets cannot load an empty saved dataset (no shards); recognise one."""
    state = path / (split or "train") / "state.json"
    if not (path / "dataset_dict.json").is_file():
        state = path / "state.json"
    try:
        return json.loads(state.read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _load_saved_dataset(path: Path, split: str | None) -> Any:
    import datasets  # imported lazily: it is slow to import

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure of a foreign loader is a data problem
        if _saved_dataset_has_no_shards(path, split):
            raise DataError("no rows: the saved dataset is empty", path=str(path)) from None
        raise DataError(f"cannot load the saved dataset: {type(e).__name__}: {e}",
                        path=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(f"split '{name}' not found; available splits: "
                            f"{', '.join(sorted(loaded))}", path=str(path))
        return loaded[name]
    return loaded


def _load_hub_dataset(name: str, split: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"'{name}' is not a local file or directory, and loading it as a Hugging Face hub "
            f"dataset failed ({type(e).__name__}: {e}). Check the path; if it is a hub name, "
            "it was not found locally and offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) "
            "may be on or the network unreachable.", path=name) from None


def _looks_like_path(source: str) -> bool:
    s = source.strip()
    return (s.lower().endswith(_PATH_SUFFIXES) or os.path.isabs(s) or s.startswith((".", "~"))
            or "\\" in s or s.count("/") > 1)


def _split_files(path: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for suffix in _JSON_SUFFIXES:  # .jsonl wins over .json
        for f in sorted(path.glob(f"*{suffix}")):
            if f.is_file():
                found.setdefault(f.name[: -len(suffix)], f)
    return found


def resolve_source(source: str | os.PathLike, split: str | None) -> tuple[str, Iterable[RawRow]]:
    """Return (source name, raw rows) of a file, a directory or a hub dataset name."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".jsonl"):
            return str(path), read_jsonl(path)
        if name.endswith(".json"):
            return str(path), read_json(path, split)
        raise DataError("unsupported file type; expected .jsonl or .json (or a directory "
                        "written by datasets' save_to_disk)", path=str(path))
    if path.is_dir():
        if _is_saved_dataset(path):
            return str(path), _iter_hf(_load_saved_dataset(path, split))
        files = _split_files(path)
        name = split or "train"
        if name in files:
            f = files[name]
            reader = read_jsonl(f) if f.name.lower().endswith(".jsonl") else read_json(f, None)
            return str(f), reader
        available = ", ".join(sorted(files)) or "none"
        raise DataError(f"directory has no '{name}.jsonl' or '{name}.json' and is not a saved "
                        f"datasets directory; available splits: {available}", path=str(path))
    if path.exists():
        raise DataError("not a regular file or directory", path=str(path))
    if _looks_like_path(text):
        raise DataError("no such file or directory", path=text)
    return text, _iter_hf(_load_hub_dataset(text, split))
