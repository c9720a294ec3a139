"""Evaluation sets: DollyEval, SelfInst, VicunaEval, S-NI, UnNI and their variants, loaded without flags.

Accepted row layouts (JSON Lines, or a ``.json`` array; detected row by row, so one file may mix them):

1. **Instruction rows** (DollyEval, SelfInst, VicunaEval, and the MiniLLM/DistiLLM processed S-NI and
   UnNI files): ``instruction``, optional ``input``/``context`` (VicunaEval has none), ``output``/
   ``response`` as a string or a non-empty list of reference strings, optional ``prompt`` (the
   ready-made Alpaca rendering), optional ``id``. These go through :func:`pocl.data.load_records`
   unchanged, so they validate exactly as training data does.
2. **Reference-list rows**: as 1., but the references are under ``references`` or ``outputs`` (a
   string or a list of strings) instead of ``output``.
3. **Natural-Instructions rows** (the flattened S-NI layout of hub copies such as
   ``Muennighoff/natural-instructions``): ``definition`` (the task definition: a string, or a list of
   strings joined by blank lines) becomes the instruction, ``inputs`` the input, ``targets`` (a string
   or a list) the references; ``id`` and other keys are kept.

Giving two spellings of the same field in one row (``output`` and ``references``, ``instruction``
and ``definition`` ...) is an error. Every row needs at least one reference. A malformed file or
row raises :class:`pocl.errors.DataError` naming the file, the 1-based line and the field.

Not accepted: the raw per-task files of the natural-instructions repository (``{"Definition": [...],
"Instances": [...]}``): flatten them first (one row per instance).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pocl.data import Record, load_records
from pocl.data.readers import BadRaw, RowError, read_json, read_jsonl
from pocl.data.records import INPUT_KEYS, OUTPUT_KEYS, parse_row
from pocl.errors import DataError

log = logging.getLogger("pocl.eval")

#: alternative spellings: canonical field -> accepted aliases (in order of preference)
REFERENCE_ALIASES = ("references", "outputs")
SNI_KEYS = {"definition": "instruction", "inputs": "input", "targets": "output"}
ALIAS_KEYS = frozenset(REFERENCE_ALIASES) | frozenset(SNI_KEYS)


@dataclasses.dataclass
class EvalSet:
    """One evaluation set: its name, where it came from, its records and the layout it was read in."""

    name: str
    path: str
    records: list[Record]
    layout: str  # "instruction" | "references" | "natural-instructions" | "mixed"
    total_rows: int  # rows in the file, before --max-samples

    @property
    def multi_reference(self) -> bool:
        return any(isinstance(r.output, tuple) and len(r.output) > 1 for r in self.records)

    def __len__(self) -> int:
        return len(self.records)


def _row_layout(row: Any) -> str:
    if not isinstance(row, Mapping):
        return "instruction"  # load_records reports the error
    if any(row.get(k) is not None for k in SNI_KEYS):
        return "natural-instructions"
    if any(row.get(k) is not None for k in REFERENCE_ALIASES):
        return "references"
    return "instruction"


def _needs_mapping(path: Path) -> bool:
    """True when some row of a .jsonl/.json file uses an alias layout (2. or 3.)."""
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".jsonl", ".json"):
        return False
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return False  # load_records reports it with the line
    if not any(f'"{k}"' in text for k in ALIAS_KEYS):
        return False  # fast path: no alias key anywhere
    rows = _raw_rows(path)
    return any(not isinstance(raw, BadRaw) and _row_layout(raw) != "instruction" for _, raw in rows)


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    if path.suffix.lower() == ".jsonl":
        return list(read_jsonl(path))
    return list(read_json(path, None))


def _map_row(row: Mapping[str, Any]) -> tuple[dict[str, Any], str, dict[str, str]]:
    """Rename an alias-layout row to the instruction layout; raise RowError on conflicts.

    Returns the renamed row, its layout and {canonical field: the key the row used}.
    """
    layout = _row_layout(row)
    out = dict(row)
    renamed: dict[str, str] = {}
    if layout == "natural-instructions":
        for alias, canonical in SNI_KEYS.items():
            if row.get(alias) is None:
                continue
            spellings = {"instruction": ("instruction",), "input": INPUT_KEYS,
                         "output": OUTPUT_KEYS + REFERENCE_ALIASES}[canonical]
            clash = [k for k in spellings if row.get(k) is not None]
            if clash:
                raise RowError(alias, f"both '{clash[0]}' and '{alias}' are given; they spell the same field, "
                                      "keep one")
            value = out.pop(alias)
            if alias == "definition" and isinstance(value, list):
                if not value or not all(isinstance(v, str) for v in value):
                    raise RowError(alias, "must be a string or a non-empty list of strings")
                value = "\n\n".join(value)
            out[canonical] = value
            renamed[canonical] = alias
    present = [k for k in OUTPUT_KEYS + REFERENCE_ALIASES if out.get(k) is not None]
    if len(present) > 1:
        raise RowError(present[1], f"both '{present[0]}' and '{present[1]}' are given; they spell the same "
                                   "field (the references), keep one")
    if present and present[0] in REFERENCE_ALIASES:
        out["output"] = out.pop(present[0])
        renamed["output"] = present[0]
    return out, layout, renamed


def _load_mapped(path: Path) -> tuple[list[Record], set[str]]:
    """Read a file whose rows may use the alias layouts; validate every row like load_records."""
    records: list[Record] = []
    layouts: set[str] = set()
    seen: dict[str, int] = {}
    n_rows = 0
    for index, (line, raw) in enumerate(_raw_rows(path)):
        n_rows += 1
        renamed: dict[str, str] = {}
        try:
            if isinstance(raw, BadRaw):
                raise raw.error
            if isinstance(raw, Mapping):
                raw, layout, renamed = _map_row(raw)
                layouts.add(layout)
            record = parse_row(raw, index=index, line=line, source=str(path), id_key="id",
                               explicit_id=False, require_output=True)
        except RowError as e:
            field = renamed.get(e.field, e.field) if e.field else None  # name the key the row used
            if field == "output" and "missing output" in e.reason:
                raise DataError("missing references: give 'output' (a string or a list of strings), "
                                "'references', 'outputs' or 'targets'", path=str(path), line=line,
                                field="output") from None
            raise DataError(e.reason, path=str(path), line=line, field=field) from None
        if record.id in seen:
            raise DataError(f"duplicate id '{record.id}' (also on line {seen[record.id]}); ids must be unique",
                            path=str(path), line=line, field="id")
        seen[record.id] = line
        records.append(record)
    if n_rows == 0:
        raise DataError("no rows: the source is empty", path=str(path))
    return records, layouts


def load_eval_set(path: str | Path, *, name: str | None = None, max_samples: int | None = None) -> EvalSet:
    """Load an evaluation set (any layout of the module doc) with every row's references.

    ``max_samples`` keeps the first N rows (after validation of the whole file).
    """
    from pocl.config.eval import default_set_name

    source = str(path)
    p = Path(source).expanduser()
    if _needs_mapping(p):
        records, layouts = _load_mapped(p)
        layout = layouts.pop() if len(layouts) == 1 else "mixed"
        source = str(p)
    else:
        try:
            result = load_records(source, require_output=True)
        except DataError as e:
            if e.field == "output" and "missing output" in str(e):
                raise DataError("missing references: an evaluation row needs 'output' (a string or a list of "
                                "strings), 'references', 'outputs' or 'targets'", path=e.path, line=e.line,
                                field="output") from None
            raise
        records, layout, source = list(result.records), "instruction", result.source
    total = len(records)
    if max_samples is not None:
        records = records[:max_samples]
    return EvalSet(name=name or default_set_name(source), path=source, records=records, layout=layout,
                   total_rows=total)


def describe(eval_set: EvalSet) -> str:
    refs = [len(r.references) for r in eval_set.records]
    extra = f", {sum(refs) / max(len(refs), 1):.2f} references per sample" if eval_set.multi_reference else ""
    limited = f" (first {len(eval_set)} of {eval_set.total_rows})" if len(eval_set) < eval_set.total_rows else ""
    return f"{eval_set.name}: {len(eval_set)} samples{limited} from {eval_set.path} [{eval_set.layout} layout{extra}]"


__all__ = ["EvalSet", "load_eval_set", "describe", "REFERENCE_ALIASES", "SNI_KEYS"]
