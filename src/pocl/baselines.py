"""The CE-only baselines of the POCL results table: SFT and sequence-level KD (SeqKD).

``loss.method`` chooses what the student trains on:

* ``kd`` (default): the teacher's distributions on the reference responses (and, with
  ``loss.on_policy_fraction`` > 0, on the student's own samples: GKD; see ``pocl.training.onpolicy``);
* ``sft``: plain supervised fine-tuning on the references -- every stage has alpha = 0, the teacher
  is never evaluated;
* ``seqkd`` (Kim & Rush 2016): the teacher answers every training prompt once (batched
  generation, greedy by default), and the student trains with cross-entropy only (alpha = 0) on
  those answers instead of the references.

Both compose with ``curriculum: pocl``: the stages keep their subsets, temperatures and schedule,
with alpha 0. With ``seqkd`` the difficulty measurer scores the student against the teacher's
answers (the targets it will train on).

The teacher's answers are cached in ``OUTPUT_DIR/seqkd_teacher.jsonl`` (one line per training
sample: ``id``, generated ``token_ids``, ``stopped_at_eos``, ``text``) with a stamp in
``seqkd_teacher.meta.json`` (teacher fingerprint, prompt tokens, tokenizer, generation settings,
sha256 of the ``.jsonl``), written atomically, and reused only when the stamp matches; the log says
why it is generated again otherwise. Training samples are built from the token ids (prompt tokens,
masked; the teacher's tokens; EOS when the teacher stopped), exactly like on-policy samples, so the
text is never re-tokenised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pocl.artifacts import Stamp, StampedFile
from pocl.data import TokenizationStats, TokenizedDataset, TokenizedSample
from pocl.errors import CheckpointError, ConfigError
from pocl.fingerprints import prompt_hash, tokenizer_fingerprint
from pocl.generation import (DecodingConfig, Generation, effective_settings, generate, length_sorted_batches,
                             special_token_ids)
from pocl.training.onpolicy import generated_sample
from pocl.training.stages import Stage
from pocl.training.trainer import SEQKD_ORIGIN

log = logging.getLogger("pocl.baselines")

SEQKD_FILE = "seqkd_teacher.jsonl"
SEQKD_FORMAT = "pocl-seqkd-teacher"
SEQKD_FORMAT_VERSION = 1
#: Seed of the teacher's generations (fixed: runs that differ only in their training seed share them).
SEQKD_SEED = 0

__all__ = ["SEQKD_FILE", "apply_method", "method_stages", "seqkd_decoding", "teacher_responses"]


# ------------------------------------------------------------------------------------------ stages
def method_stages(config, stages: Sequence[Stage]) -> list[Stage]:
    """The stages of ``config.loss.method``: unchanged for kd; alpha 0 in every stage for seqkd and sft
    (cross-entropy only; the temperature then plays no role)."""
    if config.loss.distills:
        return list(stages)
    return [dataclasses.replace(s, alpha=0.0) for s in stages]


# ------------------------------------------------------------------------------------------ seqkd
def seqkd_decoding(loss_config) -> DecodingConfig:
    """The teacher's decoding for SeqKD: greedy (default) or sampling at T = 1, top-p 1; no top-k and no
    n-gram blocking (the answers should be the teacher's own distribution)."""
    common = dict(max_new_tokens=loss_config.seqkd_max_new_tokens, no_repeat_ngram_size=0, top_k=0)
    if loss_config.seqkd_sampling:
        return DecodingConfig(do_sample=True, temperature=1.0, top_p=1.0, **common)
    return DecodingConfig.greedy(**common)


def _file(path: Path) -> StampedFile:
    """The SeqKD answers at ``path`` as a stamped file (``NAME.jsonl`` + ``NAME.meta.json``)."""
    return StampedFile(path, format=SEQKD_FORMAT, version=SEQKD_FORMAT_VERSION, label="the SeqKD answers")


#: Readable names of the stamp's keys in the reason a file is generated again.
_STAMP_LABELS = {"teacher": "teacher (fingerprint)", "tokenizer": "tokenizer (fingerprint)",
                 "data.prompts": "data.prompts (hash)"}


def _stamp_inputs(*, teacher_fingerprint: str | None, tokenizer, samples: Sequence[TokenizedSample],
                  decoding: DecodingConfig, batch_size: int) -> dict[str, Any]:
    eos, pad = special_token_ids(tokenizer)
    return {
        "teacher": teacher_fingerprint,
        "data": {"samples": len(samples), "prompts": prompt_hash(samples),
                 "first_id": samples[0].id if samples else None, "last_id": samples[-1].id if samples else None},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "generation": {**dataclasses.asdict(decoding), "batch_size": batch_size, "seed": SEQKD_SEED},
        # What generate hands to transformers. Caches written before pocl set every knob explicitly
        # lack it: they may hold answers sampled with top-k 50 or the teacher's generation_config.
        "transformers_generate": effective_settings(decoding, eos_token_id=eos, pad_token_id=pad),
    }


def _read(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Lines and metadata of a cache file; FileNotFoundError when there is none, CheckpointError when
    it is damaged (:meth:`pocl.artifacts.StampedFile.read`)."""
    blob, meta = _file(path).read()
    return [json.loads(line) for line in blob.decode("utf-8").splitlines() if line.strip()], meta


def _write(path: Path, samples: Sequence[TokenizedSample], gens: Sequence[Generation], meta: dict[str, Any]) -> None:
    blob = "".join(json.dumps({"id": s.id, "token_ids": list(g.token_ids), "stopped_at_eos": g.stopped_at_eos,
                               "text": g.text}, ensure_ascii=False) + "\n" for s, g in zip(samples, gens)).encode()
    _file(path).write(blob, meta, sort_keys=True)


def _why_stale(old: dict[str, Any], stamp: Stamp) -> str:
    """Why a stored file with stamp inputs ``old`` does not apply to ``stamp``."""
    rest = {k: v for k, v in stamp.inputs.items() if k != "transformers_generate"}
    if "transformers_generate" not in old and old == rest:
        return ("the file was written before pocl passed every decoding setting to transformers explicitly (its "
                "answers may have used top-k 50 or the teacher's own generation_config)")
    return "it was made for other inputs: " + stamp.why_stale(old)


def _generate_sharded(teacher, tokenizer, prompts: list[list[int]], decoding: DecodingConfig, batch_size: int,
                      accelerator) -> list[Generation]:
    """Generate every prompt; with several processes each takes the batches b with b mod N == rank of
    the one-process plan (same composition and seed per batch, hence the same answers), then all gather."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    plan = [(b, batch) for b, batch in enumerate(length_sorted_batches([len(p) for p in prompts], batch_size))
            if b % world == rank]
    gens = generate(teacher, tokenizer, prompts, decoding, batch_size=batch_size, seed=SEQKD_SEED, batch_plan=plan)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([gens])
        merged: list[Generation | None] = [None] * len(prompts)
        for part in parts:
            for i, g in enumerate(part):
                if g is not None:
                    merged[i] = g
        gens = merged
    return gens  # type: ignore[return-value]


def teacher_responses(path: str | os.PathLike, *, teacher, tokenizer, samples: Sequence[TokenizedSample],
                      decoding: DecodingConfig, batch_size: int, teacher_fingerprint: str | None,
                      accelerator=None) -> tuple[list[Generation], dict[str, Any]]:
    """The teacher's answer to the prompt of every sample (in order), from the cache at ``path`` when
    its stamp matches, else generated (and written, by the main process). Returns the generations and
    ``info`` (action ``reused`` or ``generated``, reason, seconds, path)."""
    path = Path(path)
    samples = list(samples)
    stamp = Stamp(_stamp_inputs(teacher_fingerprint=teacher_fingerprint, tokenizer=tokenizer, samples=samples,
                                decoding=decoding, batch_size=batch_size), labels=_STAMP_LABELS)
    reason = f"no file at {path}"
    try:
        lines, meta = _read(path)
        if stamp.matches(meta.get("stamp_hash")) and [d["id"] for d in lines] == [s.id for s in samples]:
            gens = [Generation(list(map(int, d["token_ids"])), d["text"], bool(d["stopped_at_eos"])) for d in lines]
            log.info("seqkd: reusing the teacher's answers in %s", path)
            return gens, {"action": "reused", "reason": "the stamp matches", "path": str(path),
                          "seconds": float(meta.get("seconds", 0.0))}
        reason = _why_stale(meta.get("stamp_inputs") or {}, stamp)
    except FileNotFoundError:
        pass
    except (CheckpointError, ValueError, KeyError) as exc:
        reason = f"the file is unusable: {exc}"
    if teacher is None:
        raise ConfigError("loss.method seqkd: a teacher is needed to generate the training responses")
    log.info("seqkd: generating the teacher's answers to %d training prompts: %s", len(samples), reason)
    t0 = time.perf_counter()
    prompts = [list(s.input_ids[:s.prompt_length]) for s in samples]
    gens = _generate_sharded(teacher, tokenizer, prompts, decoding, batch_size, accelerator)
    seconds = time.perf_counter() - t0
    if accelerator is None or accelerator.is_main_process:
        _write(path, samples, gens, {"stamp_hash": stamp.hash, "stamp_inputs": dict(stamp.inputs), "seconds": seconds})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    log.info("seqkd: %d answers in %.1f s, written to %s", len(gens), seconds, path)
    return gens, {"action": "generated", "reason": reason, "path": str(path), "seconds": seconds}


# ------------------------------------------------------------------------------------------ the hook
def apply_method(config, inputs, *, accelerator=None, device: torch.device | None = None):
    """The run inputs of ``config.loss.method``: unchanged for kd and sft; for seqkd the training data
    becomes the teacher's answers (token ids; generated once and cached, see :func:`teacher_responses`)
    and the training records carry them as their output (what the POCL measurer scores against).

    Returns ``(inputs, info)``; ``info`` is empty unless seqkd ran (then: action, reason, seconds, path).
    """
    if config.loss.method != "seqkd" or getattr(inputs.train_data, "origin", None) == SEQKD_ORIGIN:
        return inputs, {}  # nothing to do, or already done
    teacher = inputs.teacher
    if teacher is not None and device is not None:
        teacher.to(device)
    path = Path(config.train.output_dir) / SEQKD_FILE
    gens, info = teacher_responses(
        path, teacher=teacher, tokenizer=inputs.tokenizer, samples=inputs.train_data.samples,
        decoding=seqkd_decoding(config.loss), batch_size=config.loss.seqkd_batch_size,
        teacher_fingerprint=inputs.fingerprints.get("teacher"), accelerator=accelerator)
    eos = inputs.tokenizer.eos_token_id
    samples = [generated_sample(s, g, eos_token_id=eos, max_length=config.data.max_length)
               for s, g in zip(inputs.train_data.samples, gens)]
    stats = TokenizationStats()
    for s in samples:
        stats.samples += 1
        stats.prompts_truncated += s.prompt_truncated
        stats.responses_truncated += s.response_truncated
        stats.prompt_tokens += s.prompt_length
        stats.response_tokens += len(s.input_ids) - s.prompt_length
        stats.total_tokens += len(s.input_ids)
        stats.max_sample_length = max(stats.max_sample_length, len(s.input_ids))
    records = inputs.train_records
    empty = sum(1 for g in gens if not g.text.strip())
    if records is not None:
        # An empty answer keeps the reference as the record's output (a record needs one to be ranked);
        # the training sample is still the teacher's (just EOS).
        records = [dataclasses.replace(r, output=g.text) if g.text.strip() else r for r, g in zip(records, gens)]
    if empty:
        log.warning("seqkd: the teacher gave %d empty answers (trained on as EOS only)", empty)
    info = dict(info, samples=len(samples), empty_answers=empty,
                stopped_at_eos=sum(1 for g in gens if g.stopped_at_eos))
    data = TokenizedDataset(samples, stats)
    data.origin = SEQKD_ORIGIN  # checked by the trainer: seqkd never trains on the references by mistake
    return dataclasses.replace(inputs, train_data=data, train_records=records), info
