"""The command line: help texts, a smoke run on tiny models, and error reporting."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pocl.cli import flag_name, main, make_parser
from pocl.config import SECTIONS


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            if f.metadata.get("cli", True):
                assert flag_name(f) in out, f"{name}.{f.name}"
    assert "--config" in out and "built-in default" in out
    assert "KD weight alpha" in out


def test_top_level_help_and_version(capsys):
    assert main([]) == 0
    assert "distill" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "pocl 0.1.0" in capsys.readouterr().out


def test_bad_flag_value_is_reported_by_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(["distill", "--batch-size", "many"])
    assert e.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_config_error_exits_2_without_traceback(capsys, tmp_path):
    code = main(["distill", "--teacher", str(tmp_path), "--student", str(tmp_path), "--alpha", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "loss.alpha: must be in [0, 1]" in err and "Traceback" not in err


def test_distill_smoke_in_a_subprocess(tmp_path, tiny_pair, tiny_data):
    teacher, student = tiny_pair
    cfg = tmp_path / "kd.yaml"
    cfg.write_text("loss:\n  divergence: srkl\n  alpha: 0.9\ntrain:\n  batch_size: 8\n  micro_batch_size: 4\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pocl", "distill", "--config", str(cfg), "--teacher", str(teacher), "--student",
           str(student), "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]), "--max-length", "48",
           "--max-prompt-length", "32", "--max-steps", "3", "--output-dir", str(out), "--no-progress",
           "--temperature", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final model:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_steps"] == 3 and summary["status"] == "completed"
    saved = (out / "config.yaml").read_text()
    assert "divergence: srkl" in saved and "temperature: 2.0" in saved and "alpha: 0.9" in saved
    assert (out / "final" / "config.json").exists()
