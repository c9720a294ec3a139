"""The ranking file: the measurer's output, stamped so that it is reused only when it still applies.

Two files are written, both atomically (temporary file + ``os.replace``, the metadata last)::

    ranking.jsonl       one line per sample, easiest first:
                        {"id", "rank", "score", "rouge_l", "loss", "rouge_rank", "loss_rank",
                         "generation", "sample_hash"}
    ranking.meta.json   format version, signals_hash and order_hash with their readable inputs,
                        the signals present, counts, timings, sha256 and size of the .jsonl,
                        pocl version

``signals_hash`` stamps what the signals depend on: the student (its fingerprint), the data (ids,
rendered prompts, references; tokenizer; tokenisation settings) and the generation settings.
``order_hash`` stamps how the order is made from the signals (measurer, k, and the seed for
``random``). :func:`load_or_compute_ranking` reuses a file whose two stamps match, re-ranks from
the stored signals when only the order changed, measures only the missing signal when the file
lacks one, and otherwise measures again -- logging why in plain words. A file that fails its
checksum is never used.

Readers that only need the order (evaluation by difficulty) may read the ``id`` and ``rank`` keys
of the ``.jsonl`` lines; those keys are stable.

**Interrupted measurements resume.** While the signals are measured, every finished batch is
appended to ``ranking.partial.jsonl`` next to the ranking (flushed and fsynced; a header line holds
the ``signals_hash`` of the measurement, every batch line its own checksum). A run that is killed
(SIGKILL, power loss, Ctrl-C) and started again reuses the batches of a partial file whose stamp
matches, measures only the others, and deletes the partial file once the ranking is written. A
partial file with another stamp is discarded (the log says why); a line cut by a crash or damaged
later fails its checksum and only that batch is measured again. With several processes the batches
are measured in rounds (one per process), gathered after each round and appended by the main
process only, so the partial file is the same as a one-process run's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pocl._version import __version__
from pocl.atomic import atomic_write
from pocl.configuration import stable_hash
from pocl.data import Record, get_template
from pocl.errors import CheckpointError, ConfigError
from pocl.generation import effective_settings, special_token_ids

from .difficulty import (SIGNALS, RankedSample, SampleDifficulty, difficulties_from_ranking, measure_difficulty,
                         measurer_needs, rank_samples, ranking_decoding)

log = logging.getLogger("pocl.curriculum")

FORMAT = "pocl-ranking"
FORMAT_VERSION = 1
#: Seed of the measurer's generations. Fixed (not the training seed), so that runs that differ only
#: in their training seed share one ranking.
GENERATION_SEED = 0

LINE_KEYS = ("id", "rank", "score", "rouge_l", "loss", "rouge_rank", "loss_rank", "generation")

__all__ = ["FORMAT_VERSION", "GENERATION_SEED", "meta_path", "partial_path", "ranking_data_settings", "signals_inputs",
           "order_inputs", "write_ranking", "read_ranking", "load_or_compute_ranking", "tokenizer_fingerprint",
           "ranked_ids", "ranking_path", "prepare_curriculum"]


# ------------------------------------------------------------------------------------------- stamps
def meta_path(path: str | os.PathLike) -> Path:
    """``ranking.jsonl`` -> ``ranking.meta.json`` (next to it)."""
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".meta.json")


def partial_path(path: str | os.PathLike) -> Path:
    """``ranking.jsonl`` -> ``ranking.partial.jsonl``: the batches of an unfinished measurement."""
    path = Path(path)
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".partial.jsonl")


def ranking_data_settings(data_config) -> dict[str, Any]:
    """The tokenisation settings of a :class:`pocl.config.DataConfig` that the signals depend on."""
    return {"template": data_config.template, "use_prompt_field": data_config.use_prompt_field,
            "max_length": data_config.max_length, "max_prompt_length": data_config.max_prompt_length,
            "truncation_side": data_config.truncation_side}


def _settings(data_settings: dict[str, Any], tokenizer) -> tuple[dict[str, Any], Any]:
    """Normalised settings (``use_prompt_field`` resolved, so None and its default value stamp alike)
    and the prompt template."""
    missing = [k for k in ("template", "max_length", "max_prompt_length") if k not in data_settings]
    if missing:
        raise ConfigError(f"data_settings lacks {', '.join(missing)} (use ranking_data_settings(config.data))")
    template = get_template(data_settings["template"], tokenizer,
                            use_prompt_field=data_settings.get("use_prompt_field"))
    out = {"template": data_settings["template"], "use_prompt_field": bool(template.use_prompt_field),
           "max_length": data_settings["max_length"], "max_prompt_length": data_settings["max_prompt_length"],
           "truncation_side": data_settings.get("truncation_side", "left")}
    out.update({k: v for k, v in data_settings.items() if k not in out})
    return out, template


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
    return h.hexdigest()[:16]


def sample_hashes(records: Sequence[Record], template) -> list[str]:
    """One hash per record of its id, rendered prompt and references (what ``ranking.jsonl`` stores as
    ``sample_hash``; ``pocl eval --ranking`` checks a ranking against its evaluation set with it)."""
    out = []
    for r in records:
        blob = json.dumps([r.id, template.render(r), r.references], ensure_ascii=False)
        out.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return out


def _generation_inputs(curriculum, tokenizer) -> dict[str, Any]:
    d = ranking_decoding(curriculum)
    eos, pad = special_token_ids(tokenizer)
    return {"rank_temperature": d.temperature, "rank_top_p": d.top_p, "rank_top_k": d.top_k,
            "rank_no_repeat_ngram_size": d.no_repeat_ngram_size, "rank_max_new_tokens": d.max_new_tokens,
            "rank_batch_size": curriculum.rank_batch_size, "generation_seed": GENERATION_SEED,
            # What transformers' generate really receives: a ranking made when a missing top_k was filled in
            # with 50 (or from the student's generation_config) has another stamp and is measured again.
            "transformers_generate": effective_settings(d, eos_token_id=eos, pad_token_id=pad)}


def signals_inputs(*, records: Sequence[Record], tokenizer, model_fingerprint: str, curriculum,
                   data_settings: dict[str, Any], _hashes: list[str] | None = None) -> dict[str, Any]:
    """The readable inputs of ``signals_hash``: student, data, generation settings."""
    settings, template = _settings(data_settings, tokenizer)
    if _hashes is None:
        _hashes = sample_hashes(records, template)
    return {
        "student": model_fingerprint,
        "data": {"samples": len(records), "hash": hashlib.sha256("".join(_hashes).encode()).hexdigest()[:16],
                 "first_id": records[0].id if records else None, "last_id": records[-1].id if records else None,
                 "settings": settings, "tokenizer": tokenizer_fingerprint(tokenizer)},
        "generation": _generation_inputs(curriculum, tokenizer),
    }


def order_inputs(curriculum, seed: int) -> dict[str, Any]:
    """The readable inputs of ``order_hash``: measurer, k (not for random), seed (random only)."""
    measurer = curriculum.measurer
    return {"measurer": measurer, "rrf_k": None if measurer == "random" else curriculum.rrf_k,
            "seed": seed if measurer == "random" else None}


def _hash(inputs: dict[str, Any]) -> str:
    return stable_hash(inputs)[:16]


# ------------------------------------------------------------------------------------------- file I/O
def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc} (errno {exc.errno}); the previous "
                              f"file, if any, is unchanged") from exc


def write_ranking(path: str | os.PathLike, ranking: Sequence[RankedSample], meta: dict[str, Any],
                  sample_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``ranking`` (easiest first) and its metadata; returns the metadata as written.

    ``meta`` supplies the stamps (signals_hash, order_hash and their inputs, timings ...); format,
    counts, checksum and version are added here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in ranking:
        row = {k: getattr(r, k) for k in LINE_KEYS}
        if sample_hashes is not None:
            row["sample_hash"] = sample_hashes.get(r.id)
        lines.append(json.dumps(row, ensure_ascii=False))
    blob = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    signals = [s for s in SIGNALS if ranking and all(getattr(r, s) is not None for r in ranking)]
    full = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pocl_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "signals": signals,
        "counts": {"samples": len(ranking), **{f"with_{s}": sum(getattr(r, s) is not None for r in ranking)
                                               for s in SIGNALS}},
        "jsonl": {"name": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
    }
    _atomic_write(path, blob)
    _atomic_write(meta_path(path), (json.dumps(full, indent=2, sort_keys=False, default=str) + "\n").encode())
    return full


def read_ranking(path: str | os.PathLike) -> tuple[list[RankedSample], dict[str, Any]]:
    """Read a ranking file and its metadata, checking the checksum and the line structure.

    Raises :class:`CheckpointError` when a file is missing, truncated, edited or malformed.
    """
    ranking, meta, _ = _read_ranking(Path(path))
    return ranking, meta


def _read_ranking(path: Path) -> tuple[list[RankedSample], dict[str, Any], dict[str, str]]:

    def corrupt(detail: str) -> CheckpointError:
        return CheckpointError(f"the ranking file {path} is corrupt: {detail}")

    if not path.is_file():
        raise CheckpointError(f"no ranking file at {path}")
    mpath = meta_path(path)
    if not mpath.is_file():
        raise corrupt(f"its metadata {mpath.name} is missing (the write did not finish, or the file was not "
                      "written by pocl)")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise corrupt(f"its metadata {mpath.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise corrupt(f"{mpath.name} is not the metadata of a pocl ranking")
    if meta.get("format_version") != FORMAT_VERSION:
        raise corrupt(f"format version {meta.get('format_version')}, this pocl reads {FORMAT_VERSION}")
    blob = path.read_bytes()
    expected = meta.get("jsonl") or {}
    if len(blob) != expected.get("bytes"):
        raise corrupt(f"{len(blob)} bytes, the metadata says {expected.get('bytes')} (truncated or changed)")
    if hashlib.sha256(blob).hexdigest() != expected.get("sha256"):
        raise corrupt("its sha256 does not match the metadata (the file was changed)")
    ranking: list[RankedSample] = []
    hashes: dict[str, str] = {}
    for n, line in enumerate(blob.decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            sample = RankedSample(**{k: row.get(k) for k in LINE_KEYS})
        except (ValueError, TypeError) as exc:
            raise corrupt(f"line {n} is not a ranking entry ({exc})") from None
        if sample.rank != n or not isinstance(sample.id, str):
            raise corrupt(f"line {n} has rank {sample.rank!r} and id {sample.id!r}")
        if row.get("sample_hash"):
            hashes[sample.id] = row["sample_hash"]
        ranking.append(sample)
    if len(ranking) != (meta.get("counts") or {}).get("samples"):
        raise corrupt(f"{len(ranking)} lines, the metadata says {(meta.get('counts') or {}).get('samples')}")
    return ranking, meta, hashes


# ------------------------------------------------------------------------------------------- partial measurement
PARTIAL_FORMAT = "pocl-ranking-partial"
PARTIAL_FORMAT_VERSION = 1


def _line_check(entry: dict[str, Any]) -> str:
    blob = json.dumps(entry, sort_keys=True, ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


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
            sound = (check == _line_check(entry) and entry["signal"] in SIGNALS and isinstance(entry["batch"], int)
                     and isinstance(entry["ids"], list))
        except (ValueError, TypeError, KeyError, AttributeError):
            sound = False
        if sound:
            entries.append((raw, entry))
        else:
            damaged += 1
    return header, entries, damaged


class _PartialMeasurement:
    """The journal of an unfinished measurement: ``ranking.partial.jsonl`` (a
    :class:`pocl.curriculum.difficulty.BatchJournal`).

    Every process reads the file when the measurement starts; only the main process writes it.
    With several processes, :meth:`commit` gathers each round's batches from all processes, so
    every process knows every result and the main process appends them all.
    """

    def __init__(self, path: Path, signals_hash: str, dist: "_Distributed"):
        self.path = path
        self.stamp = signals_hash
        self.dist = dist
        self.entries: dict[tuple[str, int], dict[str, Any]] = {}
        self.reused: dict[str, int] = {s: 0 for s in SIGNALS}
        self.measured: dict[str, int] = {s: 0 for s in SIGNALS}
        self._reused_seconds: dict[str, float] = {s: 0.0 for s in SIGNALS}
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
            _atomic_write(path, blob)
            try:
                self._fh = open(path, "ab")
            except OSError as exc:
                raise CheckpointError(f"cannot open {path} for writing: {exc.strerror or exc}") from exc

    def stored_batches(self, signal: str) -> int:
        return sum(1 for (s, _) in self.entries if s == signal)

    # -- BatchJournal
    def lookup(self, signal: str, batch: int, ids) -> dict[str, Any] | None:
        entry = self.entries.get((signal, batch))
        if entry is None or entry["ids"] != list(ids):
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
                self.measured[signal] += 1
                entry = {"signal": signal, "batch": batch, "ids": list(ids), **payload}
                self.entries[(signal, batch)] = entry
                if self._fh is not None:
                    self._append(entry)
            else:
                self.reused[signal] += 1
                self._reused_seconds[signal] += float(payload.get("seconds") or 0.0)
            out.append((batch, payload))
        return out

    def stored_seconds(self, signal: str) -> float:
        return self._reused_seconds[signal]

    # -- file
    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({**entry, "check": _line_check(entry)}, ensure_ascii=False, allow_nan=True)
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
        parts = [f"{self.reused[s]} of {self.reused[s] + self.measured[s]} {_SIGNAL_WORD[s]} batches"
                 for s in sorted(signals) if self.reused[s]]
        return " and ".join(parts)


_SIGNAL_WORD = {"loss": "loss", "rouge_l": "generation"}


def _drop_leftover_partial(path: Path, signals_hash: str, dist: "_Distributed") -> None:
    """A partial file of the measurement that produced the (complete) ranking file being used now is a
    leftover of a run killed between writing the ranking and deleting it."""
    part = partial_path(path)
    if dist.is_main and part.exists():
        header, _, _ = _read_partial(part)
        if header is not None and header.get("signals_hash") == signals_hash:
            part.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- reuse rules
def _fmt(value) -> str:
    return "None" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key old -> new`` for every differing key; nested dicts by their own keys (``a.b 1 -> 2``)."""
    keys = [k for k in new if k in old] + [k for k in new if k not in old] + [k for k in old if k not in new]
    out = []
    for k in dict.fromkeys(keys):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a is None and isinstance(b, dict):  # a stamp from before the key existed
            out.append(f"{prefix}{k} not recorded -> {len(b)} settings")
        else:
            out.append(f"{prefix}{k} {_fmt(a)} -> {_fmt(b)}")
    return out


def _why_signals_differ(old: dict, new: dict, old_hashes: dict[str, str], new_hashes: dict[str, str]) -> str:
    reasons = []
    if old.get("student") != new["student"]:
        reasons.append(f"the student changed (fingerprint {old.get('student')} -> {new['student']})")
    od, nd = old.get("data") or {}, new["data"]
    settings_changed = od.get("settings") != nd["settings"]
    tokenizer_changed = od.get("tokenizer") != nd["tokenizer"]
    if settings_changed:
        reasons.append("data settings changed: " + ", ".join(_changes(od.get("settings") or {}, nd["settings"])))
    if tokenizer_changed:
        reasons.append(f"the tokenizer changed (fingerprint {od.get('tokenizer')} -> {nd['tokenizer']})")
    if od.get("samples") != nd["samples"] or od.get("hash") != nd["hash"]:
        added = [i for i in new_hashes if i not in old_hashes]
        removed = [i for i in old_hashes if i not in new_hashes]
        changed = [i for i in new_hashes if i in old_hashes and old_hashes[i] != new_hashes[i]]
        parts = []
        for what, ids in (("added", added), ("removed", removed), ("changed", changed)):
            if ids:
                parts.append(f"{len(ids)} {what}, e.g. '{ids[0]}'")
        if od.get("samples") != nd["samples"]:
            reasons.append(f"the data changed ({od.get('samples')} samples in the ranking file vs {nd['samples']} "
                           "now" + (f"; {'; '.join(parts)}" if parts else "") + ")")
        elif not (settings_changed or tokenizer_changed) or added or removed:
            detail = "; ".join(parts) if parts else "same ids, different order"
            reasons.append(f"the data changed ({nd['samples']} samples: {detail})")
    gen = _changes(old.get("generation") or {}, new["generation"])
    if gen:
        reasons.append("settings changed: " + ", ".join(gen))
    return "; ".join(reasons) or "the inputs of the signals changed"


def _resolve_model(model):
    import torch

    if isinstance(model, torch.nn.Module):
        return model
    if callable(model):
        loaded = model()
        if not isinstance(loaded, torch.nn.Module):
            raise ConfigError(f"the model loader returned {type(loaded).__name__}, not a torch module")
        return loaded
    raise ConfigError(f"model must be a torch module or a function that loads one (got {type(model).__name__})")


def load_or_compute_ranking(path: str | os.PathLike, *, records: Sequence[Record], tokenizer,
                            model: Any | Callable[[], Any], model_fingerprint: str, curriculum,
                            data_settings: dict[str, Any], seed: int, progress: bool = True,
                            device=None) -> tuple[list[RankedSample], dict[str, Any]]:
    """The ranking of ``records`` under ``curriculum``: reused from ``path`` when still valid, else measured.

    * both stamps match: the file is reused (nothing is run; ``model`` is not even loaded);
    * only ``order_hash`` differs (measurer, k, seed of ``random``) and the file holds the signals
      the new measurer needs: re-ranked from the stored signals (no generation, no forward pass);
    * ``signals_hash`` matches but a needed signal is absent (the file was made by a measurer that
      did not need it): only that signal is measured;
    * otherwise (no file, corrupt file, another student, other data, other settings): measured
      again. The reason is logged and returned.

    ``model`` is the initial student (an ``nn.Module``) or a zero-argument function that loads it
    (called only when something must be measured). ``model_fingerprint`` identifies it
    (:func:`pocl.models.model_fingerprint`); ``data_settings`` are the tokenisation settings
    (:func:`ranking_data_settings`). ``seed`` only matters to the ``random`` measurer; generations
    use :data:`GENERATION_SEED`. ``device``: measure there (the model is moved back afterwards).

    Batches measured before an interruption are taken from ``ranking.partial.jsonl``
    (:func:`partial_path`) when its stamp matches; only the others are measured.

    Returns ``(ranking, info)``; ``info`` has ``reused`` (nothing was measured), ``action``
    (reused, reranked, completed, computed), ``reason``, ``seconds``, ``measured`` (signals measured
    now), ``batches`` (per measured signal: batches ``measured`` now and ``reused`` from the partial
    file), ``path`` and ``meta``.
    """
    t0 = time.perf_counter()
    path = Path(path)
    records = list(records)
    if not records:
        raise ConfigError("nothing to rank: no training samples")
    # The measurer's answers must fit the student's context after the longest prompt: a default
    # --rank-max-new-tokens is clipped (one warning), a given one that cannot fit is refused here,
    # before anything is read or written (`pocl distill` has done this with the run's config already).
    from pocl.context_length import fit_ranking_curriculum

    curriculum = fit_ranking_curriculum(curriculum, model, data_settings)
    dist = _Distributed()
    dist.barrier()  # every process decides on the same file state (none is written before the gather)
    needs = measurer_needs(curriculum.measurer)
    settings, template = _settings(data_settings, tokenizer)
    hashes = sample_hashes(records, template)
    new_hashes = {r.id: h for r, h in zip(records, hashes)}
    sig_in = signals_inputs(records=records, tokenizer=tokenizer, model_fingerprint=model_fingerprint,
                            curriculum=curriculum, data_settings=settings, _hashes=hashes)
    ord_in = order_inputs(curriculum, seed)
    sig_hash, ord_hash = _hash(sig_in), _hash(ord_in)

    stored: list[RankedSample] | None = None
    meta: dict[str, Any] = {}
    old_hashes: dict[str, str] = {}
    if not path.exists():
        reason = f"no ranking file at {path}"
    else:
        try:
            stored, meta, old_hashes = _read_ranking(path)
        except CheckpointError as exc:
            reason = str(exc)
        else:
            if meta.get("signals_hash") != sig_hash:
                reason = _why_signals_differ(meta.get("signals_inputs") or {}, sig_in, old_hashes, new_hashes)
                stored = None

    def info(action: str, why: str, measured: Sequence[str], out_meta: dict) -> dict[str, Any]:
        return {"reused": action in ("reused", "reranked"), "action": action, "reason": why,
                "seconds": time.perf_counter() - t0, "measured": sorted(measured), "path": str(path),
                "meta": out_meta, "timings": out_meta.get("timings", {}), "batches": {}}

    base_meta = {"signals_hash": sig_hash, "signals_inputs": sig_in, "order_hash": ord_hash, "order_inputs": ord_in}
    to_measure = set(needs)
    previous: dict[str, SampleDifficulty] = {}
    timings: dict[str, float] = {}
    if stored is not None:
        have = set(meta.get("signals") or [])
        missing = needs - have
        old_timings = dict(meta.get("timings") or {})
        if not missing and meta.get("order_hash") == ord_hash:
            why = f"reusing {path}: same student, data and settings"
            log.info("ranking: %s", why)
            _drop_leftover_partial(path, sig_hash, dist)
            return stored, info("reused", why, (), meta)
        if not missing:
            changes = ", ".join(_changes(meta.get("order_inputs") or {}, ord_in)) or "order settings changed"
            why = f"re-ranking the stored signals of {path} ({changes}); nothing is measured again"
            log.info("ranking: %s", why)
            t1 = time.perf_counter()
            ranking = rank_samples(difficulties_from_ranking(stored), curriculum.measurer, k=curriculum.rrf_k,
                                   seed=seed)
            timings = {k: v for k, v in old_timings.items() if k in ("loss_seconds", "generate_seconds")}
            timings["rank_seconds"] = time.perf_counter() - t1
            out = dist.write(path, ranking, {**base_meta, "timings": timings}, new_hashes)
            _drop_leftover_partial(path, sig_hash, dist)
            return ranking, info("reranked", why, (), out)
        to_measure = set(missing)
        previous = {d.id: d for d in difficulties_from_ranking(stored)}
        timings = {f"{s}_seconds": old_timings[f"{s}_seconds"] for s in ("loss", "generate")
                   if f"{s}_seconds" in old_timings}
        made_by = (meta.get("order_inputs") or {}).get("measurer")
        reason = (f"{path} has no {' and '.join(sorted(missing))} signal (it was made for measurer "
                  f"'{made_by}'); measuring only that")
        action = "completed"
    else:
        action = "computed"
    log.info("ranking: measuring %s: %s", " and ".join(sorted(to_measure)) or "nothing", reason)

    difficulties = [previous.get(r.id) or SampleDifficulty(r.id) for r in records]
    batches: dict[str, dict[str, int]] = {}
    journal = None
    if to_measure:
        journal = _PartialMeasurement(partial_path(path), sig_hash, dist)
        if journal.note:
            log.warning("ranking: %s", journal.note)
        stored_counts = {s: journal.stored_batches(s) for s in to_measure if journal.stored_batches(s)}
        if stored_counts:
            log.info("ranking: resuming an interrupted measurement from %s (%s already done)", journal.path,
                     ", ".join(f"{n} {_SIGNAL_WORD[s]} batches" for s, n in sorted(stored_counts.items())))
        try:
            student = _resolve_model(model)
            original_device = None
            if device is not None:
                import torch

                original_device = next(student.parameters()).device
                student.to(torch.device(device))
            try:
                measured = measure_difficulty(
                    student, tokenizer, records, template=template, max_length=settings["max_length"],
                    max_prompt_length=settings["max_prompt_length"], truncation_side=settings["truncation_side"],
                    decoding=ranking_decoding(curriculum), batch_size=curriculum.rank_batch_size,
                    need_rouge="rouge_l" in to_measure, need_loss="loss" in to_measure, seed=GENERATION_SEED,
                    progress=progress and dist.is_main, timings=timings, shard=(dist.rank, dist.world),
                    journal=journal)
            finally:
                if original_device is not None:
                    student.to(original_device)
        finally:
            journal.close()
        # With the journal every process received every batch of every round: nothing left to gather.
        for d, m in zip(difficulties, measured):
            if "loss" in to_measure:
                d.loss = m.loss
            if "rouge_l" in to_measure:
                d.rouge_l, d.generation = m.rouge_l, m.generation
        batches = {s: {"measured": journal.measured[s], "reused": journal.reused[s]} for s in sorted(to_measure)}
        resumed = journal.summary(to_measure)
        if resumed:
            reason += f"; resumed an interrupted measurement ({resumed} were already done)"
    t1 = time.perf_counter()
    ranking = rank_samples(difficulties, curriculum.measurer, k=curriculum.rrf_k, seed=seed)
    timings["rank_seconds"] = time.perf_counter() - t1
    out = dist.write(path, ranking, {**base_meta, "timings": timings}, new_hashes)
    if journal is not None:
        journal.finish()
    log.info("ranking: %d samples ranked by %s in %.1f s; written to %s", len(ranking), curriculum.measurer,
             time.perf_counter() - t0, path)
    result = info(action, reason, to_measure, out)
    result["batches"] = batches
    return ranking, result


class _Distributed:
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


def ranked_ids(ranking: Sequence[RankedSample]) -> list[str]:
    """The ids of a ranking, easiest first."""
    return [r.id for r in ranking]


def ranking_path(config) -> Path:
    """Where a run's ranking lives: ``curriculum.ranking_file``, else ``OUTPUT_DIR/ranking.jsonl``
    (the rule of both ``pocl rank`` and ``pocl distill``)."""
    return Path(config.curriculum.ranking_file or Path(config.train.output_dir) / "ranking.jsonl")


def prepare_curriculum(config, *, records: Sequence[Record], tokenizer, model, model_fingerprint: str,
                       device=None, max_steps_per_stage: int | None = None):
    """Ranking plus Baby Step stages for a :class:`pocl.config.DistillConfig` with ``curriculum: pocl``.

    Calls :func:`load_or_compute_ranking` (file :func:`ranking_path`, tokenisation settings of
    ``config.data``, seed ``config.train.seed``) and then
    :func:`pocl.curriculum.schedule.baby_step_stages` with ``base_skew = config.loss.skew``.
    Returns ``(stages, ranking, info)``.
    """
    from .schedule import baby_step_stages

    ranking, info = load_or_compute_ranking(
        ranking_path(config), records=records, tokenizer=tokenizer, model=model,
        model_fingerprint=model_fingerprint, curriculum=config.curriculum,
        data_settings=ranking_data_settings(config.data), seed=config.train.seed,
        progress=config.train.progress, device=device)
    stages = baby_step_stages(ranked_ids(ranking), config.curriculum, base_skew=config.loss.skew,
                              max_steps_per_stage=max_steps_per_stage)
    return stages, ranking, info
