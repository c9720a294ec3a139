"""The built-in default is bit-reproducible on one machine: two runs from scratch in two folders (same torch
build, same thread count) train the same models and print the same figures; results.json records what decides
the float rounding (torch build, CPU kernels, threads)."""

from __future__ import annotations

import hashlib

import torch

from pocl.recipes.builtin_default import BuiltinSettings, numerics, run_builtin_default

MODELS = ("teacher/final", "student-base/final", "kd/final", "pocl/final", "kd/best", "pocl/best")


def _tiny() -> BuiltinSettings:
    return BuiltinSettings(
        n_train=96, n_dev=24, n_test=24, n_student_pretrain=48, teacher_epochs=2, student_pretrain_epochs=1,
        kd_epochs=1, batch_size=16, micro_batch_size=8,
        teacher_arch={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_key_value_heads": 2},
        student_arch={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_key_value_heads": 2})


def _run(out):
    report = run_builtin_default(None, user_overrides={"train": {"output_dir": str(out), "progress": False}},
                                 settings=_tiny())
    weights = {m: hashlib.sha256((out / m / "model.safetensors").read_bytes()).hexdigest() for m in MODELS
               if (out / m / "model.safetensors").exists()}
    scores = {name: {k: v for k, v in sc.items() if k not in ("generation_seconds", "path")}
              for name, sc in report["scores"].items()}
    return report, weights, scores, (out / "pocl" / "ranking.jsonl").read_bytes()


def test_two_runs_from_scratch_are_bit_identical(tmp_path, capsys):
    first, weights_a, scores_a, ranking_a = _run(tmp_path / "a")
    second, weights_b, scores_b, ranking_b = _run(tmp_path / "b")
    assert {"teacher/final", "student-base/final", "kd/final", "pocl/final"} <= set(weights_a)
    assert weights_a == weights_b
    assert ranking_a == ranking_b
    assert scores_a == scores_b
    assert first["numerics"] == second["numerics"] == numerics()


def test_numerics_names_what_decides_the_rounding():
    info = numerics()
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert {"machine", "mkl"} <= set(info)
