"""Config dataclasses: defaults, validation naming the field, YAML + flag precedence, coercion."""

from __future__ import annotations

import dataclasses

import pytest

from pocl.config import SECTIONS, DistillConfig, LossConfig, TrainConfig
from pocl.errors import ConfigError, UnknownNameError


def test_defaults_are_valid_and_round_trip():
    cfg = DistillConfig()
    again = DistillConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.loss.divergence == "fkl" and cfg.optim.lr == 1e-4 and cfg.train.batch_size == 64


def test_every_field_is_documented():
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            assert len(f.metadata.get("help", "")) > 10, f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("section,key,value,fragment", [
    ("loss", "alpha", 1.5, "loss.alpha: must be in [0, 1]"),
    ("loss", "temperature", -1.0, "loss.temperature: must be > 0"),
    ("loss", "temperature_scaling", "t3", "loss.temperature_scaling: must be one of t2, none"),
    ("train", "batch_size", 10, "train.batch_size: must be a multiple of micro_batch_size"),
    ("data", "max_prompt_length", 600, "data.max_prompt_length"),
    ("optim", "min_lr", 1.0, "optim.min_lr"),
    ("train", "resume", "sometimes", "train.resume"),
])
def test_invalid_values_name_the_field(section, key, value, fragment):
    with pytest.raises(ConfigError) as e:
        DistillConfig.from_dict({section: {key: value}})
    assert fragment in str(e.value)


def test_unknown_divergence_suggests_nearest():
    with pytest.raises(UnknownNameError) as e:
        LossConfig(divergence="jds")
    assert "did you mean 'jsd'" in str(e.value)


def test_divergence_is_chosen_by_exact_name_not_substring():
    assert LossConfig(divergence="kl").divergence == "kl"  # registered alias of fkl
    with pytest.raises(UnknownNameError):
        LossConfig(divergence="srk")  # a substring of srkl is not srkl


def test_unknown_keys_are_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*did you mean 'epochs'"):
        DistillConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*did you mean 'train'"):
        DistillConfig.from_dict({"trian": {}})


def test_yaml_scalars_are_coerced():
    cfg = DistillConfig.from_dict({"optim": {"lr": "1e-4"}, "train": {"epochs": 2, "max_steps": "10"},
                                   "model": {"cpu": "yes"}})
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 10 and cfg.model.cpu is True
    with pytest.raises(ConfigError, match="train.batch_size"):
        DistillConfig.from_dict({"train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        DistillConfig.from_dict({"train": {"batch_size": 2.5}})


def test_yaml_file_and_flag_precedence(tmp_path):
    from pocl.cli import make_parser, build_config

    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  divergence: jsd\n  alpha: 0.9\ntrain:\n  epochs: 3\n  output_dir: out\n")
    args = make_parser().parse_args(["distill", "--config", str(path), "--alpha", "0.5", "--lr", "3e-4"])
    cfg = build_config(args, SECTIONS)
    assert cfg.loss.divergence == "jsd"  # from the file
    assert cfg.loss.alpha == 0.5  # the flag overrides the file
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 3 and cfg.train.output_dir == "out"


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        DistillConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="config file not found"):
        DistillConfig.from_yaml(tmp_path / "missing.yaml")


def test_training_hash_ignores_logging_options():
    a = DistillConfig()
    assert a.training_hash() == a.replace(train={"log_every": 99, "output_dir": "x", "progress": False}).training_hash()
    assert a.training_hash() != a.replace(train={"seed": 11}).training_hash()


def test_teacher_and_student_come_together(capsys, tiny_data):
    from pocl.cli import main

    assert main(["distill", "--teacher", "t", "--train-file", str(tiny_data[0])]) == 2
    assert "model.student: give both --teacher and --student" in capsys.readouterr().err


def test_divergence_params_only_for_the_chosen_divergence():
    assert LossConfig(divergence="jsd", jsd_lambda=0.5).divergence_params() == {"lam": 0.5}
    assert LossConfig(divergence="srkl", skew=0.2).divergence_params() == {"skew": 0.2}
    assert LossConfig(divergence="srkl").divergence_params(skew=0.12) == {"skew": 0.12}
    assert LossConfig(divergence="fkl").divergence_params() == {}
    assert isinstance(TrainConfig().epochs, (int, float))


def test_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        DistillConfig.from_yaml(path)


def test_every_selection_metric_has_a_known_direction():
    import typing

    from pocl.config.schema import literal_choices
    from pocl.training.selection import METRICS, SELECTABLE, is_better

    choices = literal_choices(typing.get_type_hints(TrainConfig)["selection_metric"])
    assert set(choices) == set(SELECTABLE) <= set(METRICS) and TrainConfig().selection_metric == "dev_rouge_l"
    assert is_better("dev_rouge_l", 30.0, 20.0) and not is_better("dev_rouge_l", 20.0, 30.0)
    assert is_better("dev_ce", 1.0, 2.0) and not is_better("dev_ce", 2.0, 1.0)
    assert not is_better("dev_rouge_l", 20.0, 20.0) and is_better("dev_loss", 5.0, None)


def test_the_given_settings_are_known():
    cfg = DistillConfig.from_dict({"loss": {"alpha": 1.0}, "train": {"epochs": 20}, "eval": {"seeds": [1]}})
    assert cfg.given_values() == {"loss": {"alpha": 1.0}, "train": {"epochs": 20.0}}  # eval: ignored
    assert cfg.replace(optim={"lr": 0.1}).given_values()["optim"] == {"lr": 0.1}
    assert cfg.replace(optim={"lr": 0.1}).is_given("loss.alpha")
    assert DistillConfig().given_values() == {}
    assert DistillConfig(loss=LossConfig(alpha=0.5)).given_values() == {"loss": {"alpha": 0.5}}
