"""``pocl matrix``: the command prints the plan, maps spec errors to exit 2 and an interrupted run to 130;
the example script ``examples/experiments/run_matrix.py`` still runs; pocl.experiments has no import cycle
and does not load torch on import (neither does ``pocl --help``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pocl.experiments as matrix
from pocl.experiments import runner
from tests.experiments.test_run_matrix import write_spec
from tests.reliability.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_pocl_matrix_dry_run_prints_the_plan(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "m"
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, out)
    code, printed, err = run_cli(["matrix", str(spec_path), "--dry-run"], capsys)
    assert code == 0, err
    assert f"spec: {spec_path}" in printed and "9 training runs, 11 evaluations" in printed
    assert "pocl-fkl-random-s1" in printed and "1/stage x4" in printed and not out.exists()
    # the same plan as the example script's main
    assert matrix.main([str(spec_path), "--dry-run"]) == 0
    assert capsys.readouterr().out == printed


def test_the_example_script_still_runs(tmp_path, tiny_pair, tiny_data):
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, tmp_path / "m")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "experiments" / "run_matrix.py"), str(spec_path),
                           "--dry-run"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "9 training runs, 11 evaluations" in proc.stdout and "pocl-rkl-s2" in proc.stdout
    bad = write_spec(tmp_path / "bad.yaml", tiny_pair, tiny_data, tmp_path / "m", colour=1)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "experiments" / "run_matrix.py"), str(bad),
                           "--dry-run"], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"run_matrix: error: {bad}: field 'colour': unknown key" in proc.stderr


@pytest.mark.parametrize("change, field", [
    ({"colour": 1}, "field 'colour': unknown key"),
    ({"methods": ["kd", "pcol"]}, "field 'methods': unknown entry 'pcol'"),
])
def test_a_spec_error_exits_2_naming_the_file_and_field(tmp_path, tiny_pair, tiny_data, capsys, change, field):
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, tmp_path / "m", **change)
    code, printed, err = run_cli(["matrix", str(spec_path), "--dry-run"], capsys)
    assert code == 2 and printed == ""
    assert err.startswith(f"pocl: error: {spec_path}: ") and field in err and "Traceback" not in err


def test_an_interrupted_matrix_exits_130(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, tmp_path / "m")

    def interrupted(*args, **kwargs):
        raise matrix.Interrupted("pocl distill was interrupted; run the same command again to resume")

    monkeypatch.setattr(runner, "run_matrix", interrupted)
    code, _, err = run_cli(["matrix", str(spec_path), "--in-process"], capsys)
    assert code == 130 and err.strip() == "pocl: pocl distill was interrupted; run the same command again to resume"


def test_no_import_cycle_and_no_torch_on_import():
    for first, second in (("pocl.experiments", "pocl.cli"), ("pocl.cli", "pocl.experiments")):
        code = (f"import sys, {first}, {second}; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') "
                "if m in sys.modules))")
        proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[]", f"import {first}, {second} loads {proc.stdout.strip()}"
    # nothing in pocl imports pocl.experiments but the command module
    users = sorted(str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "pocl").rglob("*.py")
                   if "experiments" not in p.parts and re.search(r"pocl\.experiments|from pocl import experiments",
                                                                   p.read_text(encoding="utf-8")))
    assert users == ["pocl/commands/matrix.py"]


@pytest.mark.slow
def test_pocl_matrix_runs_and_writes_the_results(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "m"
    spec_path = write_spec(tmp_path / "spec.yaml", tiny_pair, tiny_data, out, divergences=["fkl"], seeds=[1],
                           ablations=None, reference_models=["student"])
    code, printed, err = run_cli(["matrix", str(spec_path), "--in-process", "--no-progress", "--only", "kd-*",
                                  "--export", str(tmp_path / "docs")], capsys)
    assert code == 0, err
    assert f"results: {out / 'results.md'}, {out / 'results.json'}" in printed
    assert f"exported {tmp_path / 'docs' / 'results.md'}" in printed
    data = json.loads((out / "results.json").read_text())
    assert list(data["table"]["models"]) == ["FKL"] and data["schema"] == matrix.SCHEMA
    assert {r["name"]: r["status"] for r in data["runs"]} == {"kd-fkl-s1": "completed", "pocl-fkl-s1": "not started",
                                                             "student": "reference"}
