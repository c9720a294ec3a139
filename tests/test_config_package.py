"""The config package: weight-free settings declared once (training hash, resume checks), one list of
measurers and selectable metrics, a torch-free import."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from pocl.config import (
    MEASURER_NAMES,
    SECTIONS,
    SELECTABLE_METRICS,
    CurriculumConfig,
    DistillConfig,
    TrainConfig,
    weight_free_keys,
)
from pocl.config.schema import literal_choices, weight_free_fields

# training_hash() of these configs, computed with the code before the config package (pocl/config.py with
# its hand-kept pop lists). Checkpoints store this hash: if it changes, existing runs no longer resume.
PINNED_HASHES = {
    "defaults": ({}, "b088d0de7b621c409c37d904ff36c8311f3337e766e19708148d22fc61da9357"),
    "teacher_cache_topk": ({"loss": {"teacher_cache": "topk", "teacher_cache_topk": 32}},
                           "d46194b084efa18a2dba5bb58819122ec01aa165ba8acefd53311ded8f3ea6dd"),
    "teacher_cache_off": ({"loss": {"teacher_cache": "off"}},
                          "9f69782704e5c10b55b091e7219e46c79e5b79983e678c83accc0a522ed3923e"),
    "curriculum_pocl": ({"curriculum": {"curriculum": "pocl", "num_stages": 3, "measurer": "rouge"},
                         "loss": {"divergence": "jsd"}, "train": {"output_dir": "runs/x", "log_every": 5}},
                        "82692bd447e23b7829ab5e8b86eaa10fccceb014438c6a05025bd5a3c18ec6f1"),
}

# RESUME_FREE_KEYS as it was kept by hand in pocl/training/checkpoint.py before the metadata.
RESUME_FREE_BEFORE = {"output_dir", "resume", "overwrite", "allow_config_change", "log_every", "tensorboard",
                      "progress", "save_every", "save_total_limit", "eval_every", "eval_batch_size", "num_processes",
                      "teacher_cache_dir", "teacher_cache_max_error", "teacher_cache_check_samples",
                      "accept_approximation"}


@pytest.mark.parametrize("name", sorted(PINNED_HASHES))
def test_training_hash_is_unchanged(name):
    values, expected = PINNED_HASHES[name]
    assert DistillConfig.from_dict(values).training_hash() == expected


def test_weight_free_settings_do_not_change_the_hash():
    base = DistillConfig().training_hash()
    changed = DistillConfig.from_dict({
        "train": {"output_dir": "elsewhere", "resume": "never", "overwrite": True, "allow_config_change": True,
                  "log_every": 3, "tensorboard": False, "progress": False, "save_every": 7, "save_total_limit": 5,
                  "eval_every": 9, "eval_batch_size": 2, "num_processes": 2},
        "loss": {"teacher_cache_dir": "cache", "teacher_cache_max_error": 0.5, "teacher_cache_check_samples": 3,
                 "accept_approximation": "topk-cache", "kernels": "eager"}})
    assert changed.training_hash() == base
    assert DistillConfig.from_dict({"train": {"seed": 11}}).training_hash() != base
    # fsdp2 is another checkpoint format and another summation order: its checkpoints are another run's
    assert DistillConfig.from_dict({"train": {"parallelism": "fsdp2"}}).training_hash() != base


def test_resume_free_keys_come_from_the_metadata():
    from pocl.training.checkpoint import RESUME_FREE_KEYS

    # loss.kernels (compiled or eager divergence kernels: the same formulas) and train.teacher_sharding (the
    # teacher's layers sharded or whole under FSDP2: the same teacher outputs) were added after the split;
    # then the trackers (train.report_to), the model card's upload (train.push_to_hub, hub_private) and the
    # imported teacher signal's file and tokenizer override (loss.teacher_signal_*: its content is a run
    # fingerprint, so a resume with another file is refused there).
    later = {"kernels", "teacher_sharding", "report_to", "push_to_hub", "hub_private", "teacher_signal_file",
             "teacher_signal_ignore_tokenizer"}
    assert set(RESUME_FREE_KEYS) == RESUME_FREE_BEFORE | later == set(weight_free_keys())
    assert len(RESUME_FREE_KEYS) == len(set(RESUME_FREE_KEYS))
    # Bare field names: none may also name a setting that changes the weights in another section.
    weight_fields = {f for name, section in SECTIONS.items() for f in section.__dataclass_fields__
                     if f not in weight_free_fields(section)}
    assert not weight_fields & set(RESUME_FREE_KEYS)


def test_measurer_names_match_the_registry():
    pytest.importorskip("torch")
    from pocl.curriculum.difficulty import MEASURERS

    hint = typing.get_type_hints(CurriculumConfig)["measurer"]
    assert literal_choices(hint) == MEASURER_NAMES
    assert set(MEASURER_NAMES) == set(MEASURERS.names())
    assert CurriculumConfig().measurer in MEASURER_NAMES


def test_selectable_metrics_are_one_list():
    pytest.importorskip("torch")
    from pocl.training.selection import SELECTABLE

    assert SELECTABLE is SELECTABLE_METRICS
    assert literal_choices(typing.get_type_hints(TrainConfig)["selection_metric"]) == SELECTABLE_METRICS
    assert TrainConfig().selection_metric == SELECTABLE_METRICS[0]


def test_config_package_imports_without_torch():
    code = "import pocl.config, pocl.config.eval, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
