"""Every hash and fingerprint pocl stores, in one place (one implementation per concept).

A stored value must never change for the same input: rankings, teacher caches, checkpoints and SeqKD
caches written by earlier runs are reused only while their stamps still match
(``tests/test_fingerprints.py`` pins every value below on a fixed input).

What each one identifies, and where it is stored:

- :func:`stamp_hash` — a stamp (a dict of the readable inputs a stored result depends on): the first 16
  hex digits of :func:`pocl.config.schema.stable_hash`. The ranking's ``signals_hash``/``order_hash``
  (``ranking.meta.json``, partial journal header), the teacher cache's ``stamp`` (every shard manifest
  and the top manifest) and SeqKD's ``stamp_hash`` (``*.meta.json`` beside the answers).
- :func:`sha256_bytes`, :func:`sha256_file` — the full sha256 of a blob or file: the integrity checksums
  in checkpoint / teacher-cache manifests (``manifest.json``) and of the ``.jsonl`` in ``ranking.meta.json``
  and the SeqKD ``*.meta.json``.
- :func:`line_check` — a 16-digit checksum of one line of the ranking's partial journal
  (``ranking.partial.jsonl``, field ``check``).
- :func:`model_fingerprint` — a model: its config plus, for a local folder, the name, size and
  first/last MiB of each weight file (the spec itself for a hub name). The run's ``teacher`` and
  ``student_init`` fingerprints (``trainer_state.json``, run summary), the ranking's ``student``
  stamp and the experiment matrix's evaluation ``stamp.json``.
- :func:`weights_fingerprint` / :func:`teacher_fingerprint` — the teacher of a teacher cache
  (``stamp_inputs.teacher``): the given model fingerprint, else ``weights-`` + a hash of its state dict.
- :func:`tokenizer_fingerprint` — a tokenizer (vocabulary/model, special tokens, chat template): the
  ranking's ``data.tokenizer`` stamp and SeqKD's ``tokenizer`` stamp.
- :func:`tokenized_fingerprint` — a tokenized dataset (ids, input ids, labels in order): the run's
  ``train_data``/``dev_data`` fingerprints (``trainer_state.json``) and a teacher cache's ``data`` stamp.
- :func:`prompt_hash` — the prompts of tokenized samples (ids and prompt tokens): SeqKD's ``data.prompts``.
- :func:`sample_hashes` — one hash per record (id, rendered prompt, references): ``sample_hash`` of every
  ``ranking.jsonl`` row (``pocl eval --ranking`` checks it); :func:`records_hash` combines them into the
  ranking's ``data.hash`` stamp.
- :func:`stages_fingerprint` — the stages of a run (settings and sample ids): the run's ``stages``
  fingerprint; :func:`run_fingerprints` is every fingerprint a checkpoint records and a resume compares.

Depends only on hashlib/json/numpy (torch imported lazily) and :mod:`pocl.config.schema`, so that any
module may import it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pocl.config.schema import stable_hash

__all__ = ["line_check", "model_fingerprint", "prompt_hash", "records_hash", "run_fingerprints", "sample_hashes",
           "sha256_bytes", "sha256_file", "stable_hash", "stages_fingerprint", "stamp_hash", "teacher_fingerprint",
           "tokenized_fingerprint", "tokenizer_fingerprint", "weights_fingerprint"]


def _short(h) -> str:
    """The first 16 hex digits of a hashlib object: the length of every pocl fingerprint."""
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ generic
def stamp_hash(inputs: Any) -> str:
    """A short (16 hex digits) hash of a stamp: :func:`stable_hash` of its canonical JSON."""
    return stable_hash(inputs)[:16]


def sha256_bytes(blob: bytes) -> str:
    """The sha256 hex digest of ``blob``."""
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def line_check(entry: dict[str, Any]) -> str:
    """The checksum of one journal line (its JSON with sorted keys; NaN allowed)."""
    blob = json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=True)
    return _short(hashlib.sha256(blob.encode("utf-8")))


# ------------------------------------------------------------------------------------------ models
def model_fingerprint(spec: str | None, model=None) -> str:
    """A cheap identity of a model for resume checks: its config plus, for local folders, the name,
    size and first/last MiB of each weight file (hashing a many-GB teacher on every resume would
    take minutes)."""
    h = hashlib.sha256()
    if model is not None:
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    if spec:
        path = Path(os.path.expanduser(spec))
        files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in
                                                        (".safetensors", ".bin", ".gguf", ".pt")) if path.is_dir() else []
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 1 << 20:
                    fh.seek(max(0, size - (1 << 20)))
                    h.update(fh.read(1 << 20))
        if not files:
            h.update(spec.encode())
    return _short(h)


def weights_fingerprint(model) -> str:
    """``weights-`` + a hash of every tensor of the model's state dict (names and raw bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "weights-" + _short(h)


def teacher_fingerprint(teacher, given: str | None) -> str:
    """The pipeline's fingerprint of the teacher (``given``); without one (the trainer built directly), a
    hash of its weights, so that a cache is never reused for another teacher."""
    if given:
        return str(given)
    return weights_fingerprint(teacher)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary/model, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special["chat_template"] = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return _short(h)


# ------------------------------------------------------------------------------------------ data
def tokenized_fingerprint(data) -> str | None:
    """A 16-hex-digit hash of a tokenized dataset (every sample's id, input ids and labels, in order);
    None for no data. What a run's ``train_data``/``dev_data`` fingerprints and a teacher cache's data
    stamp are."""
    if data is None:
        return None
    h = hashlib.sha256()
    for s in data:
        h.update(s.id.encode())
        h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return _short(h)


def prompt_hash(samples: Iterable) -> str:
    """A hash of the prompts of tokenized samples (id and prompt token ids, in order): SeqKD's data stamp."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(b"\0")
        h.update(",".join(map(str, s.input_ids[:s.prompt_length])).encode())
        h.update(b"\n")
    return _short(h)


def sample_hashes(records: Sequence, template) -> list[str]:
    """One hash per record of its id, rendered prompt and references (what ``ranking.jsonl`` stores as
    ``sample_hash``; ``pocl eval --ranking`` checks a ranking against its evaluation set with it)."""
    out = []
    for r in records:
        blob = json.dumps([r.id, template.render(r), r.references], ensure_ascii=False)
        out.append(_short(hashlib.sha256(blob.encode())))
    return out


def records_hash(hashes: Iterable[str]) -> str:
    """One hash of a whole record set from its :func:`sample_hashes` (in order): the ranking's data stamp."""
    return _short(hashlib.sha256("".join(hashes).encode()))


# ------------------------------------------------------------------------------------------ runs
def stages_fingerprint(stages: Sequence) -> str:
    """A hash of the stages of a run: each stage's settings (``to_dict``) and a hash of its sample ids."""
    return _short(hashlib.sha256(json.dumps(
        [dict(s.to_dict(), ids=hashlib.sha256("\n".join(s.sample_ids or ()).encode()).hexdigest())
         for s in stages], sort_keys=True).encode()))


def run_fingerprints(given: dict[str, Any] | None, *, train_data, dev_data, stages: Sequence) -> dict[str, Any]:
    """The fingerprints a checkpoint records and a resume compares: the ``given`` ones (models, data),
    the tokenized training and dev data unless given, and the stages (settings and sample ids)."""
    fingerprints = dict(given or {})
    fingerprints.setdefault("train_data", tokenized_fingerprint(train_data))
    fingerprints.setdefault("dev_data", tokenized_fingerprint(dev_data))
    fingerprints["stages"] = stages_fingerprint(stages)
    return fingerprints
