"""The teachers of a run: ``model.teacher`` and the teachers that stages name (progressive distillation).

Teacher-assistant KD (Mirzadeh et al. 2020) and progressive distillation (PROD, ERNIE-Tiny) distil
through teachers of growing capacity. In pocl a stage may name its own teacher
(``curriculum.stages[i].teacher`` or ``--stage-teachers``), e.g. a layer-subset assistant made by
``pocl init-student`` for the early stages and the full teacher for the last. :class:`RunTeachers`
holds every teacher of a run with its live signal and its teacher-forced signals (the live teacher, or
its own cache), and says which one a stage uses. The trainer switches to the stage's teacher as the
stage starts, also on a resume inside it: a stage's teacher is part of the stage's settings (and
of the run's stage fingerprint), and every teacher's fingerprint is in the run's fingerprints, so a
resume with another teacher for a stage is refused.

Every teacher was checked against the student's tokenizer and vocabulary when it was loaded
(:func:`pocl.pipeline.load_stage_teachers`); each gets its own teacher cache, in a folder named by
its fingerprint, built only for the temperatures of the stages that use it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pocl.errors import ConfigError
from pocl.training import teacher_signal as tsignal
from pocl.training.stages import Stage

log = logging.getLogger("pocl.train")

__all__ = ["RunTeachers", "cache_folder"]


def cache_folder(root: Path, key: str | None, fingerprint: str | None) -> Path:
    """Where a teacher's cache lives: ``root`` for ``model.teacher`` (``key`` None, as before stage teachers
    existed), else ``root/teacher-HASH`` with a hash of the stage teacher's fingerprint (or path)."""
    if key is None:
        return root
    return root / f"teacher-{hashlib.sha256(str(fingerprint or key).encode()).hexdigest()[:12]}"


class RunTeachers:
    """The teachers of a run, keyed by the stage's ``teacher`` field (None: ``model.teacher``).

    ``main``: the run's teacher (None for CE-only methods); ``stage_teachers``: the loaded teacher of
    every path a stage names. Each gets a live signal on ``device`` (:func:`pocl.training.teacher_signal.live_teacher`)."""

    def __init__(self, main: nn.Module | None, stage_teachers: dict[str, nn.Module], stages: Sequence[Stage], *,
                 device, vocab_size: int, fused: bool):
        """ConfigError when a stage names a teacher that is not in ``stage_teachers``."""
        named = {s.teacher for s in stages if s.teacher is not None}
        missing = sorted(named - set(stage_teachers))
        if missing:
            raise ConfigError(f"stage teacher '{missing[0]}' was not loaded (pocl.pipeline.load_stage_teachers)")
        self.models: dict[str | None, nn.Module | None] = {None: main, **{k: stage_teachers[k] for k in sorted(named)}}
        self.live = {key: tsignal.live_teacher(m, device=device, vocab_size=vocab_size, fused=fused)
                     for key, m in self.models.items()}
        #: the teacher-forced signals (train, dev) of every teacher: live until prepare_caches opens caches
        self.signals: dict[str | None, tuple[Any, Any]] = {key: (live, live) for key, live in self.live.items()}
        self.stages = list(stages)

    @property
    def progressive(self) -> bool:
        """Whether some stage names its own teacher."""
        return len(self.models) > 1

    def stages_of(self, key: str | None) -> list[Stage]:
        """The stages that use teacher ``key``."""
        return [s for s in self.stages if s.teacher == key]

    def used(self) -> list[str | None]:
        """The teachers the stages use, in the order of their first stage."""
        out: list[str | None] = []
        for s in self.stages:
            if s.teacher not in out:
                out.append(s.teacher)
        return out

    def prepare_caches(self, *, loss_config, datasets: dict[str, Any], root: Path, fingerprints: dict[str, Any],
                       on_policy_fraction: Callable[[Stage], float],
                       measure: Callable[..., list[tsignal.SignalError]], **build) -> dict[str, Any]:
        """Reuse, finish or build the teacher caches (``loss_config.teacher_cache``) of every used teacher, for
        the temperatures of its stages, under :func:`cache_folder`, and switch its teacher-forced signals to
        them; an approximate cache is checked with ``measure(signal, live, stages)``
        (:func:`pocl.training.teacher_signal.check_run_signal`). ``build``: the cache build's options
        (chunk_size, batch_size, pad_token_id, accelerator, device, progress). Returns the caches' infos:
        ``model.teacher``'s at the top level (as in runs with one teacher), the stage teachers' under
        ``stage_teachers`` by path (empty: no cache)."""
        out: dict[str, Any] = {}
        for key in self.used():
            live, stages = self.live[key], self.stages_of(key)
            temperatures = tsignal.cache_temperatures(stages, live=live, teacher_cache=loss_config.teacher_cache,
                                                      on_policy_fraction=on_policy_fraction)
            if not temperatures:
                continue
            fp = fingerprints.get("teacher") if key is None else (fingerprints.get("stage_teachers") or {}).get(key)
            opened = tsignal.open_teacher_caches(live, datasets, root=cache_folder(root, key, fp),
                                                 loss_config=loss_config, temperatures=temperatures, fingerprint=fp,
                                                 **build)
            if opened is None:
                continue
            signals, infos = opened
            tsignal.check_run_signal(signals["train"], infos, loss_config=loss_config,
                                     measure=lambda sig, live=live, stages=stages: measure(sig, live, stages))
            self.signals[key] = (signals["train"], signals.get("dev", live))
            if key is None:
                out.update(infos)
            else:
                out.setdefault("stage_teachers", {})[key] = infos
        return out

    def describe(self, stage: Stage) -> str:
        """The teacher of ``stage`` in words (for the log)."""
        return "model.teacher" if stage.teacher is None else stage.teacher
