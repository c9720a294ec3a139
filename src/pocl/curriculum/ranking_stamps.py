"""The stamps of a ranking and why two differ.

``signals_hash`` stamps what the signals depend on: the student (its fingerprint), the data (ids,
rendered prompts, references; tokenizer; tokenisation settings) and the generation settings.
``order_hash`` stamps how the order is made from the signals (measurer, k, and the seed for
``random``); both are the hash of a :class:`pocl.artifacts.Stamp` of these inputs. The teacher
signals also depend on the teacher: a ranking that holds them carries a third stamp, ``teacher_hash``
(:func:`teacher_inputs`: the teacher's fingerprint), so a student-only ranking's stamps never mention
a teacher and its signals stay reusable whatever teacher a later measurer uses.
:func:`why_signals_differ` and :func:`describe_changes` say in plain words what changed between a
stored stamp and the current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pocl.artifacts import describe_changes
from pocl.data import Record, get_template
from pocl.errors import ConfigError
from pocl.fingerprints import records_hash, sample_hashes, tokenizer_fingerprint
from pocl.generation import effective_settings, special_token_ids

from .difficulty import ranking_decoding

__all__ = ["GENERATION_SEED", "describe_changes", "order_inputs", "ranking_data_settings", "resolve_settings",
           "signals_inputs", "teacher_inputs", "why_signals_differ", "why_teacher_differs"]


#: Seed of the measurer's generations. Fixed (not the training seed), so that runs that differ only
#: in their training seed share one ranking.
GENERATION_SEED = 0


def ranking_data_settings(data_config) -> dict[str, Any]:
    """The tokenisation settings of a :class:`pocl.config.DataConfig` that the signals depend on."""
    return {"template": data_config.template, "use_prompt_field": data_config.use_prompt_field,
            "max_length": data_config.max_length, "max_prompt_length": data_config.max_prompt_length,
            "truncation_side": data_config.truncation_side}


def resolve_settings(data_settings: dict[str, Any], tokenizer) -> tuple[dict[str, Any], Any]:
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
    settings, template = resolve_settings(data_settings, tokenizer)
    if _hashes is None:
        _hashes = sample_hashes(records, template)
    return {
        "student": model_fingerprint,
        "data": {"samples": len(records), "hash": records_hash(_hashes),
                 "first_id": records[0].id if records else None, "last_id": records[-1].id if records else None,
                 "settings": settings, "tokenizer": tokenizer_fingerprint(tokenizer)},
        "generation": _generation_inputs(curriculum, tokenizer),
    }


def teacher_inputs(teacher_fingerprint: str) -> dict[str, Any]:
    """The readable inputs of ``teacher_hash``, the stamp of the teacher signals beyond ``signals_hash``
    (student, data and settings, on which they depend too): the teacher's fingerprint
    (:func:`pocl.fingerprints.model_fingerprint`)."""
    return {"teacher": teacher_fingerprint}


def why_teacher_differs(old: dict, new: dict) -> str:
    if not old:
        return "its teacher signals carry no teacher stamp"
    return f"the teacher changed (fingerprint {old.get('teacher')} -> {new.get('teacher')})"


def order_inputs(curriculum, seed: int) -> dict[str, Any]:
    """The readable inputs of ``order_hash``: measurer, k (not for random), seed (random only)."""
    measurer = curriculum.measurer
    return {"measurer": measurer, "rrf_k": None if measurer == "random" else curriculum.rrf_k,
            "seed": seed if measurer == "random" else None}


def why_signals_differ(old: dict, new: dict, old_hashes: dict[str, str], new_hashes: dict[str, str]) -> str:
    reasons = []
    if old.get("student") != new["student"]:
        reasons.append(f"the student changed (fingerprint {old.get('student')} -> {new['student']})")
    od, nd = old.get("data") or {}, new["data"]
    settings_changed = od.get("settings") != nd["settings"]
    tokenizer_changed = od.get("tokenizer") != nd["tokenizer"]
    if settings_changed:
        reasons.append("data settings changed: " + ", ".join(describe_changes(od.get("settings") or {}, nd["settings"])))
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
    gen = describe_changes(old.get("generation") or {}, new["generation"])
    if gen:
        reasons.append("settings changed: " + ", ".join(gen))
    return "; ".join(reasons) or "the inputs of the signals changed"
