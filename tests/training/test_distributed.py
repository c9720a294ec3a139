"""Data parallelism on CPU: two processes (torchrun, gloo) against one process with the same
global batch, for a 2-stage POCL run of tiny models."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from pocl.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _command(tiny_pair, tiny_data, out, processes, *extra):
    teacher, student = tiny_pair
    return [sys.executable, "-m", "pocl", "distill", "--teacher", str(teacher), "--student", str(student),
            "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]), "--max-length", "48",
            "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2",
            "--alpha", "0.5", "--no-progress", "--no-tensorboard", "--log-every", "1", "--curriculum", "pocl",
            "--num-stages", "2", "--stage-epochs", "1", "--rank-max-new-tokens", "6", "--rank-batch-size", "5",
            "--output-dir", str(out), "--num-processes", str(processes), *extra]


def _cli(tiny_pair, tiny_data, out, processes, *extra):
    return subprocess.run(_command(tiny_pair, tiny_data, out, processes, *extra), capture_output=True, text=True,
                          timeout=600)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def kill_tree(proc):
    """SIGKILL a launcher and all its workers. torchrun starts each worker in a session of its own:
    killing the launcher's process group would leave them running (and finishing the run); stop the
    whole tree, then kill it."""
    import psutil

    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    proc.wait()
    psutil.wait_procs(tree, timeout=60)


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_pair, tiny_data):
    out = tmp_path_factory.mktemp("dp") / "one"
    proc = _cli(tiny_pair, tiny_data, out, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_match_one(tmp_path, tiny_pair, tiny_data, single_run):
    out = tmp_path / "two"
    proc = _cli(tiny_pair, tiny_data, out, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(single_run), _losses(out)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert [l for _, l in two] == pytest.approx([l for _, l in one], rel=1e-4, abs=1e-6)  # all-reduce order
    a, b = _weights(single_run / "final"), _weights(out / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)  # reduction order, through Adam
    # the sharded ranking pass gives the same ranking as the single-process pass
    rank1 = [json.loads(l) for l in (single_run / "ranking.jsonl").read_text().splitlines()]
    rank2 = [json.loads(l) for l in (out / "ranking.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rank1] == [r["id"] for r in rank2]
    for x, y in zip(rank1, rank2):
        assert x["rouge_l"] == pytest.approx(y["rouge_l"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2  # really data parallel, not two processes each training alone
    assert [s["name"] for s in summary["stages"]] == ["stage1", "stage2"]


def test_only_one_process_writes(tmp_path, tiny_pair, tiny_data):
    out = tmp_path / "two"
    proc = _cli(tiny_pair, tiny_data, out, 2, "--save-every", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one metrics line per step (no duplicates from the second process), one checkpoint per step name
    steps = [s for s, _ in _losses(out)]
    assert steps == sorted(set(steps))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert all(n.startswith("step-") for n in names) and len(names) == 2  # save_total_limit 2


def test_resumed_two_process_run_matches_uninterrupted(tmp_path, tiny_pair, tiny_data, single_run):
    """SIGKILL both processes after the checkpoint of step 5, resume with two processes."""
    import time

    out = tmp_path / "resume"
    cmd = _command(tiny_pair, tiny_data, out, 2, "--save-every", "1", "--save-total-limit", "20")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000005").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc)
    assert not (out / "final").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = _weights(single_run / "final"), _weights(out / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)  # reduction order, through Adam


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_accelerate_sharding_is_refused_with_fsdp2_named(kind, monkeypatch):
    """accelerate's own FSDP or DeepSpeed wrapping is refused: the error names pocl's --parallelism fsdp2
    (and, for DeepSpeed on a machine without CUDA, says that it needs GPUs)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pocl.errors import ConfigError
    from pocl.pipeline import check_supported_distribution

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = ("DeepSpeed ZeRO .* needs CUDA GPUs and this machine has none" if kind == "DEEPSPEED" else
                "FSDP through accelerate is not supported by this version of pocl")
    with pytest.raises(ConfigError, match=expected) as err:
        check_supported_distribution(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    assert "--parallelism fsdp2" in str(err.value) and "docs/distributed.md" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=f"{kind} through accelerate is not supported.*--parallelism fsdp2"):
        check_supported_distribution(SimpleNamespace(distributed_type=getattr(DistributedType, kind)))
    check_supported_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP is fine
