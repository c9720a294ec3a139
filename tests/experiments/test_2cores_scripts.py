"""examples/experiments/*_2cores.sh, the scripts that run the SmolLM2 matrices on a 2-core CPU, run with a
stand-in python that records each call and its thread setting: the shared preamble (matrix_2cores_env.sh),
the phases' order, that the methods script's --only globs cover every run of its matrix, and that a failed
step stops the script. The matrix runner itself is tested elsewhere."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "experiments"
METHODS_RUNS = [f"{m}-s{s}" for s in (10, 20, 30) for m in (
    "kd-fkl", "pocl-fkl", "taid", "taid-pocl", "skd-fkl", "skd-pocl-fkl", "pocl-assistant-fkl",
    "pocl-fkl-const_t")] + ["teacher", "student"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(tmp_path: Path, name: str, fail_on: str | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs SCRIPT from ``tmp_path`` with a stand-in python that logs ``OMP=N ARGS...``; it exits 1 on a call
    whose arguments contain ``fail_on``."""
    calls = tmp_path / "calls.log"
    stand_in = tmp_path / "py"
    fail = f'[[ "$*" == *"{fail_on}"* ]] && exit 1\n' if fail_on else ""
    stand_in.write_text(f'#!/usr/bin/env bash\necho "OMP=$OMP_NUM_THREADS $*" >> {calls}\n{fail}exit 0\n')
    stand_in.chmod(0o755)
    done = subprocess.run(["bash", str(EXAMPLES / name)], check=False, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(stand_in)}, timeout=60)
    return done, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("name, spec, first, export", [
    ("smollm2_dolly_2cores.sh", "smollm2_dolly.yaml", "--only pocl-fkl-s10 --no-eval", None),
    ("smollm2_dolly_powered_2cores.sh", "smollm2_dolly_powered.yaml", "--only teacher --no-eval", "docs/results/powered"),
    ("smollm2_dolly_methods_2cores.sh", "smollm2_dolly_methods.yaml", "--only teacher --no-eval",
     "docs/results/methods"),
])
def test_every_call_is_a_one_thread_matrix_call_from_preparation_to_export(tmp_path, name, spec, first, export):
    done, calls = run_script(tmp_path, name)
    assert done.returncode == 0, done.stderr
    matrix = [c for c in calls if " -m pocl matrix " in c]
    assert all(c.startswith("OMP=1 ") for c in calls)
    assert all(f"-m pocl matrix examples/experiments/{spec} --no-progress " in c for c in matrix)
    assert matrix[0].endswith(first)
    assert matrix[-1].endswith("--table-only" + (f" --export {export}" if export else ""))
    assert (tmp_path / "runs").is_dir()


def test_methods_script_covers_every_run_in_its_phases(tmp_path):
    done, calls = run_script(tmp_path, "smollm2_dolly_methods_2cores.sh")
    assert done.returncode == 0, done.stderr
    globs = [[g for g in c.split("--only ", 1)[1].split() if g != "--no-eval"] for c in calls if "--only " in c]
    chosen = [[n for n in METHODS_RUNS if any(fnmatch.fnmatch(n, g) for g in gs)] for gs in globs]
    assert set().union(*chosen) == set(METHODS_RUNS)
    # the order: the models, then the six SKD runs (no teacher cache), then one run alone builds the cache
    assert chosen[0] == ["teacher"] and sorted(chosen[1] + chosen[2]) == sorted(
        n for n in METHODS_RUNS if n.startswith("skd-"))
    assert chosen[3] == ["taid-s10"] and all("skd-" not in n for c in chosen[4:] for n in c)


def test_a_failed_step_stops_the_script(tmp_path):
    done, calls = run_script(tmp_path, "smollm2_dolly_methods_2cores.sh", fail_on="--only teacher --no-eval")
    assert done.returncode != 0 and len(calls) == 1


def test_the_preamble_needs_a_spec(tmp_path):
    done = subprocess.run(["bash", "-c", f"source {EXAMPLES / 'matrix_2cores_env.sh'}"], check=False, cwd=tmp_path,
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "SPEC"})
    assert done.returncode != 0 and "set SPEC" in done.stderr and not (tmp_path / "runs").exists()
