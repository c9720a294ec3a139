"""Starting several data-parallel processes for ``--num-processes N``.

pocl does not implement distribution itself: every process runs the same command under Hugging
Face accelerate, which wraps the student in DDP (or FSDP/DeepSpeed with an accelerate config). This
module only starts the processes: ``accelerate launch`` on GPUs, ``torchrun`` (gloo backend) on CPU
(accelerate's own CPU launcher needs MPI).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from pocl.errors import ConfigError

log = logging.getLogger("pocl.launch")


def world_size_from_env() -> int | None:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def launch_command(argv: list[str], num_processes: int, *, cpu: bool) -> list[str]:
    if torch.cuda.is_available() and not cpu:
        if torch.cuda.device_count() < num_processes:
            raise ConfigError(f"train.num_processes: {num_processes} processes need {num_processes} GPUs, "
                              f"found {torch.cuda.device_count()}")
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(num_processes), "-m", "pocl", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "-m", "pocl", *argv]


def maybe_relaunch(argv: list[str], num_processes: int, *, cpu: bool) -> int | None:
    """Start ``num_processes`` copies of this command and wait for them; return their exit code.

    Returns None when this process should do the work itself (one process, or already launched).
    """
    world = world_size_from_env()
    if world is not None:
        if num_processes > 1 and world != num_processes:
            raise ConfigError(f"train.num_processes is {num_processes} but this process was launched with "
                              f"WORLD_SIZE={world}")
        return None
    if num_processes <= 1:
        return None
    cmd = launch_command(argv, num_processes, cpu=cpu)
    log.info("launching %d processes: %s", num_processes, " ".join(cmd))
    return subprocess.call(cmd)


def mixed_precision_for(setting: str, cpu: bool) -> str:
    """accelerate's ``mixed_precision`` for ``model.mixed_precision``: ``auto`` is bf16 (or fp16) on a GPU and
    ``no`` on CPU, where the trainer decides once it knows the student (:func:`cpu_auto_bf16`)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


#: The narrowest student for which ``model.mixed_precision: auto`` autocasts to bfloat16 on a CPU with native
#: bfloat16 arithmetic. Measured (benchmarks/results/cpu_mixed_precision.json, pocl's training step, AVX512-BF16
#: CPU): hidden 96 (the built-in default) x0.93 of float32's speed, hidden 256 x1.79, hidden 576 x1.47.
CPU_BF16_MIN_HIDDEN = 256


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it autocast only adds casts."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def cpu_auto_bf16(setting: str, accelerator, student) -> tuple[bool, str]:
    """``(use bf16 autocast, why)`` for a run on CPU whose ``model.mixed_precision`` is ``setting``: only
    ``auto`` on a CPU with native bfloat16 and a student at least :data:`CPU_BF16_MIN_HIDDEN` wide (the
    sizes where it measured faster). A GPU run, or an explicit setting, is accelerate's business."""
    if setting != "auto" or accelerator.device.type != "cpu":
        return False, ""
    width = getattr(getattr(student, "config", None), "hidden_size", None)
    if not cpu_has_native_bf16():
        return False, "float32 (auto: this CPU has no native bfloat16)"
    if not isinstance(width, int) or width < CPU_BF16_MIN_HIDDEN:
        return False, (f"float32 (auto: the student is {width} wide; bfloat16 was measured faster on CPU only from "
                       f"{CPU_BF16_MIN_HIDDEN})")
    return True, (f"bfloat16 autocast for the model passes, float32 weights and loss (auto: native bfloat16 CPU, "
                  f"student {width} wide; --mixed-precision no for float32)")


def refuse_accelerate_sharding(env=os.environ) -> None:
    """ConfigError when ``accelerate launch`` was given an FSDP or DeepSpeed config (it says so in the
    environment), before accelerate tries to set it up: pocl shards with its own FSDP2 (``--parallelism
    fsdp2``); DeepSpeed is not supported, and needs GPUs in any case."""
    fsdp2 = ("use pocl's own FSDP2 instead: --parallelism fsdp2 with --num-processes N (or accelerate launch "
             "--multi_gpu without an FSDP or DeepSpeed config); see docs/distributed.md")
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        gpu = "" if torch.cuda.is_available() else " (and DeepSpeed ZeRO needs CUDA GPUs: this machine has none)"
        raise ConfigError(f"DeepSpeed through accelerate is not supported by this version of pocl{gpu}: {fsdp2}")
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(f"accelerate's FSDP config is not supported by this version of pocl: {fsdp2}")


def make_accelerator(config):
    """The run's :class:`accelerate.Accelerator`. On a machine without CUDA it must be told
    ``cpu=True``: otherwise accelerate does not set up the gloo process group under torchrun and
    every process would silently train alone. An accelerate FSDP or DeepSpeed config is refused
    (:func:`refuse_accelerate_sharding`), and so is a ``train.report_to`` tracker whose package is missing
    (ConfigError naming the pip extra, before any model is trained). The trackers themselves are accelerate's
    tracker classes, started by :mod:`pocl.training.trackers` when training starts (not ``log_with``: see there)."""
    refuse_accelerate_sharding()
    from accelerate import Accelerator

    from pocl.training.trackers import check_available, effective_trackers

    check_available(effective_trackers(config.train))

    cpu = config.model.cpu or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision_for(config.model.mixed_precision, cpu))


def distributed_state():
    """accelerate's process state (rank, world size, barriers) for code that runs outside the trainer."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
