"""`pocl report` on a real tiny two-stage run (the files the trainer writes) and on eval results."""

from __future__ import annotations

import json
import struct

import pytest

from pocl.cli import main
from pocl.errors import DataError
from pocl.reporting import plot_eval_comparison, plot_training_curves, report
from tests.conftest import tiny_config, write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=15_000, min_size=(500, 300)):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= min_size[0] and height >= min_size[1], (path, width, height)
    assert len(data) >= min_bytes, (path, len(data))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_pair, tiny_data):
    """A two-stage curriculum run of the tiny pair, plus a hand-made ranking.jsonl of its training set."""
    from pocl.pipeline import distill, prepare_run
    from pocl.training.stages import Stage

    root = tmp_path_factory.mktemp("report")
    cfg = tiny_config(root, tiny_pair, tiny_data, train={"eval_every": 2})
    inputs = prepare_run(cfg)
    ids = [s.id for s in inputs.train_data]
    stages = [Stage("stage-1", sample_ids=tuple(ids[:24]), max_steps=3, temperature=1.0, alpha=0.7),
              Stage("stage-2", sample_ids=tuple(ids), max_steps=3, temperature=2.0, alpha=1.0)]
    result = distill(cfg, stages=stages, inputs=inputs)
    assert result.status == "completed"
    run_dir = result.output_dir
    rows = [{"id": i, "rank": k + 1, "score": 2 / (61 + k), "rouge_l": 100 - 2 * k, "loss": 0.1 * k}
            for k, i in enumerate(ids)]
    write_jsonl(run_dir / "ranking.jsonl", rows)
    return run_dir


def eval_results(path, models=("teacher", "student"), sets=("dolly", "self_inst")):
    data = {"schema": "pocl.eval/1", "seeds": [10, 20, 30], "std": "sample", "sets": {s: {"n": 5} for s in sets},
            "models": {m: {"sets": {s: {"rouge_l": {"mean": 10.0 + i + j, "std": 0.5},
                                        "exact_match": {"mean": 1.0, "std": 0.0}} for j, s in enumerate(sets)},
                           "avg": {"rouge_l": {"mean": 11.0 + i, "std": 0.4}, "exact_match": {"mean": 1.0, "std": 0}}}
                       for i, m in enumerate(models)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_report_writes_the_three_plots(tiny_run, tmp_path, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [s["end_global_step"] for s in summary["stages"]] == [3, 6]  # the layout the plots read
    results = eval_results(tmp_path / "eval" / "results.json")
    out = tmp_path / "plots"
    code = main(["report", str(tiny_run), "--eval-results", str(results), "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    expected = [out / "run_training_curves.png", out / "run_difficulty.png", out / "eval_rouge_l.png"]
    assert printed == [str(p) for p in expected]
    for p in expected:
        assert_png(p)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_default_output_dir_and_run_without_ranking(tiny_run, tmp_path):
    (tmp_path / "copy").mkdir()
    for name in ("metrics.jsonl", "summary.json"):
        (tmp_path / "copy" / name).write_bytes((tiny_run / name).read_bytes())
    files = report([tmp_path / "copy"])
    assert files == [tmp_path / "copy" / "plots" / "copy_training_curves.png"]
    assert_png(files[0])


def test_curves_without_summary_and_comparison_of_two_result_files(tiny_run, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes((tiny_run / "metrics.jsonl").read_bytes())
    assert_png(plot_training_curves(tmp_path / "run", tmp_path / "c.png"))  # stages read from the metrics
    a = eval_results(tmp_path / "a" / "results.json")
    b = eval_results(tmp_path / "b" / "results.json", models=("teacher", "pocl"))
    assert_png(plot_eval_comparison([a, b.parent], tmp_path / "bars.png", metric="exact_match"))


def test_report_errors(tmp_path):
    with pytest.raises(DataError, match="nothing to plot"):
        report([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics.jsonl"):
        report([tmp_path / "empty"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not a results.json"):
        plot_eval_comparison([tmp_path / "x.json"], tmp_path / "x.png")
    assert main(["report", str(tmp_path / "missing")]) == 2
