"""Interruptions of a real `python -m pocl distill` process (a 2-stage POCL run of the tiny models):
SIGTERM saves a checkpoint and exits with 130; SIGKILL at seeded points (during the ranking pass, a
training step, a checkpoint write, a dev evaluation, the write of best/ and of final/) leaves the last
complete checkpoint intact; every run resumes, and the end result equals the uninterrupted run's
exactly (final/ and best/ weights, ranking file, logged steps and losses)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pocl.training import checkpoint as ckpt
from pocl.training.metrics import read_metrics
from tests.reliability.helpers import (TINY_FLAGS, assert_same_weights, pocl_command, run_pocl, subprocess_env)

# 48 samples ranked in 12 + 12 batches; stage 1: 24 samples x 2 epochs = 6 steps, stage 2: 48 x 2 = 12 steps;
# a checkpoint every 2 steps, a dev evaluation (loss and ROUGE-L of 4 generated answers) every 3.
RUN_FLAGS = ["--curriculum", "pocl", "--num-stages", "2", "--stage-epochs", "2", "--rank-max-new-tokens", "8",
             "--rank-batch-size", "4", "--save-every", "2", "--save-total-limit", "3", "--eval-every", "3",
             "--eval-batch-size", "4", "--dev-rouge-samples", "4", "--dev-rouge-max-new-tokens", "8",
             # best/ by dev CE, which falls at nearly every evaluation of these tiny models, so that best/ is
             # written again after each resume and the "best/ write" kill point is reached (dev ROUGE-L of
             # 4 answers of 8 tokens stalls; it is still generated, for the "dev evaluation" kill point)
             "--selection-metric", "dev_ce"]
TOTAL_STEPS = 18
RANK_BATCHES = 24
KILL_SEED = 2024


def _argv(tiny_pair, tiny_data, out: Path) -> list[str]:
    teacher, student = tiny_pair
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--train-file", str(tiny_data[0]),
            "--dev-file", str(tiny_data[1]), *TINY_FLAGS, *RUN_FLAGS, "--output-dir", str(out)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pair, tiny_data):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_pocl(_argv(tiny_pair, tiny_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _records(out: Path) -> list[dict]:
    try:
        text = (out / "metrics.jsonl").read_text()
    except OSError:
        return []
    recs = []
    for line in text.splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return recs


def _max_step(out: Path) -> int:
    return max((r["step"] for r in _records(out)), default=0)


def _names(folder: Path, prefix: str) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.name.startswith(prefix)}
    except OSError:
        return set()


def _partial_batches(out: Path) -> int:
    try:
        return max(0, (out / "ranking.partial.jsonl").read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def _same_result(reference: Path, out: Path) -> None:
    assert_same_weights(reference / "final", out / "final")
    assert_same_weights(reference / "best", out / "best")
    assert (out / "ranking.jsonl").read_bytes() == (reference / "ranking.jsonl").read_bytes()
    keys = ("split", "step", "stage", "loss", "ce", "kd", "grad_norm", "lr", "dev_ce", "dev_kd", "dev_rouge_l")

    def rows(path):
        return [tuple(r.get(k) for k in keys) for r in read_metrics(path / "metrics.jsonl")]

    assert rows(out) == rows(reference)  # no step lost or logged twice, the same numbers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_steps"] == TOTAL_STEPS


class Run:
    """One `pocl distill` process in its own session (as a terminal job), output kept in log files."""

    def __init__(self, argv: list[str], logs: Path, index: int):
        self.stdout = logs / f"run{index}.out"
        self.stderr = logs / f"run{index}.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(pocl_command(argv), stdout=out, stderr=err, start_new_session=True,
                                         env=subprocess_env())

    def wait_until(self, condition, timeout: float = 240) -> bool:
        """Poll ``condition`` every 2 ms; False when the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(0.002)
        return True

    def signal(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=240)

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_the_same(tmp_path, tiny_pair, tiny_data, reference):
    out = tmp_path / "run"
    argv = _argv(tiny_pair, tiny_data, out)
    run = Run(argv, tmp_path, 0)
    assert run.wait_until(lambda: any(r["split"] == "train" and r["step"] >= 8 for r in _records(out)))
    code = run.signal(signal.SIGTERM)
    err = run.err()
    assert code == 130, err[-3000:]
    assert "received SIGTERM: finishing the current step, saving a checkpoint and exiting" in err
    assert "interrupted: run the same command again to resume" in run.stdout.read_text()
    step = json.loads((out / "summary.json").read_text())["global_steps"]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    newest = ckpt.latest_valid_checkpoint(out / "checkpoints")
    assert newest is not None and newest.name == ckpt.step_dir_name(step)  # saved at the step it stopped
    assert not (out / "final").exists()
    resumed = run_pocl(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / ckpt.step_dir_name(step)}" in resumed.stderr
    _same_result(reference, out)


def _check_after_kill(out: Path) -> dict:
    """What a SIGKILL left: the newest checkpoint is complete, best/ is complete (or restorable)."""
    seen = {"ranking_written": (out / "ranking.jsonl").exists(), "partial_batches": _partial_batches(out),
            "temporaries": sorted(_names(out / "checkpoints", ".tmp-") | _names(out, ".tmp-") | _names(out, ".old-")),
            "last_logged_step": _max_step(out), "final": (out / "final").exists()}
    named = ckpt.list_checkpoints(out / "checkpoints")
    if named:
        ckpt.verify_folder(named[0][1])  # the newest complete checkpoint is intact
        seen["newest_checkpoint"] = named[0][0]
    if (out / "best").exists():
        ckpt.verify_folder(out / "best")
    else:
        assert seen["newest_checkpoint"] if named else True
    return seen


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_resume_ends_the_same(tmp_path, tiny_pair, tiny_data, reference):
    rng = random.Random(KILL_SEED)
    out = tmp_path / "run"
    argv = _argv(tiny_pair, tiny_data, out)
    plan = ["ranking", "training step", "checkpoint write", "best/ write", "dev evaluation", "final/ write"]
    report, index, attempts = [], 0, {}
    while plan:
        point = plan.pop(0)
        index += 1
        start_step = _max_step(out)
        stale = _names(out / "checkpoints", ".tmp-") | _names(out, ".tmp-")
        had_checkpoint = ckpt.latest_valid_checkpoint(out / "checkpoints")
        run = Run(argv, tmp_path, index)
        detail = ""
        if point == "ranking":
            k = rng.randint(4, RANK_BATCHES - 4)
            detail = f"once {k} of the {RANK_BATCHES} ranking batches were kept"
            reached = run.wait_until(lambda: _partial_batches(out) >= k)
        elif point == "training step":
            # after an odd step that is not a multiple of 3 nothing is saved or evaluated: the next
            # thing the process does is the next step's forward and backward passes
            target = rng.choice([s for s in range(start_step + 1, TOTAL_STEPS) if s % 2 and s % 3])
            delay = rng.uniform(0.0, 0.003)
            detail = f"{delay * 1000:.1f} ms after step {target} was logged (inside step {target + 1})"
            reached = run.wait_until(lambda: _max_step(out) >= target)
            time.sleep(delay)
        elif point in ("checkpoint write", "best/ write", "final/ write"):
            folder, prefix = {"checkpoint write": (out / "checkpoints", ".tmp-step-"),
                              "best/ write": (out, ".tmp-best-"), "final/ write": (out, ".tmp-final-")}[point]
            reached = run.wait_until(lambda: bool(_names(folder, prefix) - stale))
            detail = "as soon as a new " + prefix + "* folder appeared"
        else:  # dev evaluation: the step is logged, its dev line is not yet
            target = next(s for s in range(start_step + 1, TOTAL_STEPS + 1) if s % 3 == 0)
            detail = f"after step {target} was logged, before its dev evaluation was"
            reached = run.wait_until(lambda: any(r["split"] == "train" and r["step"] == target for r in _records(out)))
        if not reached:
            pytest.fail(f"the run ended before the kill point '{point}' ({detail}):\n{run.err()[-3000:]}")
        code = run.signal(signal.SIGKILL)
        assert code == -signal.SIGKILL
        seen = _check_after_kill(out)
        landed = {"ranking": not seen["ranking_written"] and seen["partial_batches"] >= 1,
                  "checkpoint write": any(".tmp-step-" in t for t in seen["temporaries"]),
                  "best/ write": any(".tmp-best-" in t or ".old-best-" in t for t in seen["temporaries"]),
                  "final/ write": not seen["final"],
                  "dev evaluation": not any(r["split"] == "dev" and r["step"] == target for r in _records(out))
                  if point == "dev evaluation" else True,
                  "training step": seen["last_logged_step"] == target and not seen["temporaries"]
                  if point == "training step" else True}[point]
        report.append({"point": point, "detail": detail, "landed": landed, **seen})
        if point == "ranking":
            detail += f" ({seen['partial_batches']} in the partial file at the kill)"
            report[-1]["detail"] = detail
        if had_checkpoint is not None:  # this run started from the checkpoint the previous kill left
            assert f"resuming from {had_checkpoint}" in run.err(), run.err()[-3000:]
        if not landed:  # the write (or evaluation) finished before the signal: try this point again
            attempts[point] = attempts.get(point, 0) + 1
            assert attempts[point] < 3, report
            plan.insert(0, point)
        if index > 1:
            previous = (tmp_path / f"run{index}.err").read_text(errors="replace")
            assert "Traceback" not in previous
    final = run_pocl(argv)
    assert final.returncode == 0, final.stderr[-3000:]
    (tmp_path / "kill_report.json").write_text(json.dumps(report, indent=1))
    print("\nSIGKILL points (seed %d):" % KILL_SEED)
    for r in report:
        print(f"  {r['point']:<16} {r['detail']:<58} landed={r['landed']} newest checkpoint="
              f"{r.get('newest_checkpoint')} last logged step={r['last_logged_step']} leftovers={r['temporaries']}")
    assert "resuming an interrupted measurement" in (tmp_path / "run2.err").read_text()  # ranking went on
    assert "resuming from" in final.stderr
    _same_result(reference, out)


# ------------------------------------------------------------------------------- Ctrl-C, in process
def _signal_at_step(monkeypatch, step: int, times: int):
    from pocl.training.trainer import DistillTrainer

    real_init = DistillTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def press(trainer):
            if trainer.state.global_step == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)  # let the handler run

        self.step_callbacks.append(press)

    monkeypatch.setattr(DistillTrainer, "__init__", init)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    from tests.reliability.helpers import distill_argv, run_cli

    out = tmp_path / "run"
    _signal_at_step(monkeypatch, 3, times=1)
    # what was installed before (default_int_handler, or SIG_IGN when pytest runs as a background job)
    before = signal.getsignal(signal.SIGINT)
    code, stdout, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1"), capsys)
    assert code == 130 and "received SIGINT: finishing the current step, saving a checkpoint and exiting" in err
    assert "status: interrupted; 3 optimizer steps" in stdout
    assert ckpt.latest_valid_checkpoint(out / "checkpoints").name == ckpt.step_dir_name(3)
    assert not (out / "final").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, tiny_pair, tiny_data, capsys,
                                                                     monkeypatch):
    from tests.reliability.helpers import distill_argv, run_cli

    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", "--save-every", "2")
    _signal_at_step(monkeypatch, 3, times=2)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and "pocl: interrupted" in err and "Traceback" not in err
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]  # nothing saved at step 3
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and f"resuming from {out / 'checkpoints' / 'step-00000002'}" in err
    assert (out / "final" / "model.safetensors").exists()
