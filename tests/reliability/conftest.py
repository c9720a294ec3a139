"""Runs shared by the reliability tests, made once per session with relative paths (data/, run/), so
that a copy of a run folder in another directory is the same run: same config, same resume."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.reliability.helpers import POCL_FLAGS, TINY_FLAGS, stop_after_step

#: The shared POCL run has 9 steps (stage 1: 3, stage 2: 6); the interrupted one stops after this one.
STOP_STEP = 5


@contextlib.contextmanager
def working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(previous)


def pocl_argv(tiny_pair, *extra: str, teacher=None, student=None) -> list[str]:
    """`pocl distill` of the shared POCL run, relative to the run's directory."""
    t, s = tiny_pair
    return ["distill", "--teacher", str(teacher or t), "--student", str(student or s), "--train-file",
            "data/train.jsonl", "--dev-file", "data/dev.jsonl", *TINY_FLAGS, *POCL_FLAGS, "--output-dir", "run", *extra]


def _prepare(root: Path, tiny_data) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copy(tiny_data[0], root / "data" / "train.jsonl")
    shutil.copy(tiny_data[1], root / "data" / "dev.jsonl")
    return root


@pytest.fixture(scope="session")
def reliability_bases(tmp_path_factory, tiny_pair, tiny_data):
    """{"completed": dir, "interrupted": dir}: each holds data/ and run/ of the shared POCL run, run to
    the end, or stopped (as by SIGTERM) after step STOP_STEP. Copy them with :func:`use_copy`."""
    from pocl.cli import main

    root = tmp_path_factory.mktemp("reliability_bases")
    completed = _prepare(root / "completed", tiny_data)
    with working_directory(completed):
        assert main(pocl_argv(tiny_pair)) == 0
    interrupted = _prepare(root / "interrupted", tiny_data)
    (interrupted / "run").mkdir()
    for name in ("ranking.jsonl", "ranking.meta.json"):  # same student and data: the ranking is reused
        shutil.copy(completed / "run" / name, interrupted / "run" / name)
    with pytest.MonkeyPatch.context() as mp, working_directory(interrupted):
        stop_after_step(mp, STOP_STEP)
        assert main(pocl_argv(tiny_pair)) == 130
    return {"completed": completed, "interrupted": interrupted}


@pytest.fixture
def use_copy(reliability_bases, tmp_path, monkeypatch):
    """``use_copy("interrupted")``: a private copy of a shared run, made the working directory."""

    def make(which: str) -> Path:
        target = tmp_path / which
        shutil.copytree(reliability_bases[which], target)
        monkeypatch.chdir(target)
        return target

    return make
