"""The built-in default end to end at a tiny size (the real sizes run in `pocl distill`)."""

from __future__ import annotations

import json

import pytest

from pocl.recipes.builtin_default import BuiltinSettings, run_builtin_default


def test_builtin_default_tiny(tmp_path, capsys):
    settings = BuiltinSettings(
        n_train=96, n_dev=24, n_test=24, n_student_pretrain=48, teacher_epochs=2, student_pretrain_epochs=1,
        kd_epochs=1, batch_size=16, micro_batch_size=8,
        teacher_arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2),
        student_arch=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2))
    out = tmp_path / "default"
    report = run_builtin_default(None, user_overrides={"train": {"output_dir": str(out), "progress": False},
                                                       "loss": {"divergence": "jsd"}}, settings=settings)
    printed = capsys.readouterr().out
    assert "student, jsd KD + POCL" in printed and "student, jsd KD " in printed and "wall time" in printed
    assert "POCL: ranking" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["scores"]) == {"teacher", "student (initial)", "student, jsd KD", "student, jsd KD + POCL"}
    assert saved["kd_config"]["loss"]["divergence"] == "jsd" == saved["pocl_config"]["loss"]["divergence"]
    assert saved["kd_config"]["curriculum"]["curriculum"] == "none"
    assert saved["pocl_config"]["curriculum"]["curriculum"] == "pocl"
    for sc in saved["scores"].values():
        assert 0 <= sc["exact_match"] <= 100 and 0 <= sc["rouge_l"] <= 100
    assert (out / "kd" / "final" / "model.safetensors").exists()
    assert (out / "pocl" / "final" / "model.safetensors").exists()
    assert (out / "pocl" / "ranking.jsonl").exists() and (out / "pocl" / "summary.md").exists()
    kd, pocl = report["kd_summary"], report["pocl_summary"]
    assert kd["global_steps"] == 6  # 96 samples, batch 16, 1 epoch
    # the same sample budget: POCL's stages pass over as many samples as the single KD epoch
    seen = sum(st["num_samples"] * st["epochs"] for st in pocl["stages"])
    assert seen == pytest.approx(96 * 1.0)
    assert [st["temperature"] for st in pocl["stages"]] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    assert [st["alpha"] for st in pocl["stages"]] == pytest.approx([0.7, 0.8, 0.9, 1.0])
    # a second run reuses the trained teacher and student base instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "teacher" / "final" / "manifest.json",
                                                out / "student-base" / "final" / "manifest.json")}
    again = run_builtin_default(None, user_overrides={"train": {"output_dir": str(out), "progress": False},
                                                      "loss": {"divergence": "jsd"}}, settings=settings)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["scores"]["teacher"] == report["scores"]["teacher"] | {"generation_seconds":
                                                                          again["scores"]["teacher"]["generation_seconds"]}


def test_run_budgets_same_sample_budget():
    from pocl.recipes.builtin_default import DIFFERENT_BUDGETS, run_budgets

    s = BuiltinSettings()  # kd_epochs 10
    assert run_budgets({}, 4, s) == (10, 4.0, "the same sample budget")
    assert run_budgets({"train": {"epochs": 5}}, 4, s)[:2] == (5.0, 2.0)
    assert run_budgets({"curriculum": {"stage_epochs": 8}}, 4, s)[:2] == (20.0, 8.0)
    assert run_budgets({"train": {"epochs": 20}, "curriculum": {"stage_epochs": 8}}, 4, s)[2] == "the same sample budget"
    assert run_budgets({"train": {"epochs": 20}, "curriculum": {"stage_epochs": 4}}, 4, s)[2] == DIFFERENT_BUDGETS
    # Stages' own fractions count (20 % and 100 %: 1.2 passes per stage epoch); they were ignored before.
    kd, per_stage, _ = run_budgets({"train": {"epochs": 6}}, 2, s, [0.2, None])
    assert (kd, per_stage) == (6.0, pytest.approx(5.0))
