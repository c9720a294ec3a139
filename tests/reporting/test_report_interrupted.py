"""`pocl report` on an interrupted run: the unfinished stage is drawn (its span and its T and alpha, from
metrics.jsonl) and the plot says where the run stopped. The run is the shared interrupted 2-stage POCL run
of tests/reliability (stopped after step 5 of 9: stage 1 = steps 1-3 finished, stage 2 = steps 4-5 unfinished).
"""

from __future__ import annotations

import json
import shutil

from pocl.reporting import plot_training_curves, training_curves_data
from pocl.reporting.difficulty_plot import difficulty_stages
from tests.reliability import conftest as reliability
from tests.reliability.helpers import run_cli, snapshot
from tests.reporting.test_plots import assert_png

# the shared runs of tests/reliability (fixtures of another folder's conftest are not visible here)
reliability_bases, use_copy = reliability.reliability_bases, reliability.use_copy

# the shared run's plan (tests/reliability/helpers.py): --alpha 0.5 holds in every stage, T rises 1 -> 2
STAGE_1 = {"name": "stage1", "index": 0, "start": 0, "end": 3, "first_step": 1, "last_step": 3,
           "temperature": 1.0, "alpha": 0.5, "num_samples": 24, "finished": True}
STAGE_2 = {"name": "stage2", "index": 1, "start": 3, "end": 5, "first_step": 4, "last_step": 5,
           "temperature": 2.0, "alpha": 0.5, "num_samples": 48, "finished": False}


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "train"]


def test_the_interrupted_runs_files_lack_the_unfinished_stage(use_copy):
    """What the report has to work with: summary.json names stage 1 only; metrics.jsonl has stage 2's rows."""
    run = use_copy("interrupted") / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_steps"] == reliability.STOP_STEP == 5
    assert [s["name"] for s in summary["stages"]] == ["stage1"]
    rows = _train_rows(run)
    assert [(r["step"], r["stage"], r["stage_index"], r["temperature"], r["alpha"]) for r in rows] == [
        (1, "stage1", 0, 1.0, 0.5), (2, "stage1", 0, 1.0, 0.5), (3, "stage1", 0, 1.0, 0.5),
        (4, "stage2", 1, 2.0, 0.5), (5, "stage2", 1, 2.0, 0.5)]


def test_the_unfinished_stage_is_drawn_and_the_run_marked_interrupted(use_copy, tmp_path):
    run = use_copy("interrupted") / "run"
    data = training_curves_data(run)
    assert data.stages == [STAGE_1, STAGE_2]
    assert data.status == "interrupted" and data.interrupted_at == 5 and data.last_step == 5
    assert data.note == "interrupted at step 5"
    out = tmp_path / "plots" / "curves.png"
    assert plot_training_curves(run, out, title="Training: run") == out
    assert_png(out)


def test_a_completed_run_is_not_marked(use_copy):
    run = use_copy("completed") / "run"
    data = training_curves_data(run)
    assert data.stages == [STAGE_1, dict(STAGE_2, end=9, last_step=9, finished=True)]
    assert data.status == "completed" and data.interrupted_at is None and data.note is None


def test_without_summary_json_the_checkpoint_and_the_metrics_give_the_stages(use_copy):
    """A run killed before it wrote summary.json (SIGKILL, power cut): the newest checkpoint's trainer state
    gives the finished stage, metrics.jsonl the unfinished one."""
    run = use_copy("interrupted") / "run"
    (run / "summary.json").unlink()
    data = training_curves_data(run)
    assert data.stages == [STAGE_1, STAGE_2]
    assert data.status == "unknown" and data.interrupted_at == 5
    assert data.note == "unfinished: no summary.json, last logged step 5"
    shutil.rmtree(run / "checkpoints")  # metrics.jsonl alone: the same spans and T/alpha, no sample counts
    data = training_curves_data(run)
    assert data.stages == [dict(STAGE_1, num_samples=None), dict(STAGE_2, num_samples=None)]


def test_the_difficulty_plot_gets_every_planned_stage(use_copy):
    run = use_copy("interrupted") / "run"
    summary = json.loads((run / "summary.json").read_text())
    stages = difficulty_stages(run, summary)["stages"]
    assert [(s["name"], s["num_samples"]) for s in stages] == [("stage1", 24), ("stage2", 48)]


def test_pocl_report_on_the_interrupted_run(use_copy, capsys):
    root = use_copy("interrupted")
    before = snapshot(root)
    code, out, err = run_cli(["report", "run", "--output-dir", "plots"], capsys)
    assert code == 0, err
    assert out.split() == ["plots/run_training_curves.png", "plots/run_difficulty.png"]
    for name in out.split():
        assert_png(root / name)
    after = snapshot(root, exclude=["plots"])
    assert after == before  # the run folder is only read
