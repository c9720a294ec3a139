"""Shared helpers of the reliability tests: CLI argument lists for the tiny models, snapshots of an
output folder, an in-process stop request, and a subprocess runner for the signal tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

#: Flags of every tiny run (the tiny pair of tests/conftest.py, 48 training and 16 dev samples).
TINY_FLAGS = ["--max-length", "48", "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4",
              "--lr", "1e-2", "--min-lr", "1e-4", "--alpha", "0.5", "--seed", "3", "--no-progress",
              "--no-tensorboard", "--log-every", "1"]

#: A 2-stage POCL run: ranking (48 samples, 6 new tokens, batches of 8), stage 1 on 24 samples
#: (3 steps), stage 2 on 48 (6 steps), a checkpoint every 2 steps, a dev evaluation every 3.
POCL_FLAGS = ["--curriculum", "pocl", "--num-stages", "2", "--stage-epochs", "1", "--rank-max-new-tokens", "6",
              "--rank-batch-size", "8", "--save-every", "2", "--eval-every", "3", "--save-total-limit", "3"]


def distill_argv(tiny_pair, tiny_data, out: Path, *extra: str, teacher=None, student=None, train=None,
                 dev=None) -> list[str]:
    t, s = tiny_pair
    return ["distill", "--teacher", str(teacher or t), "--student", str(student or s),
            "--train-file", str(train or tiny_data[0]), "--dev-file", str(dev or tiny_data[1]),
            *TINY_FLAGS, "--output-dir", str(out), *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``pocl.cli.main(argv)`` in this process: (exit code, stdout, stderr). argparse exits become codes."""
    from pocl.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (``exclude``: top-level names to leave out)."""
    exclude = set(exclude)
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0] not in exclude:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


def stop_after_step(monkeypatch, step: int) -> None:
    """Make every trainer created from now on ask itself to stop (as SIGTERM does) after global ``step``."""
    from pocl.training.trainer import DistillTrainer

    real_init = DistillTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def stop(trainer):
            if trainer.state.global_step == step:
                trainer.request_stop()

        self.step_callbacks.append(stop)

    monkeypatch.setattr(DistillTrainer, "__init__", init)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def pocl_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "pocl", *argv]


def run_pocl(argv: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(pocl_command(argv), capture_output=True, text=True, timeout=timeout, env=subprocess_env())
