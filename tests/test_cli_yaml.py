"""YAML works everywhere: one file with the sections of every subcommand (distill, rank, eval), the
built-in default reads --config like a run of your own, unknown sections are refused with a suggestion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocl.cli import build_config, main, make_parser

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_example_file_is_read_by_every_subcommand():
    from pocl.commands.eval import build_eval_config

    path = EXAMPLES / "pocl_all.yaml"
    distill = build_config(make_parser().parse_args(["distill", "--config", str(path), "--teacher", "t",
                                                     "--student", "s"]))
    assert distill.loss.divergence == "srkl" and distill.curriculum.curriculum == "pocl"
    assert distill.train.selection_metric == "dev_rouge_l" and distill.model.teacher == "t"
    distill.curriculum_flag_overrides()  # the file is a valid POCL run: no refused setting in it
    rank = build_config(make_parser().parse_args(["rank", "--config", str(path), "--student", "s"]))
    assert rank.curriculum.measurer == "rrf" and rank.train.output_dir == "runs/srkl-pocl"
    evaluation = build_eval_config(make_parser().parse_args(["eval", "--config", str(path)]))
    assert evaluation.models == ["runs/srkl-pocl/best", "runs/srkl-pocl/final"]
    assert evaluation.seeds == [10, 20, 30, 40, 50] and len(evaluation.data) == 3


@pytest.fixture()
def all_sections(tmp_path, tiny_pair, tiny_data):
    """A YAML file with the sections of distill and rank, and an eval: section, on the tiny pair."""
    teacher, student = tiny_pair
    out = tmp_path / "run"
    path = tmp_path / "all.yaml"
    path.write_text(f"""
model: {{teacher: {teacher}, student: {student}}}
data: {{train_file: {tiny_data[0]}, dev_file: {tiny_data[1]}, max_length: 48, max_prompt_length: 32}}
loss: {{divergence: rkl}}
optim: {{lr: 1.0e-2}}
train: {{output_dir: {out}, batch_size: 8, micro_batch_size: 4, progress: false, tensorboard: false,
         dev_rouge_max_new_tokens: 4}}
curriculum: {{curriculum: pocl, num_stages: 2, stage_epochs: 1, rank_max_new_tokens: 4, rank_batch_size: 16}}
eval:
  models: [{out}/final]
  data: [{tiny_data[2]}]
  seeds: [10]
  max_new_tokens: 4
  max_samples: 4
  output_dir: {tmp_path / "eval"}
  progress: false
""")
    return path, out


def test_one_yaml_file_runs_rank_distill_and_eval(all_sections, tmp_path, capsys):
    path, out = all_sections
    assert main(["rank", "--config", str(path)]) == 0
    assert "ranked by rrf (computed" in capsys.readouterr().out and (out / "ranking.jsonl").exists()
    assert main(["distill", "--config", str(path)]) == 0
    assert "final model:" in capsys.readouterr().out
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["loss"]["divergence"] == "rkl" and "eval" not in saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranking"]["action"] == "reused" and len(summary["stages"]) == 2
    assert main(["eval", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results["models"]) == 1


@pytest.mark.parametrize("command", ["distill", "rank"])
def test_unknown_sections_are_still_refused_with_a_suggestion(tmp_path, command, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("evl:\n  seeds: [1]\n")
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'evl' (did you mean 'eval'?)" in err and "Traceback" not in err


def test_the_builtin_default_reads_the_yaml_file_and_the_flags(tmp_path, capsys, monkeypatch):
    import pocl.recipes.builtin_default as recipe

    tiny = recipe.BuiltinSettings(
        n_train=64, n_dev=16, n_test=16, n_student_pretrain=32, teacher_epochs=1, student_pretrain_epochs=1,
        kd_epochs=3, batch_size=16, micro_batch_size=8, eval_max_new_tokens=4,
        teacher_arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2),
        student_arch=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2))
    monkeypatch.setattr(recipe, "BuiltinSettings", lambda: tiny)
    monkeypatch.setattr(recipe, "EVAL_SEEDS", (10,))
    out = tmp_path / "default"
    path = tmp_path / "run.yaml"
    path.write_text(f"loss: {{divergence: jsd}}\ntrain: {{output_dir: {out}, progress: false, epochs: 1.5}}\n"
                    "curriculum: {num_stages: 2}\neval: {seeds: [1]}\n")
    assert main(["distill", "--config", str(path), "--alpha", "0.8"]) == 0
    captured = capsys.readouterr()
    assert "--alpha 0.8 (loss.alpha) overrides every stage of the curriculum" in captured.err
    assert "student, jsd KD + POCL" in captured.out
    report = json.loads((out / "results.json").read_text())
    kd, pocl = report["kd_config"], report["pocl_config"]
    assert kd["loss"]["divergence"] == pocl["loss"]["divergence"] == "jsd"  # from the file, in both runs
    assert kd["loss"]["alpha"] == pocl["loss"]["alpha"] == 0.8  # from the flag, in both runs
    assert kd["train"]["epochs"] == 1.5 and pocl["curriculum"]["num_stages"] == 2
    assert pocl["curriculum"]["stage_epochs"] == pytest.approx(1.5 * 2 / 3)  # the same sample budget
    stages = report["pocl_summary"]["stages"]
    assert [s["alpha"] for s in stages] == [0.8, 0.8] and [s["temperature"] for s in stages] == [1.0, 2.0]
    assert report["kd_summary"]["global_steps"] == 6  # 64 samples, batch 16, 1.5 epochs
    # best/ of both runs by dev ROUGE-L on all 16 dev samples
    for summary in (report["pocl_summary"], report["kd_summary"]):
        assert summary["selection_metric"] == "dev_rouge_l" and summary["dev_rouge_samples"] == 16


def test_the_pocl_examples_give_no_setting_the_curriculum_refuses_or_overrides():
    from pocl.config import DistillConfig

    pocl_examples = [p for p in sorted(EXAMPLES.glob("*.yaml"))
                     if DistillConfig.from_yaml(p).curriculum.curriculum == "pocl"]
    assert {p.name for p in pocl_examples} >= {"pocl_all.yaml", "gkd_pocl.yaml"}
    for path in pocl_examples:
        assert DistillConfig.from_yaml(path).curriculum_flag_overrides() == {}, path.name
