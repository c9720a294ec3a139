"""Logs of batch jobs: with stderr redirected, progress is plain log lines (no carriage returns), with
--no-progress too; every dev evaluation is one line; each loaded model is described in one line (and
a teacher smaller than its student is pointed out); no line is printed twice (Hugging Face libraries'
own handlers, the skipped-rows summary)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pocl.training.metrics import read_metrics
from tests.reliability.helpers import REPO, distill_argv, run_cli, subprocess_env

STEP_LINE = re.compile(r"^\[pocl\.train\] distill: (\d+)/(\d+) steps \(\d+%\), \S+ (steps/s|s/step), elapsed "
                       r"\d+:\d\d, ETA (\d+:\d\d|\?), stage 1/1, loss \d+\.\d{4}$", re.MULTILINE)
DEV_LINE = re.compile(r"^\[pocl\.train\] step (\d+), stage 1/1 'kd': dev_ce (\d+\.\d{4}), dev_loss (\d+\.\d{4})"
                      r"(, dev_rouge_l \d+\.\d{4})?; (new best \w+: best/ replaced|not a new best .*)$", re.MULTILINE)


def _parameters(folder) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def _bad_train_file(tmp_path, tiny_data):
    rows = tiny_data[0].read_text().splitlines()
    rows[2] = '{"instruction": "Add.", "output": '
    rows[6] = json.dumps({"id": "bad-7", "instruction": 7, "output": "x"})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    return train


#: Run in a subprocess: pocl's CLI after its logging setup meets lines of the Hugging Face libraries
#: (an HTTP retry of huggingface_hub, an error of transformers, a warning of datasets loaded only then).
_SCRIPT = """
import logging, sys
import pocl.pipeline as pipeline

real = pipeline.load_data

def load_data(config, tokenizer):
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5]. (hub test line)")
    from transformers.utils import logging as tlog
    tlog.get_logger("transformers.modeling_utils").error("a transformers test line")
    import datasets  # loaded after pocl's logging setup: it installs its own handler now
    logging.getLogger("datasets.builder").warning("a datasets test line")
    return real(config, tokenizer)

pipeline.load_data = load_data
from pocl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_redirected_run_logs_plain_lines_each_once(tmp_path, tiny_pair, tiny_data):
    """stderr is a pipe (a batch job): no bar, no '\\r'; a progress line every --log-every steps, one line
    per dev evaluation and per model; the Hugging Face lines and the skipped rows once each (CI=1 also
    makes transformers propagate its records besides printing them)."""
    train = _bad_train_file(tmp_path, tiny_data)
    argv = distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--progress", "--skip-invalid-rows", "--max-steps",
                        "4", "--eval-every", "2", "--dev-rouge-samples", "2", "--dev-rouge-max-new-tokens", "6",
                        train=train)
    env = dict(subprocess_env(), CI="1")
    env.pop("POCL_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *argv], check=False, capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    err = proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert "\r" not in err and "Traceback" not in err
    for line in ("Retrying in 1s [Retry 1/5]. (hub test line)", "a transformers test line", "a datasets test line",
                 "loaded 46 rows, skipped 2 invalid rows: 000002 (line 3), bad-7 (line 7)"):
        assert err.count(line) == 1, (line, err[-3000:])
    teacher, student = tiny_pair
    for role, folder in (("teacher", teacher), ("student", student)):
        n = _parameters(folder)
        pattern = (rf"\[pocl\.models\] {role}: {re.escape(str(folder))} \(LlamaForCausalLM\): {n:,} parameters "
                   rf"\(\S+\), float32, on cpu; \d layers?, hidden size \d+, vocab \d+, context 128$")
        assert len(re.findall(pattern, err, re.MULTILINE)) == 1, err[-3000:]
    assert "swapped" not in err
    assert [int(m.group(1)) for m in STEP_LINE.finditer(err)] == [1, 2, 3]  # --log-every 1; step 4: the final line
    assert len(re.findall(r"^\[pocl\.train\] distill: done 4/4 steps \(100%\) in \d+:\d\d", err, re.MULTILINE)) == 1
    dev = list(DEV_LINE.finditer(err))
    assert [int(m.group(1)) for m in dev] == [2, 4] and all(m.group(4) for m in dev)
    assert dev[0].group(5).startswith("new best dev_rouge_l")


@pytest.mark.parametrize("env_mode,flag", [("bar", "--no-progress"), ("log", "--progress"), (None, "--progress")])
def test_without_a_bar_every_log_every_steps_and_every_dev_evaluation_is_a_line(env_mode, flag, tmp_path, tiny_pair,
                                                                               tiny_data, capsys, monkeypatch):
    """--no-progress turns the bar off, not the log, even on a terminal (POCL_PROGRESS=bar); a stderr that
    is not a terminal gets the same lines. The dev lines carry the values of metrics.jsonl."""
    if env_mode is None:
        monkeypatch.delenv("POCL_PROGRESS", raising=False)  # capsys: stderr is not a terminal
    else:
        monkeypatch.setenv("POCL_PROGRESS", env_mode)
    out = tmp_path / "run"
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out, flag, "--max-steps", "6", "--log-every", "2",
                                        "--eval-every", "2", "--selection-metric", "dev_ce"), capsys)
    assert code == 0, err[-2000:]
    assert "\r" not in err
    assert [int(m.group(1)) for m in STEP_LINE.finditer(err)] == [2, 4]
    assert "distill: done 6/6 steps" in err
    dev = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "dev"]
    lines = list(DEV_LINE.finditer(err))
    assert [int(m.group(1)) for m in lines] == [r["step"] for r in dev] == [2, 4, 6]
    for m, r in zip(lines, dev):
        assert (m.group(2), m.group(3)) == (f"{r['dev_ce']:.4f}", f"{r['dev_loss']:.4f}")
        assert m.group(4) is None  # no dev ROUGE-L with --selection-metric dev_ce
    summary = json.loads((out / "summary.json").read_text())
    best = [m for m in lines if m.group(5).startswith("new best")]
    assert best and int(best[-1].group(1)) == summary["best_step"]


def test_on_a_terminal_the_bar_is_drawn_and_dev_lines_still_appear_once(tmp_path, tiny_pair, tiny_data, capsys,
                                                                         monkeypatch):
    monkeypatch.setenv("POCL_PROGRESS", "bar")
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--progress", "--max-steps", "4",
                                        "--eval-every", "2", "--selection-metric", "dev_ce"), capsys)
    assert code == 0, err[-2000:]
    assert "\rdistill: 100%" in err and "4/4" in err  # tqdm's bar
    lines = err.replace("\r", "\n")  # tqdm.write clears the bar ('\r'), prints the line, redraws the bar
    assert not STEP_LINE.search(lines)  # no plain lines besides the bar
    assert [int(m.group(1)) for m in DEV_LINE.finditer(lines)] == [2, 4]
    assert lines.count("'kd': dev_ce") == 2


def test_a_teacher_smaller_than_its_student_is_pointed_out(tmp_path, tiny_pair, tiny_data, capsys):
    teacher, student = tiny_pair
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--max-steps", "1",
                                        "--selection-metric", "dev_ce", teacher=student, student=teacher), capsys)
    assert code == 0, err[-2000:]
    nt, ns = _parameters(student), _parameters(teacher)
    assert f"teacher: {student} (LlamaForCausalLM): {nt:,} parameters" in err
    assert f"student: {teacher} (LlamaForCausalLM): {ns:,} parameters" in err
    warning = [line for line in err.splitlines() if "swapped" in line]
    assert len(warning) == 1 and re.search(
        r"the teacher has fewer parameters than the student \(\S+ < \S+: teacher .*student\b.*\); are --teacher "
        r"and --student swapped\?", warning[0]), warning
