"""Configuration: typed, validated sections shared by the CLI, YAML files and the Python API.

- :mod:`pocl.config.schema`: the mechanism (:class:`ConfigSection`, :func:`option` with its help text,
  CLI settings and ``affects_weights``, :func:`coerce`, YAML loading, :func:`stable_hash`);
- :mod:`pocl.config.distill`: the run of ``pocl distill`` (:class:`DistillConfig`), composed of the sections of
  :mod:`pocl.config.sections` and :mod:`pocl.config.curriculum`;
- :mod:`pocl.config.eval`: ``pocl eval`` (:class:`EvalConfig`).

Importing this package does not import torch.
"""

from pocl.config.distill import (
    CURRICULUM_GLOBAL_FLAGS,
    MEASURER_NAMES,
    OTHER_SECTIONS,
    SECTIONS,
    SELECTABLE_METRICS,
    CurriculumConfig,
    DataConfig,
    DistillConfig,
    LossConfig,
    MeasurerName,
    ModelConfig,
    OptimConfig,
    SelectionMetric,
    TrainConfig,
    weight_free_keys,
)
from pocl.config.eval import EvalConfig
from pocl.config.schema import (
    ConfigSection,
    coerce,
    load_yaml,
    option,
    stable_hash,
    weight_free_fields,
)

__all__ = [
    "CURRICULUM_GLOBAL_FLAGS", "MEASURER_NAMES", "OTHER_SECTIONS", "SECTIONS", "SELECTABLE_METRICS",
    "ConfigSection", "CurriculumConfig", "DataConfig", "DistillConfig", "EvalConfig", "LossConfig", "MeasurerName",
    "ModelConfig", "OptimConfig", "SelectionMetric", "TrainConfig", "coerce", "load_yaml", "option", "stable_hash",
    "weight_free_fields", "weight_free_keys",
]
