"""End to end on tiny models: rank -> 2 stages -> final checkpoint and summary (Python API)."""

from __future__ import annotations

import json

from pocl.pipeline import distill
from pocl.training.metrics import read_metrics
from tests.conftest import tiny_config


def test_pocl_two_stages_end_to_end(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, curriculum={
        "curriculum": "pocl", "num_stages": 2, "stage_epochs": 2, "rank_max_new_tokens": 6, "rank_batch_size": 8})
    result = distill(cfg)
    run = tmp_path / "run"
    assert result.status == "completed" and (run / "final" / "model.safetensors").exists()

    ranking = [json.loads(line) for line in (run / "ranking.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in ranking] == list(range(1, 49))
    meta = json.loads((run / "ranking.meta.json").read_text())
    assert meta["order_inputs"]["measurer"] == "rrf" and meta["counts"]["samples"] == 48

    summary = json.loads((run / "summary.json").read_text())
    s1, s2 = summary["stages"]
    assert (s1["num_samples"], s2["num_samples"]) == (24, 48)
    assert (s1["steps"], s2["steps"]) == (6, 12)  # 2 epochs of 3 and of 6 windows of 8
    assert (s1["temperature"], s2["temperature"]) == (1.0, 2.0) and (s1["alpha"], s2["alpha"]) == (0.7, 1.0)
    assert summary["curriculum"] == "pocl" and summary["ranking"]["action"] == "computed"
    assert "| stage1 | 24 |" in (run / "summary.md").read_text()

    # stage 1 trained on exactly the easiest half of the ranking
    easiest = {r["id"] for r in ranking[:24]}
    from pocl.curriculum import baby_step_stages

    stages = baby_step_stages([r["id"] for r in ranking], cfg.curriculum, base_skew=cfg.loss.skew)
    assert set(stages[0].sample_ids) == easiest

    recs = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert {r["stage"] for r in recs} == {"stage1", "stage2"}

    # the same command again: the finished run is recognised, the ranking reused
    again = distill(cfg)
    assert again.status == "completed" and again.summary["ranking"]["action"] == "reused"
