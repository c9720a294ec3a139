"""A flag is never silently ignored: --alpha, --temperature, --epochs and --max-steps with --curriculum pocl,
through the real command line (and the Python API) on the tiny models."""

from __future__ import annotations

import json

import pytest

from pocl.cli import main
from pocl.config import CurriculumConfig, DistillConfig, LossConfig
from pocl.errors import ConfigError
from pocl.pipeline import distill
from tests.conftest import tiny_config


def _argv(tiny_pair, tiny_data, out, *extra, dev=False):
    teacher, student = tiny_pair
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--train-file", str(tiny_data[0]),
            "--max-length", "48", "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4",
            "--lr", "1e-2", "--no-progress", "--no-tensorboard", "--output-dir", str(out)]
    if dev:
        argv += ["--dev-file", str(tiny_data[1]), "--dev-rouge-max-new-tokens", "4"]
    return argv + list(extra)


POCL = ["--curriculum", "pocl", "--num-stages", "2", "--stage-epochs", "1", "--rank-max-new-tokens", "4",
        "--rank-batch-size", "16"]


def test_alpha_temperature_and_max_steps_override_every_stage(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "run"
    code = main(_argv(tiny_pair, tiny_data, out, *POCL, "--alpha", "1", "--temperature", "1.5", "--max-steps", "5"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "--alpha 1 (loss.alpha) overrides every stage of the curriculum" in captured.err
    assert "--temperature 1.5 (loss.temperature) overrides every stage" in captured.err
    assert "--max-steps 5 caps the whole curriculum (9 planned optimizer steps): stage2: 2 of 6 planned steps" \
        in captured.err
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert [s["alpha"] for s in stages] == [1.0, 1.0] and [s["temperature"] for s in stages] == [1.5, 1.5]
    assert [s["steps"] for s in stages] == [3, 2] and summary["global_steps"] == 5
    assert summary["curriculum_overrides"] == {"alpha": 1.0, "temperature": 1.5, "max_steps": 5,
                                               "max_steps_changes": ["stage2: 2 of 6 planned steps"]}
    md = (out / "summary.md").read_text()
    assert "--alpha 1 overrode every stage" in md and "--max-steps 5 capped the curriculum" in md
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["alpha"], r["temperature"]) for r in train if r["split"] == "train"} == {(1.0, 1.5)}


def test_without_the_flags_the_stages_keep_their_schedule(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_pair, tiny_data, out, *POCL)) == 0
    assert "overrides every stage" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [s["alpha"] for s in summary["stages"]] == [0.7, 1.0]
    assert [s["temperature"] for s in summary["stages"]] == [1.0, 2.0]
    assert [s["steps"] for s in summary["stages"]] == [3, 6] and "curriculum_overrides" not in summary


def test_epochs_with_the_curriculum_is_refused_before_any_work(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_pair, tiny_data, out, *POCL, "--epochs", "3")) == 2
    err = capsys.readouterr().err
    assert "train.epochs: --epochs (3) is not used by --curriculum pocl" in err
    assert "--stage-epochs" in err and "curriculum.stages[i].epochs" in err and "Traceback" not in err
    assert not out.exists()  # no ranking, no checkpoint: nothing ran


def test_epochs_in_a_yaml_file_is_refused_too(tmp_path, tiny_pair, tiny_data, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  epochs: 20\ncurriculum:\n  curriculum: pocl\n")
    assert main(_argv(tiny_pair, tiny_data, tmp_path / "run", "--config", str(cfg))) == 2
    assert "train.epochs: --epochs (20) is not used by --curriculum pocl" in capsys.readouterr().err


def test_alpha_together_with_a_per_stage_alpha_is_refused(tmp_path, tiny_pair, tiny_data, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("curriculum:\n  curriculum: pocl\n  num_stages: 2\n  stages:\n    - {}\n    - {alpha: 0.9}\n")
    assert main(_argv(tiny_pair, tiny_data, tmp_path / "run", "--config", str(cfg), "--alpha", "1")) == 2
    err = capsys.readouterr().err
    assert "loss.alpha: --alpha (1)" in err and "curriculum.stages[1].alpha" in err
    assert main(_argv(tiny_pair, tiny_data, tmp_path / "run", *POCL, "--temperature", "2", "--t-max", "3")) == 2
    err = capsys.readouterr().err
    assert "loss.temperature: --temperature (2)" in err and "curriculum.t_max" in err


def test_curriculum_settings_without_the_curriculum_are_reported(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_pair, tiny_data, out, "--stage-epochs", "3", "--t-max", "4", "--max-steps", "1")) == 0
    assert "not used without --curriculum pocl (plain KD over all the data): curriculum.stage_epochs, " \
           "curriculum.t_max" in capsys.readouterr().err


def test_python_api_knows_what_was_given(tmp_path, tiny_pair, tiny_data):
    # from_dict records the given keys, whatever their values: train.epochs given equal to the default
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"epochs": 20},
                      curriculum={"curriculum": "pocl", "num_stages": 2})
    with pytest.raises(ConfigError, match="--stage-epochs"):
        distill(cfg)
    assert not (tmp_path / "run").exists()
    # a section built directly: the values that differ from the defaults count as given
    direct = DistillConfig(loss=LossConfig(temperature=2.0), curriculum=CurriculumConfig(curriculum="pocl", t_max=3.0))
    with pytest.raises(ConfigError, match=r"loss.temperature: --temperature \(2\).*curriculum.t_max"):
        distill(direct)
