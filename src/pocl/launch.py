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
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(config):
    """The run's :class:`accelerate.Accelerator`. On a machine without CUDA it must be told
    ``cpu=True``: otherwise accelerate does not set up the gloo process group under torchrun and
    every process would silently train alone."""
    from accelerate import Accelerator

    cpu = config.model.cpu or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision_for(config.model.mixed_precision, cpu))


def distributed_state():
    """accelerate's process state (rank, world size, barriers) for code that runs outside the trainer."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
