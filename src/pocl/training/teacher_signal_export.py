"""Writing teacher signal files (the format: :mod:`pocl.training.teacher_signal_io`).

* :func:`export_cache` (``pocl teacher-signal export``): a ``topk`` teacher cache as a Parquet file, one row
  per sample. Only top-k caches are exported: a ``hidden`` cache holds hidden states, whose logits need
  the teacher's LM head (build a top-k cache with ``--teacher-cache topk``; the teacher runs once). The
  stored logits z and tails become logprobs at T = 1: with c = logsumexp over the whole vocabulary of z
  (the top k and the T = 1 tail), ``logprobs = z - c``, ``tail_logprob = tail(T=1) - c`` and, per cached
  temperature T, ``tail_lse = tail(T) - c / T`` (the tail of ``logprob / T``). The divergence on k + 1
  buckets is shift-invariant, so a run on the file equals a run on the cache up to float rounding.
  The cache must hold T = 1 (a schedule with a T = 1 stage: plain KD at T = 1, the POCL curriculum).
* :func:`vllm_row`: one row from vLLM's ``prompt_logprobs`` of a sample's full token sequence.
* :func:`write_signal_file`: rows (dicts) and metadata as a Parquet file, written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pocl import artifacts
from pocl._version import __version__
from pocl.errors import CheckpointError, ConfigError
from pocl.training import teacher_cache as tcache
from pocl.training.teacher_signal_io import FORMAT, FORMAT_VERSION, META_KEY

__all__ = ["export_cache", "find_caches", "signal_schema", "vllm_row", "vllm_rows", "write_signal_file"]


def signal_schema(*, tails: bool, tail_lse: bool, metadata: dict[str, Any] | None = None):
    """The Arrow schema of a teacher signal file (with ``tail_logprob`` / ``tail_lse`` columns or not)."""
    import json

    import pyarrow as pa

    fields = [pa.field("sample_id", pa.string()), pa.field("token_ids", pa.list_(pa.list_(pa.int32()))),
              pa.field("logprobs", pa.list_(pa.list_(pa.float32())))]
    if tails:
        fields.append(pa.field("tail_logprob", pa.list_(pa.float32())))
    if tail_lse:
        fields.append(pa.field("tail_lse", pa.list_(pa.list_(pa.float32()))))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "temperature": 1.0, "pocl_version": __version__,
            **(metadata or {})}
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def _batch(rows: list[dict[str, Any]], schema):
    """A record batch of ``rows`` (dicts of the schema's columns)."""
    import pyarrow as pa

    return pa.RecordBatch.from_pylist(rows, schema=schema)


def write_signal_file(rows: Iterable[dict[str, Any]], out: str | Path, *, metadata: dict[str, Any] | None = None,
                      batch_rows: int = 256) -> Path:
    """Write ``rows`` (``sample_id``, ``token_ids``, ``logprobs`` and optionally ``tail_logprob``, ``tail_lse``:
    nested lists or arrays, one entry per response position) to the Parquet file ``out`` atomically, with
    ``metadata`` (``k``, ``tokenizer_fingerprint``, ``tail_temperatures``, ...) in the schema metadata."""
    import pyarrow.parquet as pq

    out = Path(out)
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise ConfigError(f"{out}: no rows to write")
    schema = signal_schema(tails="tail_logprob" in first, tail_lse="tail_lse" in first, metadata=metadata)
    with artifacts.atomic_open(out, "wb", make_parents=True) as f, pq.ParquetWriter(f, schema) as writer:
        pending = [first]
        for row in rows:
            pending.append(row)
            if len(pending) >= batch_rows:
                writer.write_batch(_batch(pending, schema))
                pending = []
        if pending:
            writer.write_batch(_batch(pending, schema))
    return out


# ------------------------------------------------------------------------------------------- from a cache
def find_caches(root: str | Path) -> list[tuple[str | None, tcache.TeacherCache]]:
    """The complete, verified caches at ``root``: the cache itself, or its ``train`` and ``dev`` caches (the
    ``teacher_cache`` folder of a run; a stage teacher's ``teacher-HASH`` folders are not exported)."""
    root = Path(root)
    top = artifacts.pocl_manifest(root) if root.is_dir() else None
    if top is not None and top.get("kind") == tcache.FORMAT:
        folders = [(None, root)]
    else:
        folders = [(name, root / name) for name in ("train", "dev") if (root / name).is_dir()]
    if not folders:
        raise ConfigError(f"--cache {root}: not a teacher cache (no {artifacts.MANIFEST} of one, no train/ or dev/ "
                          f"cache inside); give the run's teacher_cache folder or one of its caches")
    out = []
    for name, folder in folders:
        try:
            artifacts.verify_folder(folder)
            out.append((name, tcache.TeacherCache(folder)))
        except CheckpointError as exc:
            raise ConfigError(f"--cache {folder}: not a complete teacher cache ({exc}); run the distillation that "
                              f"builds it again (it completes or repairs it)") from exc
    return out


def _cache_rows(cache: tcache.TeacherCache, t1: int) -> Iterable[dict[str, Any]]:
    """The file rows of every sample of a ``topk`` cache (column ``t1`` of its tails is T = 1)."""
    temps = torch.tensor(cache.temperatures, dtype=torch.float64)
    for sample_id in cache.sample_ids:
        rows = cache.rows([sample_id])
        z = rows["logits"].double()
        tails = rows["tail_lse"].double()
        c = torch.logsumexp(torch.cat([z, tails[:, t1:t1 + 1]], dim=-1), dim=-1, keepdim=True)
        yield {"sample_id": sample_id, "token_ids": rows["token_ids"].int().numpy().tolist(),
               "logprobs": (z - c).float().numpy().tolist(),
               "tail_logprob": (tails[:, t1] - c[:, 0]).float().numpy().tolist(),
               "tail_lse": (tails - c / temps).float().numpy().tolist()}


def export_cache(cache: str | Path, out: str | Path, *, tokenizer_fingerprint: str | None) -> dict[str, Any]:
    """Write the ``topk`` cache(s) at ``cache`` (:func:`find_caches`) as the teacher signal file ``out``.

    ``tokenizer_fingerprint``: :func:`pocl.fingerprints.tokenizer_fingerprint` of the tokenizer that made
    the cached data (a cache does not record it). Returns what was written (path, rows, k, temperatures)."""
    caches = find_caches(cache)
    for name, c in caches:
        if c.kind != "topk":
            raise ConfigError(f"--cache {c.root}: a {c.kind} cache; export reads top-k caches only (a hidden "
                              f"cache's logits need the teacher's LM head). Build one with --teacher-cache topk "
                              f"--teacher-cache-topk K --accept-approximation topk-cache")
    stamps = [c.stamp for _, c in caches]
    for key in ("teacher", "k", "temperatures", "vocab_size"):
        if len({repr(s.get(key)) for s in stamps}) > 1:
            raise ConfigError(f"--cache {cache}: its caches differ in {key}: "
                              f"{', '.join(f'{n}: {s.get(key)}' for (n, _), s in zip(caches, stamps))}")
    temps = list(caches[0][1].temperatures)
    t1 = next((j for j, t in enumerate(temps) if math.isclose(t, 1.0, rel_tol=1e-9)), None)
    if t1 is None:
        raise ConfigError(f"--cache {cache}: its tails are at T = {temps}, without T = 1, so the logprobs at T = 1 "
                          f"cannot be normalised; build the cache for a schedule with a T = 1 stage")
    ids: set[str] = set()
    for name, c in caches:
        both = ids & set(c.sample_ids)
        if both:
            raise ConfigError(f"--cache {cache}: sample id {min(both)!r} is in more than one cache")
        ids |= set(c.sample_ids)
    stamp = stamps[0]
    metadata = {"source": "pocl teacher cache", "k": int(stamp["k"]), "tail_temperatures": temps,
                "teacher_fingerprint": stamp["teacher"], "teacher_dtype": stamp.get("teacher_dtype"),
                "tokenizer_fingerprint": tokenizer_fingerprint, "vocab_size": int(stamp["vocab_size"]),
                "cache_dtype": stamp["dtype"], "data_fingerprint": {name or "data": s["data"]
                                                                    for (name, _), s in zip(caches, stamps)}}
    rows = (row for name, c in caches for row in _cache_rows(c, t1))
    path = write_signal_file(rows, out, metadata=metadata)
    return {"path": str(path), "rows": len(ids), "k": metadata["k"], "temperatures": temps,
            "caches": [str(c.root) for _, c in caches], "tokens": sum(c.num_tokens for _, c in caches)}


# ------------------------------------------------------------------------------------------- from vLLM
def _logprob(value: Any) -> float:
    """A vLLM ``Logprob`` (its ``.logprob``) or a plain number."""
    return float(getattr(value, "logprob", value))


def vllm_row(sample_id: str, prompt_logprobs: Sequence[dict[int, Any] | None], labels: Sequence[int], *,
             k: int) -> dict[str, Any]:
    """One file row from vLLM's ``prompt_logprobs`` (``SamplingParams(prompt_logprobs=K)``) of a sample.

    Args:
        prompt_logprobs: ``RequestOutput.prompt_logprobs`` of the sample's full token sequence (its pocl
            ``input_ids``: prompt and response, given to vLLM as the prompt): one entry per token, the first
            None; entry i maps token id -> logprob (a float or a vLLM ``Logprob``) for the top K tokens at
            position i, plus token i itself when it is not among them.
        labels: the sample's pocl labels (-100 outside the response), as long as ``prompt_logprobs``.
        k: tokens kept per position: the K given to vLLM (or less). The k largest logprobs are kept, so an
            extra actual token goes to the tail.

    Returns:
        ``{"sample_id", "token_ids", "logprobs"}`` for the response positions: entry i for each i >= 1 with
        ``labels[i] != -100`` (the distribution that predicts response token i). No tail column: the reader
        takes ``log(1 - sum(exp(logprobs)))``.
    """
    labels = list(labels)
    if len(prompt_logprobs) != len(labels):
        raise ConfigError(f"sample {sample_id!r}: prompt_logprobs has {len(prompt_logprobs)} entries, the tokenized "
                          f"sample {len(labels)} tokens (give vLLM the sample's input_ids as the prompt)")
    entries = []
    for i in range(1, len(labels)):
        if labels[i] == -100:
            continue
        d = prompt_logprobs[i]
        if not d:
            raise ConfigError(f"sample {sample_id!r}: prompt_logprobs[{i}] is empty (a response position)")
        entries.append(sorted(((_logprob(v), int(t)) for t, v in d.items()), key=lambda e: (-e[0], e[1])))
    kk = int(k)
    if kk < 1:
        raise ConfigError(f"sample {sample_id!r}: k must be >= 1; got {k}")
    if entries and kk > min(len(e) for e in entries):
        raise ConfigError(f"sample {sample_id!r}: k = {kk}, but a position has only {min(len(e) for e in entries)} "
                          f"logprobs")
    token_ids, logprobs = [], []
    for e in entries:
        kept = sorted(e[:kk], key=lambda x: x[1])  # ids ascending, as pocl's caches store them
        token_ids.append([t for _, t in kept])
        logprobs.append([lp for lp, _ in kept])
    return {"sample_id": str(sample_id), "token_ids": token_ids, "logprobs": logprobs}


def vllm_rows(samples: Iterable, outputs: Iterable, *, k: int) -> Iterable[dict[str, Any]]:
    """:func:`vllm_row` of each pocl ``TokenizedSample`` and its vLLM ``RequestOutput`` (in the same order)."""
    for sample, output in zip(samples, outputs, strict=True):
        yield vllm_row(sample.id, getattr(output, "prompt_logprobs", output), sample.labels, k=k)
