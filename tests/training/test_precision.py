"""model.mixed_precision auto on CPU: bf16 autocast only where it measured faster (a CPU with native
bfloat16 and a student at least CPU_BF16_MIN_HIDDEN wide), and its effect on the pinned loss curve."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pocl import distill, launch
from tests.conftest import tiny_config
from tests.training.test_trainer import PINNED_LOSSES, _train_losses

CPU = SimpleNamespace(device=torch.device("cpu"))


def _student(width):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=width))


@pytest.mark.parametrize("native,width,setting,expected", [
    (True, 256, "auto", True), (True, 576, "auto", True),
    (True, 96, "auto", False),      # the built-in default's student: bf16 measured x0.93 there
    (False, 576, "auto", False),    # no native bfloat16: autocast only adds casts
    (True, 576, "no", False),       # an explicit setting is accelerate's business
    (True, 576, "bf16", False),
])
def test_the_auto_rule(monkeypatch, native, width, setting, expected):
    monkeypatch.setattr(launch, "cpu_has_native_bf16", lambda: native)
    use, why = launch.cpu_auto_bf16(setting, CPU, _student(width))
    assert use is expected
    if setting == "auto":
        assert ("bfloat16 autocast" in why) is expected and why


def test_a_gpu_run_is_left_to_accelerate(monkeypatch):
    monkeypatch.setattr(launch, "cpu_has_native_bf16", lambda: True)
    assert launch.cpu_auto_bf16("auto", SimpleNamespace(device=torch.device("cuda", 0)), _student(4096)) == (False, "")


def test_auto_bf16_moves_the_pinned_curve_by_little(monkeypatch, tmp_path, tiny_pair, tiny_data):
    """The pinned run (tests/training/test_trainer.py) with the rule forced on for the tiny models: the
    model passes really run in bf16 (the losses differ from float32's) and the curve stays within 0.1 %."""
    monkeypatch.setattr(launch, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(launch, "CPU_BF16_MIN_HIDDEN", 8)
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"epochs": 1}, loss={"teacher_cache": "off"})
    assert cfg.model.mixed_precision == "auto"
    assert distill(cfg).status == "completed"
    losses = _train_losses(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"]["model_passes"] == "bf16-autocast"
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-3)
    assert max(abs(a - b) / b for a, b in zip(losses, PINNED_LOSSES)) > 1e-7  # not the float32 curve
