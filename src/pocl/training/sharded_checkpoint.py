"""The sharded part of an fsdp2 checkpoint: the student's weights and AdamW state written by every
process through ``torch.distributed.checkpoint`` (DCP), into ``checkpoints/step-N/sharded/``.

DCP stores each shard with the offsets it covers, so a checkpoint written by N processes loads into
a run of M processes (resharding), and into a single process without any process group. The keys are
those of the loss module (``student.model.layers.0...``), the same whether sharded or not.

Atomicity is the checkpoint folder's (:func:`pocl.training.run_store.RunStore.save_checkpoint`): every
process writes into a hidden staging folder, which the main process moves into the checkpoint's
temporary folder before the manifest (sizes and sha256 of every shard file) is written and the folder
is renamed into place.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from pocl.errors import CheckpointError

__all__ = ["SHARDED_DIR", "load_model", "load_optimizer", "save"]

#: The DCP folder inside a checkpoint.
SHARDED_DIR = "sharded"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _checkpoint_id(folder: Path) -> str:
    return str(folder)


def save(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> bool:
    """Write ``module``'s weights and, when it holds any, ``optimizer``'s state into ``folder`` (every
    process calls it with the same folder). Returns whether the optimizer state was written (an
    optimizer that never stepped has none; DCP would invent one by stepping it with zero gradients)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(module)}
    with_optimizer = bool(optimizer.state)
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(module, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=_checkpoint_id(folder))
    return with_optimizer


def load_model(module: nn.Module, folder: Path) -> None:
    """Load the weights of the DCP checkpoint ``folder`` into ``module`` (sharded or whole, any number
    of processes); CheckpointError naming the folder when they do not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(module)}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=_checkpoint_id(folder))
    except Exception as exc:  # DCP raises CheckpointException, RuntimeError or KeyError by case
        raise CheckpointError(f"{folder}: the sharded weights do not fit the student: {exc}") from exc
    set_model_state_dict(module, state["model"])


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> bool:
    """Load the optimizer state of the DCP checkpoint ``folder`` into ``optimizer``; False when the
    checkpoint holds none (the optimizer is left as it is: empty)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    with _quiet_single_process():
        metadata = dcp.FileSystemReader(_checkpoint_id(folder)).read_metadata()
    if not any(key.startswith("optimizer.") for key in metadata.state_dict_metadata):
        return False
    state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=_checkpoint_id(folder))
    except Exception as exc:
        raise CheckpointError(f"{folder}: the sharded optimizer state does not fit the student: {exc}") from exc
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
    return True
