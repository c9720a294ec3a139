"""The built-in default end to end at a tiny size (the real sizes run in `pocl distill`)."""

from __future__ import annotations

import json

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
    assert "teacher" in printed and "student (jsd KD)" in printed and "wall time" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["scores"]) == {"teacher", "student (initial)", "student (jsd KD)"}
    assert saved["kd_config"]["loss"]["divergence"] == "jsd"
    for sc in saved["scores"].values():
        assert 0 <= sc["exact_match"] <= 100 and 0 <= sc["rouge_l"] <= 100
    assert (out / "kd" / "final" / "model.safetensors").exists()
    assert report["kd_summary"]["global_steps"] == 6
    # a second run reuses the trained teacher and student base instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "teacher" / "final" / "manifest.json",
                                                out / "student-base" / "final" / "manifest.json")}
    again = run_builtin_default(None, user_overrides={"train": {"output_dir": str(out), "progress": False},
                                                      "loss": {"divergence": "jsd"}}, settings=settings)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["scores"]["teacher"] == report["scores"]["teacher"] | {"generation_seconds":
                                                                          again["scores"]["teacher"]["generation_seconds"]}
