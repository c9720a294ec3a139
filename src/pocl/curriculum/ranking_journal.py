"""The resumable measurement: the journal ``ranking.partial.jsonl`` and the processes that share it.

While the signals are measured, every finished batch is appended to ``ranking.partial.jsonl`` next to
the ranking (flushed and fsynced; a header line holds the ``signals_hash`` of the measurement, every
batch line its own checksum). A run that is killed and started again reuses the batches of a partial
file whose stamp matches (:class:`PartialMeasurement`, a
:class:`pocl.curriculum.difficulty.BatchJournal`), measures only the others, and deletes the partial
file once the ranking is written. With several processes (:class:`Distributed`) the batches are
measured in rounds, gathered after each round and appended by the main process only.

The batches of the teacher pass (``"teacher"``) depend on the teacher too: each carries the stamp of
the teacher it was measured with (``teacher_hash``) and is reused only for that teacher, while the
student's batches of the same file stay usable with any teacher.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from pocl.artifacts import write_file
from pocl.errors import CheckpointError
from pocl.fingerprints import line_check

from .difficulty import SIGNAL_PASS
from .ranking_file import write_ranking

__all__ = ["PARTIAL_FORMAT", "PARTIAL_FORMAT_VERSION", "PASSES", "SIGNAL_WORD", "Distributed", "PartialMeasurement",
           "drop_leftover_partial", "partial_path"]


def partial_path(path: str | os.PathLike) -> Path:
    """``ranking.jsonl`` -> ``ranking.partial.jsonl``: the batches of an unfinished measurement."""
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".partial.jsonl")

PARTIAL_FORMAT = "pocl-ranking-partial"
PARTIAL_FORMAT_VERSION = 1

#: The passes whose batches the journal keeps (``"teacher"``: the joint pass of the two teacher signals).
PASSES = tuple(dict.fromkeys(SIGNAL_PASS.values()))


def _read_partial(path: Path) -> tuple[dict[str, Any] | None, list[tuple[bytes, dict[str, Any]]], int]:
    """(header or None, [(raw line, entry)] of the sound batch lines, number of damaged lines)."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None, [], 0
    lines = blob.split(b"\n")
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != PARTIAL_FORMAT:
            header = None
    except ValueError:
        header = None
    entries, damaged = [], 0
    for raw in lines[1:]:
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            check = entry.pop("check")
            sound = (check == line_check(entry) and entry["signal"] in PASSES and isinstance(entry["batch"], int)
                     and isinstance(entry["ids"], list))
        except (ValueError, TypeError, KeyError, AttributeError):
            sound = False
        if sound:
            entries.append((raw, entry))
        else:
            damaged += 1
    return header, entries, damaged


class PartialMeasurement:
    """The journal of an unfinished measurement: ``ranking.partial.jsonl`` (a
    :class:`pocl.curriculum.difficulty.BatchJournal`).

    Every process reads the file when the measurement starts; only the main process writes it.
    With several processes, :meth:`commit` gathers each round's batches from all processes, so
    every process knows every result and the main process appends them all.
    """

    def __init__(self, path: Path, signals_hash: str, dist: "Distributed", *, teacher_hash: str | None = None):
        self.path = path
        self.stamp = signals_hash
        self.teacher_hash = teacher_hash
        self.dist = dist
        self.entries: dict[tuple[str, int], dict[str, Any]] = {}
        # Per pass; the teacher pass appears once it has a batch (the student's passes are always there).
        self.reused: dict[str, int] = {"loss": 0, "rouge_l": 0}
        self.measured: dict[str, int] = {"loss": 0, "rouge_l": 0}
        self._reused_seconds: dict[str, float] = {}
        self._fh = None
        keep: list[bytes] = []
        self.note = ""
        if path.exists():
            header, entries, damaged = _read_partial(path)
            if header is None:
                self.note = f"the partial measurement file {path} is unreadable; starting over"
            elif header.get("format_version") != PARTIAL_FORMAT_VERSION or header.get("signals_hash") != signals_hash:
                self.note = (f"the partial measurement file {path} was made for other inputs (signals hash "
                             f"{header.get('signals_hash')}, now {signals_hash}); starting over")
            else:
                for raw, entry in entries:
                    self.entries[(entry["signal"], entry["batch"])] = entry
                    keep.append(raw)
                if damaged:
                    self.note = (f"{damaged} damaged line(s) of {path} ignored (cut by a crash or changed); "
                                 "those batches are measured again")
        dist.barrier()  # every process has read the file before the main process rewrites it
        if dist.is_main:
            # Rewrite (atomically) with the sound lines only, so that appending never follows a cut line.
            header = {"format": PARTIAL_FORMAT, "format_version": PARTIAL_FORMAT_VERSION, "signals_hash": signals_hash,
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            blob = b"".join(line + b"\n" for line in [json.dumps(header).encode()] + keep)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file(path, blob)
            try:
                self._fh = open(path, "ab")
            except OSError as exc:
                raise CheckpointError(f"cannot open {path} for writing: {exc.strerror or exc}") from exc

    def _usable(self, entry: dict[str, Any]) -> bool:
        """A teacher batch only for the teacher it was measured with."""
        return entry["signal"] != "teacher" or (self.teacher_hash is not None
                                                and entry.get("teacher_hash") == self.teacher_hash)

    def stored_batches(self, signal: str) -> int:
        return sum(1 for (s, _), entry in self.entries.items() if s == signal and self._usable(entry))

    # -- BatchJournal
    def lookup(self, signal: str, batch: int, ids) -> dict[str, Any] | None:
        entry = self.entries.get((signal, batch))
        if entry is None or entry["ids"] != list(ids) or not self._usable(entry):
            return None
        return entry

    def commit(self, signal: str, item) -> list[tuple[int, dict[str, Any]]]:
        items = [item]
        if self.dist.world > 1:  # one item (or None) per process, in rank order
            items = [x for part in self.dist.gather(items) for x in part]
        out = []
        for it in items:
            if it is None:
                continue
            batch, ids, payload, fresh = it
            if fresh:
                self.measured[signal] = self.measured.get(signal, 0) + 1
                entry = {"signal": signal, "batch": batch, "ids": list(ids), **payload}
                if signal == "teacher":
                    entry["teacher_hash"] = self.teacher_hash
                self.entries[(signal, batch)] = entry
                if self._fh is not None:
                    self._append(entry)
            else:
                self.reused[signal] = self.reused.get(signal, 0) + 1
                seconds = float(payload.get("seconds") or 0.0)
                self._reused_seconds[signal] = self._reused_seconds.get(signal, 0.0) + seconds
            out.append((batch, payload))
        return out

    def stored_seconds(self, signal: str) -> float:
        return self._reused_seconds.get(signal, 0.0)

    # -- file
    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({**entry, "check": line_check(entry)}, ensure_ascii=False, allow_nan=True)
        try:
            self._fh.write(line.encode("utf-8") + b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise CheckpointError(f"cannot append to {self.path}: {exc.strerror or exc} (errno {exc.errno}); the "
                                  "batches measured so far are kept there and reused by the next run") from exc

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """The ranking is written: the partial file is no longer needed."""
        self.close()
        if self.dist.is_main:
            self.path.unlink(missing_ok=True)

    def summary(self, signals) -> str:
        parts = [f"{self.reused[s]} of {self.reused[s] + self.measured.get(s, 0)} {SIGNAL_WORD[s]} batches"
                 for s in sorted(signals) if self.reused.get(s)]
        return " and ".join(parts)


SIGNAL_WORD = {"loss": "loss", "rouge_l": "generation", "teacher": "teacher"}


def drop_leftover_partial(path: Path, signals_hash: str, dist: "Distributed") -> None:
    """A partial file of the measurement that produced the (complete) ranking file being used now is a
    leftover of a run killed between writing the ranking and deleting it."""
    part = partial_path(path)
    if dist.is_main and part.exists():
        header, _, _ = _read_partial(part)
        if header is not None and header.get("signals_hash") == signals_hash:
            part.unlink(missing_ok=True)

class Distributed:
    """The processes of a data-parallel run (one process when not launched distributed): the
    measuring work is split by batches, results are gathered, and only the main process writes."""

    def __init__(self) -> None:
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if self.world > 1:
            from pocl.launch import distributed_state

            self.state = distributed_state()
            self.world = self.state.num_processes
        self.rank = self.state.process_index if self.state is not None else 0
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list[list]:
        from accelerate.utils import gather_object

        return gather_object([items])

    def write(self, path, ranking, meta, hashes) -> dict[str, Any]:
        out = write_ranking(path, ranking, meta, hashes) if self.is_main else dict(meta)
        self.barrier()
        return out
