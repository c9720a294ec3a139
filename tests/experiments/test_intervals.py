"""pocl.experiments.intervals: per-prompt scores, the paired bootstrap interval, the variance components and
the predicted half-width, against data drawn from the model the module describes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocl.errors import DataError
from pocl.experiments.intervals import (
    VarianceComponents,
    bootstrap_paired,
    load_prompt_scores,
    paired_differences_by_prompt,
    predicted_half_width,
    variance_components,
)


def _simulate(rng, *, r, p, s, mu=0.0, sd_seed=0.0, sd_prompt=0.0, sd_inter=0.0, sd_sampling=0.0):
    b = rng.normal(0, sd_seed, size=(r, 1, 1))
    a = rng.normal(0, sd_prompt, size=(1, p, 1))
    c = rng.normal(0, sd_inter, size=(r, p, 1))
    e = rng.normal(0, sd_sampling, size=(r, p, s))
    return mu + b + a + c + e


def _write_generations(path, model, scores):
    with open(path, "a", encoding="utf-8") as fh:
        for name, prompts in scores.items():
            for pid, seeds in prompts.items():
                fh.writelines(json.dumps({"model": model, "set": name, "id": pid, "seed": seed,
                                         "rouge_l": value}) + "\n" for seed, value in seeds.items())


def test_load_and_pair_per_prompt(tmp_path):
    a = {"Dolly": {"1": {10: 20.0, 20: 10.0}, "2": {10: 5.0, 20: 7.0}}}
    b = {"Dolly": {"1": {10: 15.0, 20: 12.0}, "2": {10: 5.0, 20: 1.0}}}
    _write_generations(tmp_path / "generations.jsonl", "A", a)
    _write_generations(tmp_path / "generations.jsonl", "B", b)
    got_a = load_prompt_scores(tmp_path, "A")
    got_b = load_prompt_scores(tmp_path, "B")
    assert got_a == a and got_b == b
    cube = paired_differences_by_prompt([(got_a, got_b)], ["Dolly"])["Dolly"]
    np.testing.assert_allclose(cube, [[[5.0, -2.0], [0.0, 6.0]]])


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text(json.dumps({"model": "A", "set": "D", "id": "1", "seed": 1, "rouge_l": 3.0}) + "\n"
                    + json.dumps({"model": "A", "set": "D", "id": "2", "seed": 1}) + "\n")
    with pytest.raises(DataError, match=r"generations.jsonl:2: field 'rouge_l' is missing"):
        load_prompt_scores(tmp_path, "A")
    path.write_text(json.dumps({"model": "A", "set": "D", "id": "1", "seed": 1, "rouge_l": 3.0}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"generations.jsonl:2: not valid JSON"):
        load_prompt_scores(tmp_path, "A")
    path.write_text(json.dumps({"model": "A", "set": "D", "id": "1", "seed": 1, "rouge_l": 3.0}) + "\n"
                    + json.dumps({"model": "A", "set": "D", "id": "1", "seed": 1, "rouge_l": 4.0}) + "\n")
    with pytest.raises(DataError, match=r":2: .*appears twice"):
        load_prompt_scores(tmp_path, "A")
    with pytest.raises(DataError, match="no rows of model 'B'"):
        load_prompt_scores(tmp_path, "B")


def test_pairs_evaluated_on_other_prompts_are_refused():
    a = {"D": {"1": {1: 1.0}, "2": {1: 1.0}}}
    b = {"D": {"1": {1: 1.0}}}
    with pytest.raises(DataError, match=r"pair 1, model B, set 'D': evaluated on other prompts"):
        paired_differences_by_prompt([(a, b)], ["D"])


def test_bootstrap_mean_is_the_plain_mean_and_avg_weights_sets_equally():
    rng = np.random.default_rng(0)
    diffs = {"x": rng.normal(1.0, 1.0, size=(3, 40, 2)), "y": rng.normal(-1.0, 1.0, size=(3, 10, 2))}
    out = bootstrap_paired(diffs, n_boot=300)
    assert out["x"].mean == pytest.approx(diffs["x"].mean())
    assert out["Avg"].mean == pytest.approx((diffs["x"].mean() + diffs["y"].mean()) / 2)
    assert out["x"].low < out["x"].mean < out["x"].high
    assert out["Avg"].n == (3, 50, 2)


def test_constant_difference_has_a_zero_width_interval():
    diffs = {"x": np.full((3, 20, 2), 1.5)}
    out = bootstrap_paired(diffs, n_boot=200)
    assert (out["x"].low, out["x"].high) == pytest.approx((1.5, 1.5))


def test_variance_components_recover_the_simulated_ones():
    rng = np.random.default_rng(1)
    d = _simulate(rng, r=40, p=400, s=4, sd_seed=2.0, sd_prompt=3.0, sd_inter=1.5, sd_sampling=5.0)
    vc = variance_components(d)
    assert vc.seed == pytest.approx(4.0, rel=0.5)  # 40 seeds: a rough estimate
    assert vc.prompt == pytest.approx(9.0, rel=0.2)
    assert vc.interaction == pytest.approx(2.25, rel=0.2)
    assert vc.sampling == pytest.approx(25.0, rel=0.05)


def test_one_pair_puts_the_interaction_into_the_prompt_term():
    rng = np.random.default_rng(2)
    d = _simulate(rng, r=1, p=3000, s=3, sd_prompt=2.0, sd_inter=2.0, sd_sampling=4.0)
    vc = variance_components(d)
    assert np.isnan(vc.seed)
    assert vc.prompt == pytest.approx(8.0, rel=0.15)
    with pytest.raises(ValueError, match="seed_variance"):
        predicted_half_width([vc], prompts=10, sampling_seeds=1, training_seeds=3)


def test_predicted_half_width_matches_the_spread_of_repeated_experiments():
    # The half-width the formula predicts = 1.96 x the std of the Avg estimate over many simulated
    # experiments of that design (two sets with different components).
    comps = [VarianceComponents(seed=0.3, prompt=4.0, interaction=2.0, sampling=100.0),
             VarianceComponents(seed=0.3, prompt=9.0, interaction=1.0, sampling=60.0)]
    rng = np.random.default_rng(3)
    estimates = []
    for _ in range(3000):
        b = rng.normal(0, np.sqrt(0.3), size=(3, 1, 1))  # shared by the sets
        means = []
        for c in comps:
            d = _simulate(rng, r=3, p=30, s=2, sd_prompt=np.sqrt(c.prompt), sd_inter=np.sqrt(c.interaction),
                          sd_sampling=np.sqrt(c.sampling)) + b
            means.append(d.mean())
        estimates.append(np.mean(means))
    observed = 1.959964 * np.std(estimates)
    predicted = predicted_half_width(comps, prompts=30, sampling_seeds=2, training_seeds=3, bootstrap=False)
    assert predicted == pytest.approx(observed, rel=0.06)


def test_bootstrap_interval_width_is_near_the_predicted_one():
    # The mean half-width of the bootstrap over simulated experiments is what predicted_half_width
    # says for it (with the two-level bootstrap's double count), and wider than the true one.
    rng = np.random.default_rng(4)
    comps = VarianceComponents(seed=0.0, prompt=4.0, interaction=16.0, sampling=36.0)
    widths = [bootstrap_paired({"x": _simulate(rng, r=3, p=60, s=2, sd_prompt=2.0, sd_inter=4.0, sd_sampling=6.0)},
                               n_boot=500, seed=k)["x"].half_width for k in range(60)]
    predicted = predicted_half_width([comps], prompts=60, sampling_seeds=2, training_seeds=3)
    true = predicted_half_width([comps], prompts=60, sampling_seeds=2, training_seeds=3, bootstrap=False)
    assert np.mean(widths) == pytest.approx(predicted, rel=0.1)
    assert predicted > 1.1 * true


def test_interval_covers_the_true_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(5)
    hits = 0
    trials = 120
    for t in range(trials):
        d = _simulate(rng, r=3, p=60, s=1, mu=1.0, sd_prompt=3.0, sd_sampling=8.0)
        ci = bootstrap_paired({"x": d}, n_boot=400, seed=t)["x"]
        hits += ci.low <= 1.0 <= ci.high
    assert 0.88 <= hits / trials <= 0.99
