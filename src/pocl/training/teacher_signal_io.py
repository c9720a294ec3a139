"""An imported teacher signal: a Parquet file of top-k teacher logprobs per response token, used instead of
the teacher cache (``loss.teacher_signal_file``, ``--teacher-signal-file``). An APPROXIMATION, exactly like
the top-k cache (``loss.teacher_cache topk``), and read through the same code path: the table becomes a
:class:`pocl.losses.TopKTeacher` per batch (k + 1 buckets), its divergence is measured against the live
teacher at every stage temperature, logged with the teacher's mass outside the file's tokens, and refused
above ``loss.teacher_cache_max_error`` unless ``--accept-approximation topk-cache`` (docs/losses.md,
"Importing and exporting teacher signals").

The file: one row per sample, found by **sample id** (the ``id`` of the data records). Columns:

``sample_id`` string
    the sample's id.
``token_ids`` list<list<int>> [positions][k]
    per response position (the positions :func:`pocl.losses.select_response_tokens` selects, in order:
    the position before each response token), the ids of the teacher's top-k tokens (any order).
``logprobs`` list<list<float>> [positions][k]
    the teacher's log-probabilities of those tokens at T = 1 (log-softmax over its whole vocabulary).
``tail_logprob`` list<float> [positions], optional
    log of the teacher's probability at T = 1 of every other token; -inf when k = V. Absent: it is
    ``log(1 - sum(exp(logprobs)))`` (the vLLM case).
``tail_lse`` list<list<float>> [positions][n_T], optional
    for the temperatures in the metadata's ``tail_temperatures``: logsumexp over the other tokens of
    ``logprob / T``. Needed for a schedule with T != 1 (pocl's export writes it; vLLM gives none).

Schema metadata, key ``pocl.teacher_signal``, JSON: ``format`` (``pocl-teacher-signal``),
``format_version``, ``temperature`` (1.0: what the logprobs are at), ``k``, ``tail_temperatures``,
``tokenizer_fingerprint`` (:func:`pocl.fingerprints.tokenizer_fingerprint`), ``teacher_fingerprint``,
``data_fingerprint``, ``vocab_size``, ``source`` and ``pocl_version``. A file without them (captured
elsewhere) is read with T = 1 and needs ``--teacher-signal-ignore-tokenizer``.

Checked before training, every error naming the file, the row (sample id) and the field: a training
sample missing from the file, a position count that differs from the tokenised response (another
tokenizer or template), ids outside the student vocabulary or repeated in a position, logprobs that are
not <= 0 or whose mass exceeds 1, and a tokenizer fingerprint that differs from the student's (unless
``loss.teacher_signal_ignore_tokenizer``). :mod:`pocl.training.teacher_signal_export` writes such files
(from a top-k teacher cache, or from vLLM ``prompt_logprobs``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl.errors import ConfigError
from pocl.losses import TopKTeacher

log = logging.getLogger("pocl.teacher_signal")

FORMAT = "pocl-teacher-signal"
FORMAT_VERSION = 1
#: The schema metadata key of the JSON metadata.
META_KEY = b"pocl.teacher_signal"
#: How far above 0 a logprob, and above 1 a position's mass, may be (float32 rounding of a log-softmax).
LOGPROB_TOL = 1e-5
MASS_TOL = 1e-4

__all__ = ["FORMAT", "FORMAT_VERSION", "META_KEY", "SignalFile", "open_signal_file", "preflight",
           "response_positions"]


def response_positions(labels: Sequence[int]) -> int:
    """The number of response positions of a tokenised sample (a next label that is a target)."""
    return int(sum(1 for x in list(labels)[1:] if x != -100))


def _read_table(path: Path):
    """The Arrow table of a Parquet file, or of every ``*.parquet`` under a folder (shards, concatenated in
    name order; their metadata must agree), and its ``pocl.teacher_signal`` metadata ({} when none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise ConfigError(f"loss.teacher_signal_file {path}: not found")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"loss.teacher_signal_file {path}: a folder without .parquet files (the teacher signal "
                          f"is Parquet; a datasets folder can be written as one with Dataset.to_parquet)")
    tables, metas = [], set()
    for f in files:
        try:
            t = pq.read_table(f)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"loss.teacher_signal_file {f}: not a readable Parquet file ({exc})") from exc
        metas.add((t.schema.metadata or {}).get(META_KEY))
        tables.append(t.replace_schema_metadata(None))
    if len(metas) > 1:
        raise ConfigError(f"loss.teacher_signal_file {path}: its shards carry different {META_KEY.decode()} metadata")
    raw = metas.pop()
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ConfigError(f"loss.teacher_signal_file {path}: unreadable {META_KEY.decode()} metadata ({exc})") from exc
    if meta.get("format", FORMAT) != FORMAT or int(meta.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise ConfigError(f"loss.teacher_signal_file {path}: format {meta.get('format')!r} version "
                          f"{meta.get('format_version')!r}; this pocl reads {FORMAT} up to version {FORMAT_VERSION}")
    return pa.concat_tables(tables), meta


class SignalFile:
    """A teacher signal file, read whole and checked: per sample id its rows of ids, logprobs and tails.

    Duck-types the read side of a ``topk`` :class:`pocl.training.teacher_cache.TeacherCache` (``kind``,
    ``root``, :meth:`lookup`), so :class:`pocl.training.teacher_signal.CachedTopKTeacher` reads it."""

    kind = "topk"

    def __init__(self, path: str | Path):
        """Read ``path`` (a Parquet file or a folder of shards); ConfigError on any malformed row."""
        self.root = self.path = Path(path)
        table, self.meta = _read_table(self.path)
        self.temperature = float(self.meta.get("temperature", 1.0))
        if not math.isclose(self.temperature, 1.0):
            self._fail(None, "temperature", f"the logprobs are at T = {self.temperature:g}; pocl reads logprobs "
                                            f"at T = 1 (log-softmax of the raw logits)")
        for name in ("sample_id", "token_ids", "logprobs"):
            if name not in table.column_names:
                self._fail(None, name, f"missing column (columns: {', '.join(table.column_names)})")
        self.ids: list[str] = [str(x) for x in table.column("sample_id").to_pylist()]
        seen: set[str] = set()
        for sample_id in self.ids:
            if sample_id in seen:
                self._fail(sample_id, "sample_id", "appears in more than one row")
            seen.add(sample_id)
        counts, k, token_ids = self._nested(table, "token_ids", None)
        self.k = int(self.meta.get("k", k))
        if k != self.k:
            self._fail(None, "token_ids", f"{k} tokens per position; the metadata says k = {self.k}")
        _, _, logprobs = self._nested(table, "logprobs", counts, width=k)
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.token_ids = token_ids.astype(np.int64)
        self.logprobs = logprobs.astype(np.float64)
        self.tail_temperatures = tuple(float(t) for t in self.meta.get("tail_temperatures", ()))
        self.tail_lse = None
        if "tail_lse" in table.column_names:
            if not self.tail_temperatures:
                self._fail(None, "tail_lse", "the metadata names no tail_temperatures for its columns")
            self.tail_lse = self._nested(table, "tail_lse", counts, width=len(self.tail_temperatures))[2]
        self.tail_logprob = None
        if "tail_logprob" in table.column_names:
            self.tail_logprob = self._flat(table, "tail_logprob", counts)
        self._check_values()
        self._where = {sample_id: i for i, sample_id in enumerate(self.ids)}

    # ----------------------------------------------------------------------------- reading
    def _fail(self, sample_id: str | None, field: str, what: str, position: int | None = None):
        """Raise the ConfigError of a bad file, naming the file, the row and the field."""
        row = "" if sample_id is None else f", row sample_id={sample_id!r}"
        at = "" if position is None else f", response position {position}"
        raise ConfigError(f"loss.teacher_signal_file {self.path}{row}, field {field}{at}: {what}")

    def _row_of(self, flat_position: int) -> tuple[str, int]:
        """(sample id, position within the row) of a position of the concatenated rows."""
        i = int(np.searchsorted(self.offsets, flat_position, side="right")) - 1
        return self.ids[i], int(flat_position - self.offsets[i])

    def _nested(self, table, name: str, counts, width: int | None = None):
        """(positions per row, values per position, [positions, width] values) of a list<list<number>> column."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = table.column(name).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not (
                pa.types.is_list(col.type.value_type) or pa.types.is_large_list(col.type.value_type)):
            self._fail(None, name, f"must be a list of lists (one list per response position); got {col.type}")
        rows = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if col.null_count:
            self._fail(self.ids[int(np.flatnonzero(np.isnan(rows.astype(float)))[0])], name, "null row")
        rows = rows.astype(np.int64)
        if counts is None:  # the first column read: its rows place every position (for the errors below)
            self.offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        if counts is not None and not np.array_equal(rows, counts):
            i = int(np.flatnonzero(rows != counts)[0])
            self._fail(self.ids[i], name, f"{rows[i]} positions, token_ids has {counts[i]}")
        inner = col.flatten()
        sizes = pc.list_value_length(inner).to_numpy(zero_copy_only=False).astype(float)
        want = sizes[0] if width is None and len(sizes) else width
        bad = np.flatnonzero(np.isnan(sizes) | (sizes != want))
        if len(bad):
            sample_id, p = self._row_of(int(bad[0]))
            self._fail(sample_id, name, f"{'null' if np.isnan(sizes[bad[0]]) else int(sizes[bad[0]])} values; every "
                                        f"position of the file must have {int(want)}", p)
        values = inner.flatten()
        if values.null_count:
            sample_id, p = self._row_of(int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // int(want))
            self._fail(sample_id, name, "null value", p)
        return rows, int(want or 0), values.to_numpy(zero_copy_only=False).reshape(len(sizes), int(want or 0))

    def _flat(self, table, name: str, counts) -> np.ndarray:
        """[positions] values of a list<number> column (one per response position)."""
        import pyarrow.compute as pc

        col = table.column(name).combine_chunks()
        rows = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if col.null_count or not np.array_equal(rows, counts):
            i = int(np.flatnonzero(np.isnan(rows.astype(float)) | (rows != counts))[0])
            self._fail(self.ids[i], name, f"{rows[i]} positions, token_ids has {counts[i]}")
        values = col.flatten()
        if values.null_count:
            self._fail(self._row_of(int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]))[0],
                       name, "null value")
        return values.to_numpy(zero_copy_only=False).astype(np.float64)

    def _check_values(self) -> None:
        """Ids not repeated in a position; logprobs finite and <= 0, their mass (with the tail) at most 1."""
        def first(mask: np.ndarray, field: str, what: str) -> None:
            hit = np.flatnonzero(mask)
            if len(hit):
                sample_id, p = self._row_of(int(hit[0]))
                self._fail(sample_id, field, what(int(hit[0])) if callable(what) else what, p)

        ids = self.token_ids
        if ids.shape[1] > 1:
            sorted_ids = np.sort(ids, axis=1)
            first((np.diff(sorted_ids, axis=1) == 0).any(axis=1), "token_ids", "a token id appears twice")
        lp = self.logprobs
        first(~np.isfinite(lp).all(axis=1), "logprobs", lambda i: f"must be finite; got {lp[i][~np.isfinite(lp[i])][0]} "
              f"(a top-k token of probability 0: use a smaller k)")
        first((lp > LOGPROB_TOL).any(axis=1), "logprobs", lambda i: f"logprobs must be <= 0; got {lp[i].max():.6g}")
        mass = np.exp(lp).sum(axis=1)
        if self.tail_logprob is not None:
            first(np.isnan(self.tail_logprob) | (self.tail_logprob > LOGPROB_TOL), "tail_logprob",
                  lambda i: f"must be <= 0; got {self.tail_logprob[i]:.6g}")
            mass = mass + np.exp(self.tail_logprob)
            first(np.abs(mass - 1) > 1e-3, "tail_logprob", lambda i: f"the logprobs and the tail hold a mass of "
                                                                     f"{mass[i]:.6g}, not 1")
        first(mass > 1 + MASS_TOL, "logprobs", lambda i: f"their probabilities sum to {mass[i]:.6g} > 1")
        if self.tail_lse is not None:
            first(np.isnan(self.tail_lse).any(axis=1), "tail_lse", "NaN")

    @property
    def files(self) -> list[Path]:
        """The Parquet files read (the file, or the shards of the folder)."""
        return [self.path] if self.path.is_file() else sorted(self.path.rglob("*.parquet"))

    @property
    def fingerprint(self) -> str:
        """A hash of the files' contents (the run's ``teacher_signal`` fingerprint: a resume with another file
        is refused)."""
        import hashlib

        from pocl.fingerprints import sha256_file

        if not hasattr(self, "_fingerprint"):
            digests = "".join(sha256_file(f) for f in self.files)
            self._fingerprint = hashlib.sha256(digests.encode()).hexdigest()[:16]
        return self._fingerprint

    # ----------------------------------------------------------------------------- checks against a run
    def check_data(self, data, *, vocab_size: int, name: str = "training", required: bool = True) -> bool:
        """Every sample of ``data`` has a row with its response's position count and ids in [0, vocab_size).
        ConfigError on the first problem (``required``), else False when some sample is missing."""
        for sample in data:
            if sample.id not in self._where:
                if not required:
                    return False
                self._fail(sample.id, "sample_id", f"the {name} sample {sample.id!r} is not in the file "
                                                   f"({len(self.ids)} rows)")
            i = self._where[sample.id]
            want = response_positions(sample.labels)
            if int(self.counts[i]) != want:
                self._fail(sample.id, "token_ids", f"{int(self.counts[i])} positions, but the tokenized response "
                                                   f"has {want}: the file was made with another tokenizer, chat "
                                                   f"template or max length than this run's")
            rows = self.token_ids[self.offsets[i]:self.offsets[i + 1]]
            bad = np.flatnonzero(((rows < 0) | (rows >= vocab_size)).any(axis=1))
            if len(bad):
                value = rows[bad[0]][(rows[bad[0]] < 0) | (rows[bad[0]] >= vocab_size)][0]
                self._fail(sample.id, "token_ids", f"token id {int(value)} is outside the student vocabulary "
                                                   f"[0, {vocab_size})", int(bad[0]))
        return True

    def check_tokenizer(self, fingerprint: str, *, ignore: bool) -> None:
        """ConfigError when the file's tokenizer fingerprint is not ``fingerprint`` (or absent), unless ``ignore``."""
        theirs = self.meta.get("tokenizer_fingerprint")
        if theirs == fingerprint:
            return
        what = (f"the file's tokenizer fingerprint {theirs} differs from the student's {fingerprint}" if theirs
                else f"the file names no tokenizer fingerprint (the student's is {fingerprint})")
        if ignore:
            log.warning("loss.teacher_signal_file %s: %s; used anyway (loss.teacher_signal_ignore_tokenizer)",
                        self.path, what)
            return
        self._fail(None, "tokenizer_fingerprint", f"{what}: its token ids may mean other tokens. Make the file with "
                                                  f"the student's tokenizer, or pass --teacher-signal-ignore-tokenizer "
                                                  f"if the ids are known to agree")

    def temperatures_for(self, needed: Sequence[float]) -> tuple[float, ...]:
        """``needed`` (sorted) when the file has a tail at each (T = 1 always); ConfigError naming the others."""
        have = [1.0, *self.tail_temperatures]
        missing = [t for t in needed if not any(math.isclose(t, h, rel_tol=1e-9) for h in have)]
        if missing:
            self._fail(None, "tail_lse", f"the run's stages need the teacher's tail at T = "
                                         f"{', '.join(f'{t:g}' for t in missing)}; the file has it at T = "
                                         f"{', '.join(f'{t:g}' for t in sorted(set(have)))} only (top-k logprobs "
                                         f"at T = 1 do not determine the tail at other temperatures)")
        return tuple(sorted(float(t) for t in needed))

    # ----------------------------------------------------------------------------- the table
    def prepare(self, temperatures: Sequence[float]) -> None:
        """Make the tensors of :meth:`lookup` at ``temperatures``: ids ascending per position, logits = the
        logprobs, and one tail column per temperature (logsumexp over the tail of logprob / T)."""
        self.temperatures = self.temperatures_for(temperatures)
        order = np.argsort(self.token_ids, axis=1, kind="stable")
        ids = np.take_along_axis(self.token_ids, order, axis=1)
        lp = np.take_along_axis(self.logprobs, order, axis=1)
        tail1 = self.tail_logprob
        if tail1 is None:
            with np.errstate(divide="ignore"):
                tail1 = np.log(np.clip(1.0 - np.exp(lp).sum(axis=1), 0.0, None))
        columns = []
        for t in self.temperatures:
            if math.isclose(t, 1.0, rel_tol=1e-9):
                columns.append(tail1)
            else:
                j = next(j for j, h in enumerate(self.tail_temperatures) if math.isclose(t, h, rel_tol=1e-9))
                columns.append(np.asarray(self.tail_lse[:, j], dtype=np.float64))
        self._ids = torch.from_numpy(ids)
        self._logits = torch.from_numpy(lp.astype(np.float32))
        self._tails = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32)).reshape(len(ids), -1)

    def lookup(self, sample_ids: Sequence[str]) -> TopKTeacher:
        """The :class:`TopKTeacher` of these samples' rows, concatenated in this order (batch-major)."""
        index = []
        for sample_id in sample_ids:
            if sample_id not in self._where:
                raise KeyError(f"sample '{sample_id}' is not in the teacher signal file {self.path}")
            i = self._where[sample_id]
            index.append(torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])))
        rows = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
        return TopKTeacher(self._ids[rows], self._logits[rows], self._tails[rows], self.temperatures)


# ------------------------------------------------------------------------------------------- a run's file
_OPENED: dict[tuple, SignalFile] = {}


def _read(path: str | Path) -> SignalFile:
    """The :class:`SignalFile` at ``path``, read once per process while the file is unchanged."""
    p = Path(path).resolve()
    stat = [(f.stat().st_mtime_ns, f.stat().st_size) for f in ([p] if p.is_file() else sorted(p.rglob("*.parquet")))] \
        if p.exists() else []
    key = (str(p), tuple(stat))
    if key not in _OPENED:
        _OPENED.clear()
        _OPENED[key] = SignalFile(p)
    return _OPENED[key]


def preflight(config, inputs):
    """Check ``loss.teacher_signal_file`` against a run's inputs before any work (:func:`pocl.pipeline.distill`):
    the tokenizer fingerprint, every training sample (and dev sample, when the file has them all). Returns the
    inputs with the file's :attr:`SignalFile.fingerprint` in their fingerprints (``teacher_signal``: a resume
    with another file is refused)."""
    import dataclasses

    from pocl.fingerprints import tokenizer_fingerprint

    lc, cc = config.loss, config.curriculum
    if cc.stage_teachers or any(isinstance(st, dict) and st.get("teacher") for st in cc.stages):
        raise ConfigError("loss.teacher_signal_file replaces model.teacher's signal; stages that name their own "
                          "teacher (curriculum.stage_teachers / curriculum.stages[i].teacher) cannot use it")
    signal = _read(lc.teacher_signal_file)
    signal.check_tokenizer(tokenizer_fingerprint(inputs.tokenizer), ignore=lc.teacher_signal_ignore_tokenizer)
    signal.check_data(inputs.train_data, vocab_size=inputs.vocab_size)
    if inputs.dev_data is not None and len(inputs.dev_data) > 0:
        signal.check_data(inputs.dev_data, vocab_size=inputs.vocab_size, name="dev", required=False)
    return dataclasses.replace(inputs, fingerprints=dict(inputs.fingerprints, teacher_signal=signal.fingerprint))


def open_signal_file(loss_config, datasets: dict[str, Any], *, temperatures: Sequence[float], vocab_size: int,
                     teacher_fingerprint: str | None) -> tuple[dict[str, SignalFile], dict[str, Any]]:
    """The file of ``loss_config.teacher_signal_file`` checked against ``datasets`` (``{"train": ..., "dev":
    ...}``) at ``temperatures``: ``({name: reader}, info)``. The training data must all be in it; the dev data
    are read from it when they all are, else (no ``dev`` key) from the live teacher."""
    signal = _read(loss_config.teacher_signal_file)
    signal.prepare(temperatures)
    readers: dict[str, SignalFile] = {}
    for name, data in datasets.items():
        if data is None:
            continue
        if signal.check_data(data, vocab_size=vocab_size, name="training" if name == "train" else name,
                             required=name == "train"):
            readers[name] = signal
        else:
            log.warning("loss.teacher_signal_file %s: not every %s sample is in the file; the %s set is scored "
                        "with the live teacher", signal.path, name, name)
    theirs = signal.meta.get("teacher_fingerprint")
    if theirs and teacher_fingerprint and theirs != teacher_fingerprint:
        log.warning("loss.teacher_signal_file %s: made by teacher %s, not model.teacher (%s): the error logged "
                    "below compares the file with model.teacher", signal.path, theirs, teacher_fingerprint)
    info = {"source": "file", "path": str(signal.path), "fingerprint": signal.fingerprint,
            "k": signal.k, "tokens": int(signal.offsets[-1]), "temperatures": list(signal.temperatures),
            "dev": "file" if "dev" in readers else "live", "metadata": signal.meta}
    log.info("teacher signal file %s: %d samples, %d positions, top-%d logprobs, tails at T in %s (an "
             "APPROXIMATION, measured against the live teacher)", signal.path, len(signal.ids), info["tokens"],
             signal.k, list(signal.temperatures))
    return readers, info
