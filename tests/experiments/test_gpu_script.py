"""examples/experiments/smollm2_dolly_methods_gpu.sh, the script that runs the issue-20 matrix on one GPU, run
with a stand-in python that records each call: which runs each PART and SKD_WORKERS start, in which
processes, the phases' order, TIME_SKD, the RECORDS archive (unpacked once, never over an existing matrix),
the deadline that stops the workers, and the refused settings. The matrix itself is tested elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/experiments/smollm2_dolly_methods_gpu.sh"
SKD = [f"{m}-s{s}" for s in (10, 20, 30) for m in ("skd-fkl", "skd-pocl-fkl")]
MAIN = [f"{m}-s{s}" for s in (10, 20, 30)
        for m in ("kd-fkl", "pocl-fkl", "taid", "taid-pocl", "pocl-assistant-fkl")] + ["teacher", "student"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pgrep") is None,
                                reason="needs bash and pgrep")


def run_script(tmp_path: Path, *, sleep: str = "0", **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Runs the script in ``tmp_path`` with a stand-in python that logs ``PID ARGS...`` (one line per call)."""
    calls = tmp_path / "calls.log"
    stand_in = tmp_path / "py"
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$PPID $*" >> {calls}\nsleep {sleep}\n')
    stand_in.chmod(0o755)
    full = {**os.environ, "PYTHON": str(stand_in), "LOGS": str(tmp_path / "logs"), **env}
    done = subprocess.run(["bash", str(SCRIPT)], check=False, cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, [line.split() for line in lines]


def only_runs(calls) -> dict[str, str]:
    """{run: the pid of the worker shell that started it} for each ``--only RUN`` call with evaluation."""
    out = {}
    for call in calls:
        if "--only" in call and "--no-eval" not in call:
            out[call[call.index("--only") + 1]] = call[0]
    return out


def workers(calls) -> list[list[str]]:
    """The runs of each worker process, in the order each started them."""
    by_pid: dict[str, list[str]] = {}
    for call in calls:
        if "--only" in call and "--no-eval" not in call:
            by_pid.setdefault(call[0], []).append(call[call.index("--only") + 1])
    return sorted(by_pid.values())


@pytest.mark.parametrize("part, expected", [("all", SKD + MAIN), ("main", MAIN), ("skd", SKD)])
def test_each_part_starts_its_runs_after_the_two_shared_phases(tmp_path, part, expected):
    done, calls = run_script(tmp_path, PART=part)
    assert done.returncode == 0, done.stderr
    assert sorted(only_runs(calls)) == sorted(expected)
    # phase 1 (models), phase 2 (the first run, no evaluation) before any worker; the tables last
    assert calls[0][1:] == ["-m", "pocl", "matrix", "examples/experiments/smollm2_dolly_methods.yaml",
                            "--no-progress", "--only", "teacher", "--no-eval"]
    assert calls[1][-3:] == ["--only", "pocl-fkl-s10", "--no-eval"]
    assert calls[-1][-1] == "--table-only"
    log = (tmp_path / "logs/matrix.log").read_text()
    assert [m for m in ("phase 1", "phase 2", "phase 3", "phase 4", "done") if m in log] == [
        "phase 1", "phase 2", "phase 3", "phase 4", "done"]


@pytest.mark.parametrize("n, expected", [
    (1, [SKD]),
    (2, [SKD[:3], SKD[3:]]),
    (3, [SKD[0:2], SKD[2:4], SKD[4:6]]),
    (6, [[r] for r in SKD]),
])
def test_skd_workers_split_the_skd_runs_keeping_a_seeds_pair_together(tmp_path, n, expected):
    done, calls = run_script(tmp_path, PART="skd", SKD_WORKERS=str(n))
    assert done.returncode == 0, done.stderr
    assert workers(calls) == sorted(expected)


def test_part_all_gives_each_skd_run_its_own_process(tmp_path):
    done, calls = run_script(tmp_path, PART="all")
    assert done.returncode == 0, done.stderr
    groups = workers(calls)
    assert sorted(g for g in groups if g[0].startswith("skd")) == sorted([r] for r in SKD)
    assert ["teacher", "student"] in groups


@pytest.mark.parametrize("env, message", [
    ({"PART": "some"}, "PART must be all, main or skd (got some)"),
    ({"SKD_WORKERS": "4"}, "SKD_WORKERS must be 1, 2, 3 or 6 (got 4)"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, env, message):
    done, calls = run_script(tmp_path, **env)
    assert done.returncode == 2 and message in done.stderr
    assert calls == []


def test_time_skd_times_one_call_on_the_gpu_between_the_models_and_the_runs(tmp_path):
    done, calls = run_script(tmp_path, PART="skd", TIME_SKD="1", POCL_SHARED_DATA="/data")
    assert done.returncode == 0, done.stderr
    assert calls[1][1] == "benchmarks/skd_sampler.py"
    args = calls[1][2:]
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--student") + 1] == "runs/matrix/smollm2-dolly-powered/models/heal/final"
    assert args[args.index("--data") + 1] == "/data/dolly/train.jsonl"
    assert "--skip-old" in args and args[args.index("--check-tokens") + 1] == "0"
    assert "SKD call alone" in (tmp_path / "logs/matrix.log").read_text()


def _records(tmp_path: Path) -> Path:
    src = tmp_path / "src/runs/matrix/smollm2-dolly-powered/eval/kd-fkl-s10"
    src.mkdir(parents=True)
    (src / "results.json").write_text("{}")
    archive = tmp_path / "records.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tmp_path / "src/runs", arcname="runs")
    return archive


def test_records_are_unpacked_before_the_models_and_first_runs_the_given_run(tmp_path):
    archive = _records(tmp_path)
    done, calls = run_script(tmp_path, RECORDS=str(archive), FIRST="taid-pocl-s30", PART="skd")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs/matrix/smollm2-dolly-powered/eval/kd-fkl-s10/results.json").read_text() == "{}"
    assert calls[1][-3:] == ["--only", "taid-pocl-s30", "--no-eval"]
    log = (tmp_path / "logs/matrix.log").read_text()
    assert log.index("records: unpacked") < log.index("phase 1")


def test_records_never_overwrite_an_existing_matrix(tmp_path):
    archive = _records(tmp_path)
    mine = tmp_path / "runs/matrix/smollm2-dolly-powered/eval/kd-fkl-s10/results.json"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"mine": 1}')
    done, _ = run_script(tmp_path, RECORDS=str(archive), PART="skd")
    assert done.returncode == 0, done.stderr
    assert mine.read_text() == '{"mine": 1}'
    assert "exists" in (tmp_path / "logs/matrix.log").read_text()


def test_a_broken_records_archive_stops_the_script(tmp_path):
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"not an archive")
    done, calls = run_script(tmp_path, RECORDS=str(bad))
    assert done.returncode == 1
    assert calls == []


def test_the_deadline_stops_the_workers_and_the_tables_still_run(tmp_path):
    # each stand-in call lasts 2 s: phases 1-2 end at about 4 s, the worker's first run at 6 s, and the
    # deadline at 7 s stops its second run and every later one
    # another pocl job on the machine, by its command line a runner like the script's own
    other = subprocess.Popen(["bash", "-c", 'exec -a "python -m pocl matrix other.yaml" sleep 60'])
    try:
        done, calls = run_script(tmp_path, sleep="2", PART="skd", SKD_WORKERS="1", DEADLINE="7")
        assert other.poll() is None, "the deadline stopped a process the script did not start"
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 0, done.stderr
    started = list(only_runs(calls))
    assert 1 <= len(started) < len(SKD)
    log = (tmp_path / "logs/matrix.log").read_text()
    assert "deadline: stopping the workers" in log and re.search(r"phase 4: tables", log)
    assert calls[-1][-1] == "--table-only"
