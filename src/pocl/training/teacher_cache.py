"""The teacher cache: the teacher runs once over the data; later passes read what it stored.

POCL replays the easy samples in every stage (the default schedule makes 20 passes over the data),
so a teacher-forced run evaluates the teacher on the same sample again and again. With a teacher
cache (``loss.teacher_cache``) the trainer runs the teacher once over the training set (and the
dev set) before the first step and stores, for every response token (the positions
:func:`pocl.losses.select_response_tokens` selects), one of two things:

``hidden`` (the default; exact)
    the teacher's final hidden states ``[tokens, H]``. The loss recomputes the teacher's logits
    through its LM head inside each fused loss chunk, so the divergence is the full-vocabulary one
    at any temperature; only the teacher's body is skipped. Stored in float32 this is the live
    loss up to float reordering; float16 / bfloat16 are declared approximations whose error is
    measured and logged (:mod:`pocl.training.teacher_signal`).
``topk`` (a declared approximation)
    the teacher's k largest logits, their ids, and the log-mass of all other tokens at every
    temperature of the schedule (:func:`pocl.losses.teacher_top_k`). The divergence is then taken
    on k + 1 buckets: a lower bound of the real one whose gap grows with T (docs/losses.md).

On-policy (GKD) steps score the student's own new samples and keep using the live teacher.

Layout of one cache (``OUTPUT_DIR/teacher_cache/train/``, ``.../dev/``)::

    shard-00000/        SHARD_SAMPLES samples of similar length, written atomically
        hidden.npy      [tokens, H]      (hidden) the teacher's final hidden states
        token_ids.npy   [tokens, k] int32 (topk) the teacher's top-k token ids, ascending per row
        logits.npy      [tokens, k]      (topk) their logits
        tail_lse.npy    [tokens, n_T] float32 (topk) logsumexp of z / T over the other tokens, per T
        samples.json    the shard's sample ids and their token counts, in row order
        manifest.json   size and sha256 of each file, the stamp hash and the shard number
    manifest.json       written last: size and sha256 of every shard file, the stamp and its inputs

Float arrays are stored in the stamp's dtype (float32, float16, or bfloat16 as uint16 bits: numpy
has no bfloat16). Rows are found by **sample id** (never by step or position), so any shuffling,
stage subset or micro-batch split reads the right rows. The **stamp** holds what the values depend
on: the kind, the teacher's fingerprint and weight dtype, the tokenised data's fingerprint, the
stored dtype, the vocabulary, the shard size, and for ``topk`` k and the temperatures. A cache
whose stamp differs is rebuilt and the log says what changed.

**Resumable and checked.** Every finished shard is a complete folder (temporary folder, manifest,
rename: :func:`pocl.training.checkpoint.atomic_folder_write`). A pass killed midway leaves the
finished shards and a temporary folder that the next start removes; that start computes only the
shards that are missing. Every start verifies the sha256 of every file (the top manifest); a
truncated or corrupt shard fails its checksum and is computed again, never read.

**Several processes.** The main process checks the shards and broadcasts the list still to do; the
processes compute them in rounds (shard ``round + rank``), the main process gathers and writes each
round, the others wait at a barrier, and then every process reads the same cache.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl import artifacts
from pocl._version import __version__
from pocl.artifacts import Stamp
from pocl.data import TokenizedDataset, collate, group_by_length
from pocl.errors import CheckpointError
from pocl.losses import TopKTeacher

log = logging.getLogger("pocl.teacher_cache")

FORMAT = "pocl-teacher-cache"
#: 2: the ``kind`` (hidden or topk) and the arrays per kind (version 1 stored top-k rows only).
FORMAT_VERSION = 2
#: Samples per shard: the unit of atomic writing and of resuming. Shards hold samples of similar
#: length (the length-sorted order of :func:`pocl.data.group_by_length`), so the cache pass pads
#: little. A shard is about SHARD_SAMPLES x response tokens x bytes per token: 4 H for ``hidden``
#: in float32 (2 H in float16), 8 k for ``topk`` in float32; ~60 MB for H = 576 and Dolly-length
#: responses (~100 tokens) in float32.
SHARD_SAMPLES = 256
#: The stored dtypes of the float arrays (``loss.teacher_cache_dtype``); numpy has no bfloat16, so
#: bfloat16 values are stored as their uint16 bits and viewed back as bfloat16 when read.
DTYPES = ("float32", "float16", "bfloat16")
#: What a cache can hold, and the arrays of each kind (all with one row per response token).
KINDS = ("hidden", "topk")
ARRAYS = {"hidden": ("hidden",), "topk": ("token_ids", "logits", "tail_lse")}
#: Arrays kept in a fixed dtype whatever the stored dtype (ids, and the tails whose exp is the mass).
_FIXED = {"token_ids": torch.int32, "tail_lse": torch.float32}

__all__ = ["ARRAYS", "FORMAT_VERSION", "KINDS", "SHARD_SAMPLES", "TeacherCache", "cache_stamp",
           "prepare_teacher_cache", "shard_plan"]


def cache_stamp(*, kind: str, teacher_fingerprint: str, teacher_dtype: str, data_fingerprint: str | None,
                dtype: str, vocab_size: int, topk: int | None = None,
                temperatures: Sequence[float] = ()) -> dict[str, Any]:
    """What the cached values depend on.

    ``hidden`` depends on neither k nor the temperatures (the logits are recomputed in the loss);
    ``topk`` stores ``k = min(topk, vocab_size)`` and one tail column per temperature.
    """
    if kind not in KINDS:
        raise ValueError(f"teacher cache kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"teacher cache dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    stamp: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                             "teacher": teacher_fingerprint, "teacher_dtype": teacher_dtype, "data": data_fingerprint,
                             "dtype": dtype, "vocab_size": int(vocab_size), "shard_samples": SHARD_SAMPLES}
    if kind == "topk":
        if topk is None or not temperatures:
            raise ValueError("a topk teacher cache needs k and the temperatures of the schedule")
        stamp.update(k=min(int(topk), int(vocab_size)), temperatures=sorted({float(t) for t in temperatures}))
    return stamp


def shard_plan(data: TokenizedDataset) -> list[list[int]]:
    """Dataset indices of every shard: samples sorted by length (longest first, ties by index), cut
    into SHARD_SAMPLES. A pure function of the data, so every process and every run agrees."""
    return group_by_length(data.lengths, SHARD_SAMPLES)


def _shard_name(j: int) -> str:
    """The folder name of shard ``j``."""
    return f"shard-{j:05d}"


#: Readable names of the stamp's keys in the reason a cache is rebuilt.
_STAMP_LABELS = {"teacher": "teacher (fingerprint)", "data": "data (fingerprint)", "dtype": "stored dtype"}


def _stamp(inputs: dict[str, Any]) -> Stamp:
    """The stamp of a cache (:func:`cache_stamp`'s inputs) as a :class:`pocl.artifacts.Stamp`."""
    return Stamp(inputs, labels=_STAMP_LABELS)


# ------------------------------------------------------------------------------------------- writing
def _compute_shard(indices: Sequence[int], data: TokenizedDataset, teacher_fn: Callable[[dict], dict[str, torch.Tensor]],
                   *, batch_size: int, pad_token_id: int, kind: str, dtype: str) -> dict[str, Any]:
    """The teacher's rows of one shard's samples, in sample order: numpy arrays and the row index."""
    names = ARRAYS[kind]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    tokens: list[int] = []
    for start in range(0, len(indices), batch_size):
        batch = collate([data[i] for i in indices[start:start + batch_size]], pad_token_id)
        rows = teacher_fn(batch)
        # Rows per sample, by the rule of select_response_tokens (the next label is a target).
        counts = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
        for name in names:
            if rows[name].shape[0] != sum(counts):
                raise RuntimeError(f"teacher cache: the teacher returned {rows[name].shape[0]} rows of {name} for "
                                   f"{sum(counts)} response tokens")
            stored = rows[name].to(_FIXED.get(name, getattr(torch, dtype))).cpu()
            parts[name].append(stored.view(torch.uint16) if stored.dtype == torch.bfloat16 else stored)
        tokens += counts
    payload: dict[str, Any] = {name: torch.cat(parts[name]).numpy() for name in names}
    payload.update(ids=[data[i].id for i in indices], tokens=tokens)
    return payload


def _write_shard(folder: Path, payload: dict[str, Any], *, stamp_hash: str, index: int) -> None:
    """Write shard ``index`` atomically: its arrays (``NAME.npy``, rows [tokens, ...]) and sample index."""
    def write(tmp: Path) -> None:
        """Fill the shard's temporary folder."""
        for name, value in payload.items():
            if isinstance(value, np.ndarray):
                np.save(tmp / f"{name}.npy", value)
        (tmp / "samples.json").write_text(json.dumps({"ids": payload["ids"], "tokens": payload["tokens"]}),
                                          encoding="utf-8")

    artifacts.atomic_folder_write(folder, write, manifest_extra={"stamp": stamp_hash, "shard": index,
                                                             "tokens": int(sum(payload["tokens"]))})


def _shard_is_sound(folder: Path, *, stamp_hash: str, index: int) -> bool:
    """A finished shard of this stamp whose files match their checksums."""
    manifest = artifacts.pocl_manifest(folder)
    if manifest is None or manifest.get("stamp") != stamp_hash or manifest.get("shard") != index:
        return False
    try:
        artifacts.verify_folder(folder)
    except CheckpointError as exc:
        log.warning("teacher cache: %s; computing the shard again", exc)
        return False
    return True


def _shards_to_compute(root: Path, stamp: dict[str, Any], num_shards: int) -> tuple[list[int], str, str]:
    """(shards to compute, action, why) from what is on disk; main process only.

    ``action``: reused (complete and intact), repaired (damaged shards), rebuilt (another stamp),
    resumed (an interrupted pass) or built."""
    current = _stamp(stamp)
    stamp_hash = current.hash
    artifacts.clean_temporaries(root)  # the temporary folder of a shard whose write was killed
    top = artifacts.pocl_manifest(root)
    if top is not None and current.matches(top.get("stamp")):
        try:
            artifacts.verify_folder(root)
            return [], "reused", "complete, every checksum matches"
        except CheckpointError as exc:
            action, why = "repaired", f"{exc}"
    elif top is not None:
        action, why = "rebuilt", f"it was built for another {current.why_stale(top.get('stamp_inputs'))}"
    else:
        action, why = "built", "no cache yet"
    # From here on the folder is not a complete cache: the top manifest must not vouch for it.
    (root / artifacts.MANIFEST).unlink(missing_ok=True)
    todo = [j for j in range(num_shards) if not _shard_is_sound(root / _shard_name(j), stamp_hash=stamp_hash, index=j)]
    if action == "built" and len(todo) < num_shards:
        action, why = "resumed", f"an interrupted pass left {num_shards - len(todo)} of {num_shards} shards"
    return todo, action, why


def _finish(root: Path, stamp: dict[str, Any], num_shards: int) -> None:
    """Drop folders of older plans, then write the top manifest (checksums of every shard file)."""
    keep = {_shard_name(j) for j in range(num_shards)}
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("shard-") and p.name not in keep:
            shutil.rmtree(p)
    artifacts.write_manifest(root, {"kind": FORMAT, "stamp": _stamp(stamp).hash, "stamp_inputs": stamp,
                               "shards": num_shards, "pocl_version": __version__})


def prepare_teacher_cache(root: str | Path, data: TokenizedDataset, *,
                          teacher_fn: Callable[[dict], dict[str, torch.Tensor]],
                          stamp: dict[str, Any], batch_size: int, pad_token_id: int, accelerator=None,
                          progress: bool = False, name: str = "train") -> tuple["TeacherCache", dict[str, Any]]:
    """Reuse, complete or build the cache of ``data`` at ``root``; returns the reader and what was done.

    ``teacher_fn(batch)`` runs the teacher on a collated batch (``input_ids``, ``attention_mask``,
    ``labels`` [B, L]) and returns the arrays of the stamp's kind (:data:`ARRAYS`) for its selected
    positions (batch-major, one row per response token): ``hidden`` [N, H], or ``token_ids`` [N, k],
    ``logits`` [N, k] and ``tail_lse`` [N, n_T] with the stamp's k and temperatures. Only the main process writes; with an
    ``accelerator`` of several processes the shards are computed in rounds and gathered.

    Returns ``(cache, info)``; ``info``: ``action`` (reused / built / resumed / repaired / rebuilt), ``reason``,
    ``shards``, ``computed``, ``reused``, ``tokens``, ``seconds``, ``path``.
    """
    root = Path(root)
    t0 = time.perf_counter()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    plan = shard_plan(data)
    stamp_hash = _stamp(stamp).hash
    todo, action, why = [], "", ""
    if main:
        root.mkdir(parents=True, exist_ok=True)
        todo, action, why = _shards_to_compute(root, stamp, len(plan))
    if world > 1:
        from accelerate.utils import broadcast_object_list

        todo, action, why = broadcast_object_list([todo, action, why])
    if main and action != "reused":
        log.info("teacher cache %s (%s data): %s; computing %d of %d shards", root, name, why, len(todo), len(plan))
    bar = None
    if main and todo:
        # A bar on a terminal (unless progress is off), else plain log lines (pocl.progress).
        from pocl.progress import make_progress

        bar = make_progress(sum(len(plan[j]) for j in todo), desc=f"teacher cache ({name})", unit="sample",
                            bar=progress, leave=False, logger=log)
    try:
        for start in range(0, len(todo), world):
            mine = todo[start + rank] if start + rank < len(todo) else None
            payload = None if mine is None else _compute_shard(
                plan[mine], data, teacher_fn, batch_size=batch_size, pad_token_id=pad_token_id, kind=stamp["kind"],
                dtype=stamp["dtype"])
            done = [(mine, payload)]
            if world > 1:
                from accelerate.utils import gather_object

                done = gather_object(done)  # one (shard, payload) per process, in rank order
            if main:
                for j, shard in done:
                    if j is not None:
                        _write_shard(root / _shard_name(j), shard, stamp_hash=stamp_hash, index=j)
                        if bar is not None:
                            bar.update(len(plan[j]))
    finally:
        if bar is not None:
            bar.close()
    if main and (todo or not (root / artifacts.MANIFEST).is_file()):
        _finish(root, stamp, len(plan))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the others read only what the main process has finished
    cache = TeacherCache(root)
    info = {"action": action, "reason": why, "shards": len(plan), "computed": len(todo),
            "reused": len(plan) - len(todo), "tokens": cache.num_tokens, "seconds": time.perf_counter() - t0,
            "bytes": cache.nbytes, "bytes_per_token": cache.nbytes / max(cache.num_tokens, 1), "kind": stamp["kind"],
            "dtype": stamp["dtype"], "path": str(root)}
    if main:
        what = ("final hidden states" if stamp["kind"] == "hidden" else
                f"top-{stamp['k']} logits + tails at T in {stamp['temperatures']}")
        log.info("teacher cache %s (%s data): %s, %d shards (%d computed), %d tokens, %s, %s, %.1f s, %.1f MB",
                 root, name, action, len(plan), len(todo), cache.num_tokens, what, stamp["dtype"], info["seconds"],
                 cache.nbytes / 1e6)
    return cache, info


# ------------------------------------------------------------------------------------------- reading
class TeacherCache:
    """Read side of a complete cache: memory-mapped shards, rows looked up by sample id.

    Opened only after :func:`prepare_teacher_cache` has verified (or written) every file.
    """

    def __init__(self, root: str | Path):
        """Open the complete cache at ``root`` (its shards memory-mapped)."""
        self.root = Path(root)
        manifest = artifacts.pocl_manifest(self.root)
        if manifest is None or manifest.get("kind") != FORMAT:
            raise CheckpointError(f"{self.root}: not a complete teacher cache (no readable {artifacts.MANIFEST})")
        self.stamp: dict[str, Any] = manifest["stamp_inputs"]
        self.kind: str = self.stamp["kind"]
        self.temperatures = tuple(float(t) for t in self.stamp.get("temperatures", ()))
        self._shards: list[dict[str, np.ndarray]] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # sample id -> (shard, first row, rows)
        self.nbytes = 0
        for j in range(int(manifest["shards"])):
            folder = self.root / _shard_name(j)
            index = json.loads((folder / "samples.json").read_text(encoding="utf-8"))
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS[self.kind]}
            self.nbytes += sum(int(a.nbytes) for a in arrays.values())
            offsets = np.concatenate([[0], np.cumsum(index["tokens"], dtype=np.int64)])
            for i, sample_id in enumerate(index["ids"]):
                self._where[sample_id] = (j, int(offsets[i]), int(index["tokens"][i]))
            self._shards.append(arrays)
        self.num_tokens = sum(rows for _, _, rows in self._where.values())

    def __contains__(self, sample_id: str) -> bool:
        """Whether the cache holds ``sample_id``'s rows."""
        return sample_id in self._where

    @property
    def sample_ids(self) -> list[str]:
        """Every cached sample id, in shard order."""
        return list(self._where)

    def rows(self, sample_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The arrays of these samples' rows, concatenated in this order: the layout
        :func:`pocl.losses.select_response_tokens` gives a batch of them (batch-major, then position).

        Returns CPU tensors, by kind: ``hidden`` [N, H] in the stored dtype; or ``token_ids`` [N, k]
        int64, ``logits`` [N, k] in the stored dtype and ``tail_lse`` [N, n_T] float32.
        """
        parts = []
        for sample_id in sample_ids:
            if sample_id not in self._where:
                raise KeyError(f"sample '{sample_id}' is not in the teacher cache {self.root}")
            j, first, rows = self._where[sample_id]
            parts.append({name: array[first:first + rows] for name, array in self._shards[j].items()})
        out = {}
        for name in ARRAYS[self.kind]:
            value = torch.from_numpy(np.concatenate([p[name] for p in parts]))
            if name == "token_ids":
                value = value.long()
            elif value.dtype == torch.uint16:  # bfloat16 bits
                value = value.view(torch.bfloat16)
            out[name] = value
        return out

    def lookup(self, sample_ids: Sequence[str]) -> TopKTeacher:
        """The :class:`TopKTeacher` of these samples' rows (a ``topk`` cache only; see :meth:`rows`)."""
        if self.kind != "topk":
            raise ValueError(f"{self.root} is a {self.kind} cache, not a topk cache")
        rows = self.rows(sample_ids)
        return TopKTeacher(rows["token_ids"], rows["logits"], rows["tail_lse"], self.temperatures)
