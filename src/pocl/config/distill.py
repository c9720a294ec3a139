"""The configuration of a distillation run: :class:`DistillConfig`, one section per concern.

YAML files use the section names as top-level keys::

    model: {teacher: path/to/teacher, student: path/to/student}
    data: {train_file: train.jsonl, dev_file: dev.jsonl}
    loss: {divergence: jsd, alpha: 0.9}
    optim: {lr: 1.0e-4}
    train: {batch_size: 64, epochs: 20, output_dir: runs/jsd}
    curriculum: {curriculum: pocl, num_stages: 4, stage_epochs: 8}

The sections are defined in :mod:`pocl.config.sections` (model, data, loss, optim, train) and
:mod:`pocl.config.curriculum` (curriculum), and importable from here as before. This module composes
them: which fields were given, the rules of global settings under the curriculum, and the training
hash. Every field is also a flag of ``pocl distill`` (``--train-file``, ``--divergence`` ...).
Run ``pocl distill --help`` for the whole list with these descriptions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pocl.config.curriculum import MEASURER_NAMES, CurriculumConfig, MeasurerName
from pocl.config.schema import (
    ConfigSection,
    coerce,
    load_yaml,
    stable_hash,
    weight_free_fields,
)
from pocl.config.sections import (
    SELECTABLE_METRICS,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SelectionMetric,
    TrainConfig,
)
from pocl.errors import ConfigError, suggest

SECTIONS: dict[str, type[ConfigSection]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "curriculum": CurriculumConfig,
}

#: Top-level sections of other subcommands. One YAML file may hold the sections of every subcommand:
#: ``pocl distill`` and ``pocl rank`` accept these and ignore them (``pocl eval --config`` reads ``eval:``).
OTHER_SECTIONS: dict[str, str] = {"eval": "pocl eval"}

#: Settings of plain KD that the POCL curriculum sets per stage: (what a given value does under the
#: curriculum, the per-stage settings that conflict with it).
CURRICULUM_GLOBAL_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss.alpha": ("the same alpha in every stage", ("curriculum.alpha_start", "curriculum.alpha_end")),
    "loss.temperature": ("the same temperature in every stage", ("curriculum.t_start", "curriculum.t_max")),
    "train.max_steps": ("a cap on the optimizer steps of the whole run", ()),
}


def weight_free_keys() -> tuple[str, ...]:
    """The names of the settings of a distillation run that do not change the trained weights (declared
    ``option(..., affects_weights=False)``), over all sections: left out of
    :meth:`DistillConfig.training_hash`, and free to change when a run resumes."""
    return tuple(key for section in SECTIONS.values() for key in weight_free_fields(section))


@dataclasses.dataclass
class DistillConfig:
    """The whole run: one instance of each section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        """Sections from a mapping (a YAML file's top level). The sections of other subcommands
        (:data:`OTHER_SECTIONS`: ``eval``) are accepted and ignored; any other unknown section is an error."""
        kwargs = {}
        for key, section_values in values.items():
            if key in OTHER_SECTIONS:
                continue
            if key not in SECTIONS:
                raise ConfigError(f"unknown config section '{key}'{suggest(str(key), [*SECTIONS, *OTHER_SECTIONS])}; "
                                  f"sections: {', '.join(SECTIONS)} (and "
                                  + ", ".join(f"'{k}', read by `{v}`" for k, v in OTHER_SECTIONS.items()) + ")")
            kwargs[key] = coerce(section_values or {}, SECTIONS[key], key)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> "DistillConfig":
        """The file's sections with ``overrides`` (the flags) on top; its ``eval:`` section is ignored."""
        values = load_yaml(path)
        for section, items in (overrides or {}).items():
            merged = dict(values.get(section) or {})
            merged.update(items)
            values[section] = merged
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: dict[str, Any]) -> "DistillConfig":
        """A copy with some fields changed, validated: ``cfg.replace(train={"epochs": 2})``. The fields
        given in this config stay given, and the changed fields become given."""
        values = self.to_dict()
        for section, items in sections.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section '{section}'{suggest(section, SECTIONS)}")
            values[section].update(items)
        new = DistillConfig.from_dict(values)
        for name, given in self.given().items():
            getattr(new, name)._set_given(given | set(sections.get(name, {})))
        return new

    # -- what the user gave ---------------------------------------------------------------------------
    def given(self) -> dict[str, frozenset[str]]:
        """Per section, the fields that were given (in YAML, as flags or to ``from_dict``) rather than
        left at their defaults; see :meth:`pocl.config.schema.ConfigSection.given_fields`."""
        return {name: getattr(self, name).given_fields() for name in SECTIONS}

    def given_values(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` of the given fields (what a YAML file plus flags said)."""
        out: dict[str, dict[str, Any]] = {}
        for name, fields in self.given().items():
            values = getattr(self, name).to_dict()
            if fields:
                out[name] = {k: values[k] for k in sorted(fields)}
        return out

    def is_given(self, dotted: str) -> bool:
        """``cfg.is_given("loss.alpha")``."""
        section, name = dotted.split(".", 1)
        return name in self.given()[section]

    def curriculum_flag_overrides(self) -> dict[str, Any]:
        """Global settings given for a ``curriculum: pocl`` run, which then hold in every stage:
        ``{"alpha": ..., "temperature": ..., "max_steps": ...}`` (only those given). Empty for plain KD.

        Refused (ConfigError naming the per-stage settings to use): ``train.epochs`` (each stage runs
        ``curriculum.stage_epochs`` or ``curriculum.stages[i].epochs``), and ``loss.alpha`` or
        ``loss.temperature`` given together with a per-stage value of the same knob."""
        if self.curriculum.curriculum != "pocl":
            return {}
        given = self.given()
        if "epochs" in given["train"]:
            raise ConfigError(
                f"train.epochs: --epochs ({self.train.epochs:g}) is not used by --curriculum pocl, whose stages run "
                f"their own epochs: use --stage-epochs N (curriculum.stage_epochs, every stage; now "
                f"{self.curriculum.stage_epochs:g}) or curriculum.stages[i].epochs (YAML, one stage), or --max-steps "
                "N to cap the whole run; remove --epochs / train.epochs")
        out: dict[str, Any] = {}
        for dotted, (meaning, per_stage) in CURRICULUM_GLOBAL_FLAGS.items():
            section, name = dotted.split(".")
            if name not in given[section] or getattr(getattr(self, section), name) is None:
                continue
            conflicts = [k for k in per_stage if k.split(".")[1] in given["curriculum"]]
            conflicts += [f"curriculum.stages[{i}].{name}" for i, st in enumerate(self.curriculum.stages)
                          if name in st]
            flag = "--" + name.replace("_", "-")
            if conflicts:
                raise ConfigError(f"{dotted}: {flag} ({getattr(getattr(self, section), name):g}) with --curriculum "
                                  f"pocl would mean {meaning}, but {', '.join(conflicts)} "
                                  f"{'is' if len(conflicts) == 1 else 'are'} given too: give only one of them")
            out[name] = getattr(getattr(self, section), name)
        return out

    def unused_curriculum_settings(self) -> list[str]:
        """Curriculum settings given for a plain KD run (``curriculum: none``), which it does not use."""
        if self.curriculum.curriculum == "pocl":
            return []
        return sorted(f"curriculum.{k}" for k in self.given()["curriculum"] if k != "curriculum")

    def training_hash(self) -> str:
        """Hash of the settings that change the trained weights: every field but those declared
        ``option(..., affects_weights=False)`` (output, logging, checkpoint cadence, checks before training;
        :func:`weight_free_keys`), less the settings a run does not use (below)."""
        values = self.to_dict()
        for name, section in SECTIONS.items():
            for key in weight_free_fields(section):
                values[name].pop(key, None)
        if values["loss"]["teacher_cache"] == "off":
            # Without a cache its settings change nothing, and the hash stays that of a config from before
            # these fields existed (such checkpoints resume).
            for key in ("teacher_cache", "teacher_cache_topk", "teacher_cache_dtype"):
                values["loss"].pop(key, None)
        elif values["loss"]["teacher_cache"] == "hidden":
            values["loss"].pop("teacher_cache_topk", None)  # k is a setting of the topk cache only
        if values["curriculum"]["curriculum"] == "none":
            values.pop("curriculum")  # ranking settings do not matter to plain KD
        else:  # at their defaults these change nothing: the hash of configs from before the fields
            for key, default in (("stage_teachers", []), ("remeasure", False)):
                if values["curriculum"][key] == default:
                    values["curriculum"].pop(key)
        for method in ("taid", "skd"):  # a method's own settings change nothing else (older hashes stay)
            if values["loss"]["method"] != method:
                for key in [k for k in values["loss"] if k.startswith(method + "_")]:
                    values["loss"].pop(key)
        if values["train"].get("parallelism") == "ddp":
            # The default (replicated) keeps the hash of configs from before the field (their checkpoints resume);
            # fsdp2 changes it: its checkpoints are of another format and its sums of another order.
            values["train"].pop("parallelism")
        return stable_hash(values)


__all__ = [
    "CURRICULUM_GLOBAL_FLAGS", "MEASURER_NAMES", "OTHER_SECTIONS", "SECTIONS", "SELECTABLE_METRICS", "CurriculumConfig",
    "DataConfig", "DistillConfig", "LossConfig", "MeasurerName", "ModelConfig", "OptimConfig", "SelectionMetric",
    "TrainConfig", "weight_free_keys",
]
