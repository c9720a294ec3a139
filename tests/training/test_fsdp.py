"""FSDP2 on CPU: two gloo processes with the student sharded (``--parallelism fsdp2``) against one
process holding it whole, for the 2-stage POCL run of test_distributed; sharded checkpoints killed and
resumed, resharded 2 -> 1 and 1 -> 2, and killed in the middle of a sharded save."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from pocl.training import checkpoint as ckpt
from tests.training.test_distributed import _command, _losses, _weights, kill_tree

pytestmark = pytest.mark.slow

FSDP = ("--parallelism", "fsdp2")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)


def _assert_same_model(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)  # reduction order, through Adam


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_pair, tiny_data):
    """The reference: one process, the student whole (DDP's single-process path)."""
    out = tmp_path_factory.mktemp("fsdp") / "one"
    proc = _run(_command(tiny_pair, tiny_data, out, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _killed_after(cmd, out, step):
    """Start ``cmd`` and SIGKILL it once the checkpoint of ``step`` exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / ckpt.step_dir_name(step)).exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_tree(proc)
    assert not (out / "final").exists()


def test_two_sharded_processes_match_one_whole(tmp_path, tiny_pair, tiny_data, single_run):
    out = tmp_path / "fsdp2"
    proc = _run(_command(tiny_pair, tiny_data, out, 2, *FSDP, "--save-every", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 decoder layers and the root sharded over 2 processes" in proc.stderr
    # the teacher (2 layers, 32 wide) is larger than the student (1 layer, 16 wide): auto shards it, and the
    # training-data cache is built from it sharded (inside the gathered context)
    assert "the teacher's 2 decoder layers sharded over 2 processes (train.teacher_sharding auto" in proc.stderr
    one, two = _losses(single_run), _losses(out)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert [l for _, l in two] == pytest.approx([l for _, l in one], rel=1e-4, abs=1e-6)
    _assert_same_model(single_run / "final", out / "final")
    # final/ and best/ are plain Hugging Face folders, loadable without pocl or torch.distributed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "best" / "model.safetensors").is_file()
    # the checkpoints are sharded: one DCP file per process, listed in the manifest with checksums
    folder = ckpt.latest_valid_checkpoint(out / "checkpoints")
    shards = sorted(p.name for p in (folder / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= set(manifest["files"])
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer.pt").exists()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["sharded"] == {"folder": "sharded", "optimizer": True}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # the ranking pass (before sharding, split by process and gathered in id order) is the one-process ranking
    rank1 = [json.loads(line) for line in (single_run / "ranking.jsonl").read_text().splitlines()]
    rank2 = [json.loads(line) for line in (out / "ranking.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rank1] == [r["id"] for r in rank2]
    assert [r["loss"] for r in rank2] == pytest.approx([r["loss"] for r in rank1], rel=1e-5)


@pytest.mark.parametrize(("teacher_cache", "teacher_sharding"), [("off", "sharded"), ("hidden", "whole")])
def test_the_teacher_sharded_or_whole_gives_the_same_model(tmp_path, tiny_pair, tiny_data, single_run,
                                                           teacher_cache, teacher_sharding):
    """The live teacher, sharded, in every training step and dev evaluation (no cache); and the teacher
    whole on every process with the cache built from it: the one-process model either way."""
    out = tmp_path / "run"
    proc = _run(_command(tiny_pair, tiny_data, out, 2, *FSDP, "--teacher-cache", teacher_cache,
                         "--teacher-sharding", teacher_sharding))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if teacher_sharding == "sharded":
        assert "the teacher's 2 decoder layers sharded over 2 processes" in proc.stderr
    else:
        assert "is whole on every process (train.teacher_sharding whole)" in proc.stderr
    assert [l for _, l in _losses(out)] == pytest.approx([l for _, l in _losses(single_run)], rel=1e-4, abs=1e-6)
    _assert_same_model(single_run / "final", out / "final")


@pytest.mark.parametrize(("first", "second"), [(2, 2), (2, 1), (1, 2)], ids=["same", "2to1", "1to2"])
def test_killed_sharded_run_resumes_to_the_uninterrupted_model(tmp_path, tiny_pair, tiny_data, single_run,
                                                               first, second):
    """SIGKILL after the checkpoint of step 5 (inside stage 2: sharded AdamW moments and the schedule
    continue), resume with the same or another number of processes: the model of the uninterrupted run."""
    out = tmp_path / "run"
    extra = (*FSDP, "--save-every", "1", "--save-total-limit", "20")
    _killed_after(_command(tiny_pair, tiny_data, out, first, *extra), out, 5)
    resumed = _run(_command(tiny_pair, tiny_data, out, second, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    if first != second:
        assert f"written by {first} processes, with {second}" in resumed.stderr
    _assert_same_model(single_run / "final", out / "final")
    state = json.loads((ckpt.latest_valid_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    assert state["num_processes"] == second


_KILL_DURING_SAVE = """
import os, signal, sys
import pocl.training.sharded_checkpoint as sharded
from pocl.cli import main

calls = []
original = sharded.save

def save(module, optimizer, folder):
    written = original(module, optimizer, folder)
    calls.append(folder)
    if len(calls) == 3 and int(os.environ["RANK"]) == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # the shards of step 3 are written, the checkpoint not yet
    return written

sharded.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, tiny_pair, tiny_data, single_run):
    out = tmp_path / "run"
    script = tmp_path / "kill_during_save.py"
    script.write_text(_KILL_DURING_SAVE)
    argv = _command(tiny_pair, tiny_data, out, 2, *FSDP, "--save-every", "1", "--save-total-limit", "20")[3:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              *argv]
    killed = _run(launch)
    assert killed.returncode != 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-shards-step-00000003", "step-00000001", "step-00000002"]  # staging left by the kill
    assert ckpt.latest_valid_checkpoint(out / "checkpoints").name == "step-00000002"
    resumed = _run(_command(tiny_pair, tiny_data, out, 2, *FSDP, "--save-every", "1", "--save-total-limit", "20"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-00000002" in resumed.stderr
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    _assert_same_model(single_run / "final", out / "final")


def test_a_replicated_checkpoint_does_not_reshard(tmp_path, tiny_pair, tiny_data):
    """A DDP checkpoint holds one process's optimizer view and per-process random streams: changing the
    number of processes is refused with a message that says which checkpoints can."""
    out = tmp_path / "ddp"
    _killed_after(_command(tiny_pair, tiny_data, out, 1, "--save-every", "1"), out, 2)
    proc = _run(_command(tiny_pair, tiny_data, out, 2, "--save-every", "1"))
    assert proc.returncode != 0
    assert "number of processes: 1 -> 2 (only --parallelism fsdp2 checkpoints reshard)" in proc.stderr


def test_on_policy_generation_under_fsdp2_equals_ddp(tmp_path, tiny_pair, tiny_data):
    """GKD steps generate from the gathered student on each process independently (different lengths,
    different prompts) and then train the sharded student: the model of the same 2-process DDP run."""
    teacher, student = tiny_pair
    runs = {}
    for parallelism in ("ddp", "fsdp2"):
        out = tmp_path / parallelism
        proc = _run([sys.executable, "-m", "pocl", "distill", "--teacher", str(teacher), "--student", str(student),
                     "--train-file", str(tiny_data[0]), "--max-length", "48", "--max-prompt-length", "32",
                     "--batch-size", "8", "--micro-batch-size", "2", "--epochs", "1", "--alpha", "1",
                     "--no-progress", "--no-tensorboard", "--on-policy-fraction", "0.5", "--on-policy-max-new-tokens",
                     "4", "--replay-buffer-size", "16", "--output-dir", str(out), "--num-processes", "2",
                     "--parallelism", parallelism])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[parallelism] = (out, json.loads((out / "summary.json").read_text()))
    (ddp, s_ddp), (fsdp, s_fsdp) = runs["ddp"], runs["fsdp2"]
    assert s_fsdp["on_policy_steps"] == s_ddp["on_policy_steps"] > 0
    assert [l for _, l in _losses(fsdp)] == pytest.approx([l for _, l in _losses(ddp)], rel=1e-4, abs=1e-6)
    _assert_same_model(ddp / "final", fsdp / "final")
