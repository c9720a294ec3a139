"""An empty value of an optional setting is None ("Empty: ..." in its help), on the command line
(`--skew-last-stage ''`) and in YAML (`skew_last_stage:` or `skew_last_stage: ""`); an empty value of a
setting that needs one is a one-line error naming the flag."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from pocl.cli import build_config, flag_name, make_parser, parse_command_line
from pocl.config import SECTIONS, DistillConfig
from pocl.config.schema import allows_none, strip_optional
from pocl.curriculum.schedule import baby_step_stages
from pocl.errors import ConfigError
from tests.reliability.helpers import run_cli, snapshot


def _optional_flags():
    """(section, field, flag) of every `pocl distill` flag of an optional setting that takes a value."""
    out = []
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            if f.metadata.get("cli", True) and allows_none(hints[f.name]) and strip_optional(hints[f.name]) is not bool:
                out.append((name, f.name, flag_name(f)))
    return out


OPTIONAL = _optional_flags()
#: the settings whose help says what "empty" means
EMPTY_HELP = {("model", "teacher"), ("data", "train_file"), ("data", "dev_file"), ("curriculum", "skew_last_stage"),
              ("curriculum", "plateau_patience"), ("curriculum", "on_policy_fraction_start"),
              ("curriculum", "on_policy_fraction_end"), ("loss", "skd_top_k_end")}


def config_of(*argv: str, config: str | None = None) -> DistillConfig:
    """The DistillConfig that `pocl distill ARGV` builds (the real parser; nothing is run)."""
    extra = ["--config", config] if config else []
    return build_config(parse_command_line(make_parser(), ["distill", *extra, *argv]))


def plan(cfg: DistillConfig, n_samples: int = 12):
    return baby_step_stages([f"s{i}" for i in range(n_samples)], cfg.curriculum, base_skew=cfg.loss.skew)


def test_the_empty_help_texts_are_all_covered():
    helps = {(name, f.name) for name, section in SECTIONS.items() for f in dataclasses.fields(section)
             if "empty" in f.metadata.get("help", "").lower() and allows_none(typing.get_type_hints(section)[f.name])}
    assert helps == EMPTY_HELP
    assert EMPTY_HELP <= {(s, f) for s, f, _ in OPTIONAL}


@pytest.mark.parametrize(("section", "field", "flag"), OPTIONAL, ids=[flag for _, _, flag in OPTIONAL])
def test_an_empty_flag_value_is_none(section, field, flag):
    cfg = config_of(flag, "")
    assert getattr(getattr(cfg, section), field) is None
    assert field in getattr(cfg, section).given_fields()  # given (empty), not left at its default
    assert getattr(config_of(flag, "  "), section).__getattribute__(field) is None


def test_empty_skew_last_stage_means_skew_in_every_stage():
    pocl = ["--curriculum", "pocl", "--num-stages", "3", "--skew", "0.2"]
    assert [st.skew for st in plan(config_of(*pocl))] == [0.2, 0.2, 0.12]  # the default: 0.12 in the last stage
    assert [st.skew for st in plan(config_of(*pocl, "--skew-last-stage", "0.3"))] == [0.2, 0.2, 0.3]
    cfg = config_of(*pocl, "--skew-last-stage", "")
    assert cfg.curriculum.skew_last_stage is None
    assert [st.skew for st in plan(cfg)] == [0.2, 0.2, 0.2]


def test_other_empty_curriculum_values_in_the_plan():
    cfg = config_of("--curriculum", "pocl", "--num-stages", "2", "--plateau-patience", "",
                    "--on-policy-fraction-start", "", "--on-policy-fraction-end", "")
    stages = plan(cfg)
    assert [st.plateau_patience for st in stages] == [None, None]  # fixed epochs per stage
    assert [st.on_policy_fraction for st in stages] == [None, None]  # --on-policy-fraction in every stage
    cfg = config_of("--curriculum", "pocl", "--num-stages", "2", "--on-policy-fraction-start", "0.2",
                    "--on-policy-fraction-end", "")
    assert [st.on_policy_fraction for st in plan(cfg)] == [0.2, 0.2]  # end empty: the same as the start


@pytest.mark.parametrize("text", ["skew_last_stage:\n", "skew_last_stage: null\n", "skew_last_stage: ''\n",
                                  'skew_last_stage: ""\n'])
def test_yaml_null_and_empty_are_none(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  skew: 0.25\ncurriculum:\n  curriculum: pocl\n  num_stages: 2\n  " + text)
    cfg = config_of(config=str(path))
    assert cfg.curriculum.skew_last_stage is None
    assert [st.skew for st in plan(cfg)] == [0.25, 0.25]
    assert DistillConfig.from_yaml(path).curriculum.skew_last_stage is None


def test_an_empty_flag_overrides_the_files_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("curriculum:\n  skew_last_stage: 0.3\n  plateau_patience: 2\n")
    assert config_of(config=str(path)).curriculum.skew_last_stage == 0.3
    cfg = config_of("--skew-last-stage", "", "--plateau-patience", "", config=str(path))
    assert cfg.curriculum.skew_last_stage is None and cfg.curriculum.plateau_patience is None


@pytest.mark.parametrize(("flag", "field"), [("--skew", "skew"), ("--epochs", "epochs"), ("--batch-size", "batch_size"),
                                             ("--alpha", "alpha")])
def test_an_empty_value_of_a_required_setting_is_a_one_line_error(tmp_path, monkeypatch, capsys, flag, field):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["distill", flag, ""], capsys)
    assert code == 2 and out == ""
    assert err == (f"pocl distill: error: argument {flag}: {field}: a value is required (got an empty string) "
                   "(see pocl distill --help)\n")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_an_empty_yaml_value_of_a_required_setting_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  skew: ''\n")
    with pytest.raises(ConfigError, match=r"^loss\.skew: a value is required \(got an empty string\)$"):
        DistillConfig.from_yaml(path)
    path.write_text("loss:\n  skew:\n")
    with pytest.raises(ConfigError, match=r"^loss\.skew: a value is required \(got null\)$"):
        DistillConfig.from_yaml(path)
