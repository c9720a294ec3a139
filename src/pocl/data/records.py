"""Loading instruction rows into :class:`Record` objects.

Accepted sources (see ``docs/data.md``):

* ``*.jsonl`` -- one JSON object per line; blank lines are allowed and are not rows;
* ``*.json`` -- a JSON array of objects, or an object whose single list-valued key holds them
  (``{"data": [...]}``; with ``split`` given, ``{"train": [...], "test": [...]}`` works too);
* a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a directory holding ``{split}.jsonl`` or ``{split}.json``;
* otherwise a Hugging Face hub dataset name (``datasets.load_dataset``).

Field spellings (keys are case-sensitive): ``instruction``; ``input`` or ``context``; ``output`` or
``response``; ``prompt`` (a ready-made prompt); ``id`` (or ``id_field``). Every other key goes to
``Record.meta``. A JSON ``null`` counts as an absent field.

Every bad row raises :class:`pocl.errors.DataError` naming the file, the 1-based line and the
field, unless ``skip_invalid=True``; then it is reported in ``LoadResult.skipped`` and logged.
Nothing is skipped silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocl.errors import DataError

logger = logging.getLogger("pocl.data")

#: accepted spellings of each field, in order of preference
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "response")
INSTRUCTION_KEY = "instruction"
PROMPT_KEY = "prompt"
DEFAULT_ID_KEY = "id"

_JSON_SUFFIXES = (".jsonl", ".json")
# suffixes that mark a source as a local path even when it does not exist (never a hub name)
_PATH_SUFFIXES = _JSON_SUFFIXES + (".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip")


@dataclass(frozen=True)
class Record:
    """One instruction sample.

    ``output`` is ``""`` for a row without an output (only possible with
    ``require_output=False``); a present output is never empty. It is a tuple of references for
    evaluation sets whose output is a list (S-NI, UnNI). ``line`` is the 1-based line in a JSONL
    file, the 1-based element index in a JSON array, or the 1-based row of a ``datasets`` dataset.
    """

    id: str
    instruction: str
    input: str = ""
    output: str | tuple[str, ...] = ""
    prompt: str | None = None
    source: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def references(self) -> list[str]:
        """All reference outputs (``[]`` when the row has no output)."""
        if isinstance(self.output, tuple):
            return list(self.output)
        return [self.output] if self.output else []

    @property
    def has_output(self) -> bool:
        return bool(self.references)

    @property
    def target(self) -> str:
        """The training target: the output, or its first reference when it is a list."""
        refs = self.references
        return refs[0] if refs else ""

    def where(self) -> str:
        """``"source:line (id X)"`` for messages."""
        return f"{self.source}:{self.line} (id {self.id})"


@dataclass(frozen=True)
class SkippedRow:
    """A row that ``skip_invalid=True`` left out, and why."""

    line: int
    id: str
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line} (id {self.id})"
        if self.field:
            where += f" field '{self.field}'"
        return f"{where}: {self.reason}"


@dataclass
class LoadResult:
    """The valid records of a source and the rows that were skipped."""

    records: list[Record]
    skipped: list[SkippedRow] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def summary(self, max_listed: int = 20) -> str:
        """A one-line account of the skipped rows: the count and their ids and lines."""
        if not self.skipped:
            return f"{self.source}: loaded {len(self.records)} rows, skipped none"
        listed = ", ".join(f"{s.id} (line {s.line})" for s in self.skipped[:max_listed])
        more = len(self.skipped) - max_listed
        if more > 0:
            listed += f", and {more} more"
        return (f"{self.source}: loaded {len(self.records)} rows, skipped {len(self.skipped)} "
                f"invalid row{'s' if len(self.skipped) != 1 else ''}: {listed}")


_NATURAL_SPLIT = re.compile(r"(\d+)")


def id_sort_key(id: str) -> tuple:
    """Natural sort key for ids: digit runs compare as integers (``"2" < "10"``,
    ``"train-9" < "train-10"``). A total, deterministic order: ``"02"`` and ``"2"`` differ."""
    key = []
    for i, part in enumerate(_NATURAL_SPLIT.split(str(id))):
        if not part:
            continue
        if i % 2:  # a digit run
            key.append((0, int(part), part))
        else:
            key.append((1, 0, part))
    return tuple(key)


# ---------------------------------------------------------------------------------------------
# row validation


class _RowError(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _type_name(value: Any) -> str:
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


def _pick(row: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The one present (non-null) spelling of a field; two present spellings are an error."""
    present = [k for k in keys if row.get(k) is not None]
    if len(present) > 1:
        raise _RowError(present[1], f"both '{present[0]}' and '{present[1]}' are given; "
                                    f"they spell the same field, keep one")
    if not present:
        return None, None
    return present[0], row[present[0]]


def _row_id(row: Mapping[str, Any], id_key: str, explicit_field: bool, index: int) -> str:
    value = row.get(id_key)
    if value is None:
        if explicit_field:
            raise _RowError(id_key, f"missing id (id_field='{id_key}' was requested)")
        return f"{index:06d}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(id_key, f"id must be a string or an integer, got {_type_name(value)}")
    value = str(value)
    if not value.strip():
        raise _RowError(id_key, "id is empty")
    return value


def _parse_row(row: Any, *, index: int, line: int, source: str, id_key: str,
               explicit_id: bool, require_output: bool) -> Record:
    if not isinstance(row, Mapping):
        raise _RowError(None, f"row is not a JSON object (got {_type_name(row)})")
    for key in row:
        if not isinstance(key, str):  # not possible from JSON; guards datasets rows
            raise _RowError(None, f"row has a non-string key {key!r}")
    rid = _row_id(row, id_key, explicit_id, index)

    prompt = row.get(PROMPT_KEY)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _RowError(PROMPT_KEY, f"must be a string, got {_type_name(prompt)}")
        if not prompt.strip():
            raise _RowError(PROMPT_KEY, "prompt is empty")

    instruction = row.get(INSTRUCTION_KEY)
    if instruction is None:
        if prompt is None:
            raise _RowError(INSTRUCTION_KEY, "missing instruction (and no ready-made 'prompt')")
        instruction = ""
    elif not isinstance(instruction, str):
        raise _RowError(INSTRUCTION_KEY, f"must be a string, got {_type_name(instruction)}")
    elif not instruction.strip() and prompt is None:
        raise _RowError(INSTRUCTION_KEY, "instruction is empty")

    input_key, input_value = _pick(row, INPUT_KEYS)
    if input_value is None:
        input_value = ""
    elif not isinstance(input_value, str):
        raise _RowError(input_key, f"must be a string, got {_type_name(input_value)}")

    output_key, output_value = _pick(row, OUTPUT_KEYS)
    output: str | tuple[str, ...]
    if output_value is None:
        if require_output:
            raise _RowError("output", "missing output (spelled 'output' or 'response')")
        output = ""
    elif isinstance(output_value, str):
        if not output_value.strip():
            raise _RowError(output_key, "output is empty or whitespace only")
        output = output_value
    elif isinstance(output_value, (list, tuple)):
        if not output_value:
            raise _RowError(output_key, "output is an empty list of references")
        for j, ref in enumerate(output_value):
            if not isinstance(ref, str):
                raise _RowError(output_key, f"reference {j} of the output list must be a "
                                            f"string, got {_type_name(ref)}")
            if not ref.strip():
                raise _RowError(output_key, f"reference {j} of the output list is empty")
        output = tuple(output_value)
    else:
        raise _RowError(output_key, "must be a string or a list of strings, got "
                                    f"{_type_name(output_value)}")

    known = {INSTRUCTION_KEY, PROMPT_KEY, id_key, *INPUT_KEYS, *OUTPUT_KEYS}
    meta = {k: v for k, v in row.items() if k not in known}
    return Record(id=rid, instruction=instruction, input=input_value, output=output,
                  prompt=prompt, source=source, line=line, meta=meta)


# ---------------------------------------------------------------------------------------------
# raw row readers: each yields (line, row or _RowError)

_Raw = tuple[int, Any]


class _BadRaw:
    """A row that could not even be decoded (bad UTF-8, bad JSON)."""

    def __init__(self, field: str | None, reason: str):
        self.error = _RowError(field, reason)


def _read_jsonl(path: Path) -> Iterator[_Raw]:
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
            yield number, _BadRaw(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                        f"column {e.start + 1}): {e.reason}")
            continue
        if not text.strip():
            continue  # blank lines are not rows
        try:
            value = json.loads(text)
        except RecursionError:
            yield number, _BadRaw(None, "invalid JSON: nested too deeply")
            continue
        except ValueError as e:  # JSONDecodeError, and int strings past the digit limit
            yield number, _BadRaw(None, f"invalid JSON: {e}")
            continue
        yield number, value


def _read_json(path: Path, split: str | None) -> Iterator[_Raw]:
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
        raise DataError(f"expected a JSON array of objects, got {_type_name(value)}",
                        path=str(path))
    for number, row in enumerate(value, start=1):
        yield number, row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _iter_hf(dataset: Any) -> Iterator[_Raw]:
    for number, row in enumerate(dataset, start=1):
        yield number, row


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


def _resolve(source: str | os.PathLike, split: str | None) -> tuple[str, Iterable[_Raw]]:
    """Return (source name, raw rows)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".jsonl"):
            return str(path), _read_jsonl(path)
        if name.endswith(".json"):
            return str(path), _read_json(path, split)
        raise DataError("unsupported file type; expected .jsonl or .json (or a directory "
                        "written by datasets' save_to_disk)", path=str(path))
    if path.is_dir():
        if _is_saved_dataset(path):
            return str(path), _iter_hf(_load_saved_dataset(path, split))
        files = _split_files(path)
        name = split or "train"
        if name in files:
            f = files[name]
            reader = _read_jsonl(f) if f.name.lower().endswith(".jsonl") else _read_json(f, None)
            return str(f), reader
        available = ", ".join(sorted(files)) or "none"
        raise DataError(f"directory has no '{name}.jsonl' or '{name}.json' and is not a saved "
                        f"datasets directory; available splits: {available}", path=str(path))
    if path.exists():
        raise DataError("not a regular file or directory", path=str(path))
    if _looks_like_path(text):
        raise DataError("no such file or directory", path=text)
    return text, _iter_hf(_load_hub_dataset(text, split))


def load_records(source: str | os.PathLike, *, split: str | None = None,
                 skip_invalid: bool = False, require_output: bool = True,
                 id_field: str | None = None) -> LoadResult:
    """Load instruction rows from a file, a directory or a hub dataset.

    ``split`` chooses a split of a DatasetDict / a split file in a directory / a hub dataset
    (default ``"train"``). With ``skip_invalid`` an invalid row is reported in
    ``LoadResult.skipped`` (and logged) instead of raising; file-level problems (a missing path,
    an unreadable or empty source, no valid row at all, duplicate ids) always raise
    :class:`DataError`. ``require_output=False`` accepts rows without an output (their
    ``Record.output`` is ``""``); ``id_field`` names the id key and makes it required.
    """
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        raise DataError(f"id_field must be a non-empty string, got {id_field!r}")
    id_key = id_field or DEFAULT_ID_KEY
    name, raws = _resolve(source, split)

    records: list[Record] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for index, (line, raw) in enumerate(raws):
        n_rows += 1
        try:
            if isinstance(raw, _BadRaw):
                raise raw.error
            record = _parse_row(raw, index=index, line=line, source=name, id_key=id_key,
                                explicit_id=id_field is not None, require_output=require_output)
        except _RowError as e:
            if not skip_invalid:
                raise DataError(e.reason, path=name, line=line, field=e.field) from None
            rid = _best_effort_id(raw, id_key, index)
            skipped.append(SkippedRow(line=line, id=rid, field=e.field, reason=e.reason))
            continue
        if record.id in seen:
            raise DataError(f"duplicate id '{record.id}' (also on line {seen[record.id]}); "
                            f"ids must be unique", path=name, line=line, field=id_key)
        seen[record.id] = line
        records.append(record)

    if n_rows == 0:
        raise DataError("no rows: the source is empty", path=name)
    result = LoadResult(records=records, skipped=skipped, source=name)
    if skipped:
        logger.warning("%s", result.summary())
    if not records:
        first = skipped[0]
        raise DataError(f"no valid rows: all {n_rows} rows are invalid (first: {first})",
                        path=name, line=first.line, field=first.field)
    return result


def _best_effort_id(raw: Any, id_key: str, index: int) -> str:
    if isinstance(raw, Mapping):
        value = raw.get(id_key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return f"{index:06d}"
