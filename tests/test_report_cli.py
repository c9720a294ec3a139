"""`pocl report`'s command line: a RUN_DIR after --eval-results is still a run folder (the flag takes one or
more values and would otherwise swallow it), and an argument that is neither what its place asks for nor a
run folder is a one-line error (exit 2) naming it, with nothing written."""

from __future__ import annotations

import pytest

from pocl.commands.report import sort_inputs
from pocl.errors import ConfigError
from tests.reliability import conftest as reliability
from tests.reliability.helpers import run_cli, snapshot
from tests.reporting.test_plots import assert_png, eval_results

# the shared runs of tests/reliability (fixtures of another folder's conftest are not visible here)
reliability_bases, use_copy = reliability.reliability_bases, reliability.use_copy

PLOTS = ["run_training_curves.png", "run_difficulty.png", "eval_rouge_l.png"]


@pytest.fixture
def root(use_copy):
    """A copy of the completed shared POCL run (run/, with its ranking) and a results.json of `pocl eval`."""
    root = use_copy("completed")
    eval_results(root / "ev" / "results.json")
    eval_results(root / "ev2" / "results.json", models=("teacher", "pocl"))
    return root


def _report(capsys, *argv):
    code, out, err = run_cli(["report", *argv], capsys)
    assert code == 0, err
    return out.split()


def test_a_run_folder_after_eval_results_is_a_run(root, capsys):
    after = _report(capsys, "--eval-results", "ev/results.json", "run", "--output-dir", "p1")
    before = _report(capsys, "run", "--eval-results", "ev/results.json", "--output-dir", "p2")
    assert after == [f"p1/{name}" for name in PLOTS]
    assert before == [f"p2/{name}" for name in PLOTS]
    for name in PLOTS:
        assert_png(root / "p1" / name)
        assert (root / "p1" / name).read_bytes() == (root / "p2" / name).read_bytes(), name


def test_several_values_and_repeated_flags(root, capsys):
    assert sort_inputs([], ["ev/results.json", "ev2", "run"]) == (["run"], ["ev/results.json", "ev2"])
    assert sort_inputs(["run"], ["ev"]) == (["run"], ["ev"])
    # the old multi-value form and the repeated flag give the same chart
    multi = _report(capsys, "--eval-results", "ev/results.json", "ev2", "run", "--output-dir", "m")
    repeated = _report(capsys, "--eval-results", "ev/results.json", "run", "--eval-results", "ev2/results.json",
                       "--output-dir", "r")
    assert multi == [f"m/{name}" for name in PLOTS] and repeated == [f"r/{name}" for name in PLOTS]
    assert (root / "m" / "eval_rouge_l.png").read_bytes() == (root / "r" / "eval_rouge_l.png").read_bytes()


@pytest.mark.parametrize(("argv", "message"), [
    (["--eval-results", "ev/results.json", "nothere"],
     "pocl: error: --eval-results nothere: not found (neither a results.json of `pocl eval` nor a run folder)"),
    (["--eval-results", "ev/results.json", "data"],
     ("pocl: error: --eval-results data: neither a results.json of `pocl eval` (or a folder holding one) nor a run "
      "folder of `pocl distill` (no metrics.jsonl, summary.json, config.yaml)")),
    (["nothere", "--eval-results", "ev/results.json"], "pocl: error: run folder not found: nothere"),
    (["data"], ("pocl: error: data: not a run folder of `pocl distill` (no metrics.jsonl, summary.json, "
                "config.yaml)")),
    (["."], ("pocl: error: .: not a run folder of `pocl distill` (no metrics.jsonl, summary.json, config.yaml) "
             "(its run folders: run/)")),
    (["ev/results.json"], ("pocl: error: ev/results.json: not a run folder of `pocl distill`; give evaluation "
                           "results with --eval-results ev/results.json")),
    (["run", "--eval-results", "run/metrics.jsonl"],
     ("pocl: error: run/metrics.jsonl: not a results.json of `pocl eval` (invalid JSON: Extra data: line 2 "
      "column 1 (char ")),
    ([], ("pocl: error: nothing to plot: give one or more RUN_DIR (output folders of `pocl distill`) and/or "
          "--eval-results FILE (results.json of `pocl eval`); see pocl report --help")),
    (["--eval-results"], ("pocl report: error: argument --eval-results: expected at least one argument (see pocl "
                          "report --help)")),
], ids=["missing-after-flag", "folder-after-flag", "missing-run", "not-a-run", "parent-of-runs",
        "results-as-run", "not-results-json", "no-arguments", "flag-without-value"])
def test_bad_arguments_are_one_line_errors(root, capsys, argv, message):
    before, entries = snapshot(root), sorted(root.rglob("*"))
    code, out, err = run_cli(["report", *argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(message), err
    assert snapshot(root) == before and sorted(root.rglob("*")) == entries  # nothing written, no plots/ folder


def test_sort_inputs_refuses_like_the_command(root):
    with pytest.raises(ConfigError, match="nothing to plot"):
        sort_inputs([], [])
    with pytest.raises(ConfigError, match="--eval-results nothere: not found"):
        sort_inputs(["run"], ["nothere"])
