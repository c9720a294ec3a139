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
``Record.meta``. A JSON ``null`` counts as an absent field. Conversation rows (``messages``, or TRL's
``prompt``/``completion``) are parsed by :mod:`pocl.data.chat` into ``Record.conversation``.

Every bad row raises :class:`pocl.errors.DataError` naming the file, the 1-based line and the
field, unless ``skip_invalid=True``; then it is reported in ``LoadResult.skipped`` and logged.
Nothing is skipped silently.

The sources are read by :mod:`pocl.data.readers`; this module validates their rows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pocl.errors import DataError

from .chat import Conversation, completion_as_output, parse_conversation, row_kind
from .readers import BadRaw, RowError, resolve_source, type_name

logger = logging.getLogger("pocl.data")

#: accepted spellings of each field, in order of preference
INPUT_KEYS = ("input", "context")
OUTPUT_KEYS = ("output", "response")
INSTRUCTION_KEY = "instruction"
PROMPT_KEY = "prompt"
DEFAULT_ID_KEY = "id"

@dataclass(frozen=True)
class Record:
    """One instruction sample.

    ``output`` is ``""`` for a row without an output (only possible with
    ``require_output=False``); a present output is never empty. It is a tuple of references for
    evaluation sets whose output is a list (S-NI, UnNI). ``line`` is the 1-based line in a JSONL
    file, the 1-based element index in a JSON array, or the 1-based row of a ``datasets`` dataset.

    ``conversation`` is set for a conversation row (:mod:`pocl.data.chat`): its turns before the
    final assistant turn, whose content is ``output``; ``instruction`` is then ``""``.
    """

    id: str
    instruction: str
    input: str = ""
    output: str | tuple[str, ...] = ""
    prompt: str | None = None
    source: str = ""
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    conversation: Conversation | None = field(default=None, hash=False)

    @property
    def messages(self) -> list[dict[str, Any]] | None:
        """A conversation's turns, the final assistant turn (the output) included; None otherwise."""
        if self.conversation is None:
            return None
        turns = [dict(m) for m in self.conversation.messages]
        if self.has_output:
            turns.append({"role": "assistant", "content": self.target})
        return turns

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


def _pick(row: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The one present (non-null) spelling of a field; two present spellings are an error."""
    present = [k for k in keys if row.get(k) is not None]
    if len(present) > 1:
        raise RowError(present[1], f"both '{present[0]}' and '{present[1]}' are given; "
                                   f"they spell the same field, keep one")
    if not present:
        return None, None
    return present[0], row[present[0]]


def _row_id(row: Mapping[str, Any], id_key: str, explicit_field: bool, index: int) -> str:
    value = row.get(id_key)
    if value is None:
        if explicit_field:
            raise RowError(id_key, f"missing id (id_field='{id_key}' was requested)")
        return f"{index:06d}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(id_key, f"id must be a string or an integer, got {type_name(value)}")
    value = str(value)
    if not value.strip():
        raise RowError(id_key, "id is empty")
    return value


def parse_row(row: Any, *, index: int, line: int, source: str, id_key: str,
              explicit_id: bool, require_output: bool) -> Record:
    if not isinstance(row, Mapping):
        raise RowError(None, f"row is not a JSON object (got {type_name(row)})")
    for key in row:
        if not isinstance(key, str):  # not possible from JSON; guards datasets rows
            raise RowError(None, f"row has a non-string key {key!r}")
    rid = _row_id(row, id_key, explicit_id, index)
    kind = row_kind(row)
    if kind == "conversation":
        conversation, output_text, meta = parse_conversation(row, id_key=id_key, require_output=require_output)
        return Record(id=rid, instruction="", output=output_text, source=source, line=line, meta=meta,
                      conversation=conversation)
    if kind == "completion":  # TRL's standard prompt/completion: the completion is the output
        row = completion_as_output(row)

    prompt = row.get(PROMPT_KEY)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise RowError(PROMPT_KEY, f"must be a string, got {type_name(prompt)}")
        if not prompt.strip():
            raise RowError(PROMPT_KEY, "prompt is empty")

    instruction = row.get(INSTRUCTION_KEY)
    if instruction is None:
        if prompt is None:
            raise RowError(INSTRUCTION_KEY, "missing instruction (and no ready-made 'prompt')")
        instruction = ""
    elif not isinstance(instruction, str):
        raise RowError(INSTRUCTION_KEY, f"must be a string, got {type_name(instruction)}")
    elif not instruction.strip() and prompt is None:
        raise RowError(INSTRUCTION_KEY, "instruction is empty")

    input_key, input_value = _pick(row, INPUT_KEYS)
    if input_value is None:
        input_value = ""
    elif not isinstance(input_value, str):
        raise RowError(input_key, f"must be a string, got {type_name(input_value)}")

    output_key, output_value = _pick(row, OUTPUT_KEYS)
    output: str | tuple[str, ...]
    if output_value is None:
        if require_output:
            raise RowError("output", "missing output (spelled 'output' or 'response')")
        output = ""
    elif isinstance(output_value, str):
        if not output_value.strip():
            raise RowError(output_key, "output is empty or whitespace only")
        output = output_value
    elif isinstance(output_value, (list, tuple)):
        if not output_value:
            raise RowError(output_key, "output is an empty list of references")
        for j, ref in enumerate(output_value):
            if not isinstance(ref, str):
                raise RowError(output_key, f"reference {j} of the output list must be a "
                                           f"string, got {type_name(ref)}")
            if not ref.strip():
                raise RowError(output_key, f"reference {j} of the output list is empty")
        output = tuple(output_value)
    else:
        raise RowError(output_key, "must be a string or a list of strings, got "
                                   f"{type_name(output_value)}")

    known = {INSTRUCTION_KEY, PROMPT_KEY, id_key, *INPUT_KEYS, *OUTPUT_KEYS}
    meta = {k: v for k, v in row.items() if k not in known}
    return Record(id=rid, instruction=instruction, input=input_value, output=output,
                  prompt=prompt, source=source, line=line, meta=meta)


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
    name, raws = resolve_source(source, split)

    records: list[Record] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for index, (line, raw) in enumerate(raws):
        n_rows += 1
        try:
            if isinstance(raw, BadRaw):
                raise raw.error
            record = parse_row(raw, index=index, line=line, source=name, id_key=id_key,
                               explicit_id=id_field is not None, require_output=require_output)
        except RowError as e:
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
