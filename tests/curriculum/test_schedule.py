"""The Baby Step scheduler: stage sizes, per-stage knobs, YAML overrides, the table and the budget."""

from __future__ import annotations

import pytest
import yaml

from pocl.config import CurriculumConfig, DistillConfig
from pocl.curriculum import baby_step_stages, budget_passes, format_schedule, schedule_table, stage_sizes
from pocl.errors import ConfigError
from pocl.training.stages import Stage


@pytest.mark.parametrize("n, stages, expected", [
    (100, 4, [25, 50, 75, 100]),
    (10, 4, [2, 4, 6, 10]),
    (7, 3, [2, 4, 7]),
    (9, 2, [4, 9]),
    (5, 5, [1, 2, 3, 4, 5]),
    (3, 1, [3]),
])
def test_stage_sizes(n, stages, expected):
    assert stage_sizes(n, stages) == expected


def test_too_few_samples_for_the_stages():
    with pytest.raises(ConfigError, match="increase strictly"):
        stage_sizes(3, 4)


def test_fractions_override_sizes():
    assert stage_sizes(10, 4, [0.1, 0.3, None, 1.0]) == [1, 3, 6, 10]
    assert stage_sizes(10, 2, [0.05, None]) == [1, 10]  # max(1, floor(0.5)) = 1
    assert stage_sizes(200, 3, [0.5, 0.75, None]) == [100, 150, 200]
    assert stage_sizes(10, 3, [0.5, None, None]) == [5, 6, 10]
    with pytest.raises(ConfigError, match="increase strictly"):
        stage_sizes(10, 3, [0.7, None, None])  # 7, then the default 2 * (10 // 3) = 6
    with pytest.raises(ConfigError, match="increase strictly"):
        stage_sizes(10, 2, [0.8, 0.8])


IDS = [f"s{i}" for i in range(20)]


def test_default_schedule_matches_the_spec():
    stages = baby_step_stages(IDS, CurriculumConfig(curriculum="pocl"), base_skew=0.1)
    assert [s.name for s in stages] == ["stage1", "stage2", "stage3", "stage4"]
    assert [len(s.sample_ids) for s in stages] == [5, 10, 15, 20]
    assert [s.temperature for s in stages] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    assert [s.alpha for s in stages] == pytest.approx([0.7, 0.8, 0.9, 1.0])
    assert [s.skew for s in stages] == [0.1, 0.1, 0.1, 0.12]
    assert all(s.epochs == 8 and s.max_steps is None and s.restart_optimizer and s.plateau_patience is None
               and s.lr is None for s in stages)
    # nested prefixes of the ranked order
    for s in stages:
        assert list(s.sample_ids) == IDS[:len(s.sample_ids)]


def test_knobs_follow_the_config():
    cur = CurriculumConfig(num_stages=3, stage_epochs=2, t_start=1.0, t_max=4.0, alpha_start=0.5, alpha_end=0.9,
                           skew_last_stage=None, plateau_patience=2, restart_optimizer=False)
    stages = baby_step_stages(IDS, cur, base_skew=0.2, max_steps_per_stage=7)
    assert [s.temperature for s in stages] == pytest.approx([1.0, 2.5, 4.0])
    assert [s.alpha for s in stages] == pytest.approx([0.5, 0.7, 0.9])
    assert [s.skew for s in stages] == [0.2, 0.2, 0.2]
    assert all(s.max_steps == 7 and s.epochs == 2 and s.plateau_patience == 2 and not s.restart_optimizer
               for s in stages)


def test_one_stage_uses_the_start_values():
    (stage,) = baby_step_stages(IDS, CurriculumConfig(num_stages=1), base_skew=0.1)
    assert (stage.temperature, stage.alpha, stage.skew, len(stage.sample_ids)) == (1.0, 0.7, 0.1, 20)


def test_overrides_from_yaml(tmp_path):
    text = """
curriculum:
  curriculum: pocl
  num_stages: 3
  stages:
    - {fraction: 0.1, epochs: 2, temperature: 1.5, name: warmup}
    - {}
    - {alpha: 0.95, lr: 5.0e-5, max_steps: 11, skew: 0.3, plateau_patience: 3}
"""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cur = DistillConfig.from_yaml(path).curriculum
    stages = baby_step_stages(IDS, cur, base_skew=0.1)
    assert [s.name for s in stages] == ["warmup", "stage2", "stage3"]
    assert [len(s.sample_ids) for s in stages] == [2, 12, 20]
    assert (stages[0].epochs, stages[0].temperature, stages[0].alpha) == (2, 1.5, 0.7)
    assert (stages[1].epochs, stages[1].temperature, stages[1].alpha) == (8, 1.5, pytest.approx(0.85))
    last = stages[2]
    assert (last.alpha, last.lr, last.max_steps, last.skew, last.plateau_patience, last.temperature) == \
        (0.95, 5e-5, 11, 0.3, 3, 2.0)
    assert yaml.safe_load(text)["curriculum"]["stages"][1] == {}


def test_duplicate_ids_and_bad_overrides_are_refused():
    with pytest.raises(ConfigError, match="duplicates"):
        baby_step_stages(["a", "a", "b", "c"], CurriculumConfig(num_stages=2), base_skew=0.1)
    with pytest.raises(ConfigError):
        baby_step_stages(IDS, CurriculumConfig(num_stages=2, stages=[{"name": "x"}, {"name": "x"}]), base_skew=0.1)
    with pytest.raises(ConfigError):
        baby_step_stages(IDS[:3], CurriculumConfig(num_stages=4), base_skew=0.1)


def test_schedule_table_and_budget():
    stages = baby_step_stages([f"s{i}" for i in range(100)], CurriculumConfig(), base_skew=0.1)
    table = schedule_table(stages)
    assert [(r["index"], r["name"], r["samples"], r["fraction"], r["epochs"]) for r in table] == [
        (1, "stage1", 25, 0.25, 8), (2, "stage2", 50, 0.5, 8), (3, "stage3", 75, 0.75, 8), (4, "stage4", 100, 1.0, 8)]
    assert [r["skew"] for r in table] == [0.1, 0.1, 0.1, 0.12]
    assert budget_passes(stages) == pytest.approx(20.0)
    assert budget_passes(stages[:2], n_samples=100) == pytest.approx(6.0)
    text = format_schedule(stages)
    assert "stage4" in text and "budget: 20 passes" in text
    with_steps = [Stage("a", sample_ids=("x",), max_steps=5), Stage("b", sample_ids=("x", "y"), epochs=2)]
    assert budget_passes(with_steps, batch_size=2) == pytest.approx(5 * 2 / 2 + 2)


def test_global_settings_override_every_stage_and_cap_the_whole_run():
    from pocl.curriculum.schedule import cap_total_steps, override_every_stage

    stages = baby_step_stages(IDS, CurriculumConfig(curriculum="pocl", stage_epochs=2), base_skew=0.1)
    fixed = override_every_stage(stages, alpha=1.0)
    assert [s.alpha for s in fixed] == [1.0] * 4 and [s.temperature for s in fixed] == [s.temperature for s in stages]
    assert [s.alpha for s in stages] == pytest.approx([0.7, 0.8, 0.9, 1.0])  # the input is not changed
    # 5, 10, 15, 20 samples, batch 4, 2 epochs: 4 + 6 + 8 + 10 = 28 planned steps
    capped, notes = cap_total_steps(stages, 15, batch_size=4)
    assert [s.total_steps(len(s.sample_ids), 4) for s in capped] == [4, 6, 5]
    assert notes == ["stage3: 5 of 8 planned steps", "stage4: not run (planned 10 steps)"]
    # 2 epochs x 5/20 + 2 epochs x 10/20 + 5 steps x 4 samples / 20
    assert budget_passes(capped, 20, batch_size=4) == pytest.approx(0.5 + 1.0 + 1.0)
    assert "budget: 2.5 passes" in format_schedule(capped, 20, batch_size=4)
    same, none = cap_total_steps(stages, 28, batch_size=4)
    assert same == stages and none == []
    with pytest.raises(ConfigError, match="max_steps"):
        cap_total_steps(stages, 0, batch_size=4)


def test_same_budget_stage_epochs_with_uneven_fractions():
    from pocl.curriculum import nominal_fractions, same_budget_epochs, same_budget_stage_epochs

    # 3 stages on 20 %, 50 % and (the default of the last stage) 100 % of the data: one epoch in every
    # stage is 0.2 + 0.5 + 1.0 = 1.7 passes, so 17 KD epochs over all the data are 10 epochs per stage.
    fractions = [0.2, 0.5, None]
    assert nominal_fractions(3, fractions) == [0.2, 0.5, 1.0]
    assert nominal_fractions(3, [0.2]) == pytest.approx([0.2, 2 / 3, 1.0])  # a shorter list: the rest default
    assert same_budget_stage_epochs(17, 3, fractions) == pytest.approx(10)
    assert same_budget_epochs(10, 3, fractions) == pytest.approx(17)
    # what the schedule then trains on (100 samples: 20, 50, 100) is those 17 passes
    config = CurriculumConfig(num_stages=3, stage_epochs=same_budget_stage_epochs(17, 3, fractions),
                              stages=[{"fraction": 0.2}, {"fraction": 0.5}])
    stages = baby_step_stages([f"s{i}" for i in range(100)], config, base_skew=0.1)
    assert [len(s.sample_ids) for s in stages] == [20, 50, 100]
    assert budget_passes(stages) == pytest.approx(17)
    # Equal slices (the built-in default): (n + 1) / 2 passes per stage epoch, 20 -> 8 for 4 stages, and
    # bit for bit the epochs * 2 / (n + 1) that the built-in default computed before.
    assert same_budget_stage_epochs(20, 4) == 8
    for n in range(1, 9):
        for epochs in (1, 2.5, 3, 5, 7, 10, 12, 20):
            assert same_budget_stage_epochs(epochs, n) == epochs * (2.0 / (n + 1))
            assert same_budget_epochs(epochs, n) == epochs / (2.0 / (n + 1))
    with pytest.raises(ConfigError, match="fractions for"):
        same_budget_stage_epochs(10, 2, [0.5, 1.0, 1.0])
