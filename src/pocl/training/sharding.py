"""How the processes hold the student: whole on every process (DDP) or fully sharded (FSDP2).

``train.parallelism`` chooses; the trainer talks to the result, never to FSDP or DDP directly:

* :class:`Replicated` (``ddp``): accelerate wraps the student in DDP; every process holds the whole
  student, its gradients and its AdamW state. Checkpoints are Hugging Face folders.
* :class:`FullyShardedStudent` (``fsdp2``): PyTorch's ``fully_shard`` on every decoder layer and on the
  loss module (:class:`pocl.training.student_loss.StudentLoss`) as root. The root group holds the
  embedding, the final norm and the LM head, so the fused loss, which runs inside the root's forward,
  reads the gathered head. The student's weights, gradients and AdamW moments are DTensors split over
  the processes on dimension 0; gradients are reduce-scattered after every micro-batch, so no process
  ever holds the whole gradient. Checkpoints are sharded (:mod:`pocl.training.sharded_checkpoint`).

The teacher (``train.teacher_sharding``) stays whole on every process, or has its decoder layers sharded
the same way (its embedding, final norm and LM head stay whole: the fused loss reads the head outside any
FSDP forward). A sharded teacher runs the same number of forward passes on every process in training
steps; passes that differ between processes run inside :meth:`FullyShardedStudent.gathered`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pocl.errors import ConfigError, ModelError
from pocl.model_checks import (
    NonFiniteTensor,
    first_nonfinite_in,
    first_nonfinite_tensor,
)
from pocl.model_head import decoder_of

log = logging.getLogger("pocl.train")

__all__ = ["FullyShardedStudent", "Replicated", "decoder_layers", "make_parallelism"]


def make_parallelism(config, accelerator) -> Replicated | FullyShardedStudent:
    """The :class:`Replicated` or :class:`FullyShardedStudent` of ``config.train.parallelism``."""
    if config.train.parallelism == "fsdp2":
        if config.model.lora_r > 0:
            raise ConfigError("train.parallelism fsdp2 with model.lora_r > 0: a LoRA student trains only its small "
                              "adapters, so there is little to shard and pocl does not shard it; use --parallelism "
                              "ddp (the default)")
        return FullyShardedStudent(accelerator)
    return Replicated(accelerator)


class Replicated:
    """Every process holds the whole student (DDP through accelerate with several processes)."""

    #: checkpoints hold Hugging Face weight files (not torch.distributed.checkpoint shards)
    sharded = False

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def wrap(self, student_loss: nn.Module) -> nn.Module:
        """The module the trainer calls: ``student_loss`` in DDP (or itself with one process)."""
        return self.accelerator.prepare_model(student_loss)

    def accumulate(self, module: nn.Module, *, last: bool):
        """The context of a micro-batch's backward: no gradient all-reduce but after the window's last."""
        if self.accelerator.num_processes > 1 and not last:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (L2 over all of them); returns the norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def gathered(self) -> contextlib.AbstractContextManager:
        """The context of passes that differ between processes (dev evaluation, generation): nothing to do."""
        return contextlib.nullcontext()

    def shard_teacher(self, teacher: nn.Module | None, student: nn.Module, setting: str) -> None:
        """The teacher stays whole on every process."""

    def first_nonfinite(self, student: nn.Module) -> NonFiniteTensor | None:
        """The student's first non-finite weight (the same answer on every process), or None."""
        return first_nonfinite_tensor(student)

    def full_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor] | None:
        """The student's whole state dict for writing final/ or best/; None: the module itself is whole."""
        return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM: the modules whose class the model names in
    ``_no_split_modules`` (what must stay whole on one device, e.g. ``LlamaDecoderLayer``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelError(f"{type(model).__name__} names no decoder layer class in _no_split_modules; "
                         "train.parallelism fsdp2 shards per decoder layer and cannot find them")
    return layers


class FullyShardedStudent:
    """FSDP2 over the processes of ``accelerator``. With one process nothing is sharded, but checkpoints
    are written in the sharded format all the same, so the run can be resumed with more processes."""

    sharded = True

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.root: nn.Module | None = None  # the FSDP root once wrap() has sharded (several processes)
        # every FSDP module (student's and teacher's) -> its reshard_after_forward outside gathered()
        self._reshard_after_forward: dict[nn.Module, bool] = {}

    def _shard(self, module: nn.Module, *, reshard_after_forward: bool, **kwargs) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
        self._reshard_after_forward[module] = reshard_after_forward

    def wrap(self, student_loss: nn.Module) -> nn.Module:
        """Shard ``student_loss`` in place (every decoder layer, then the whole as root) and return it."""
        if self.world == 1:
            log.info("parallelism fsdp2 with one process: nothing to shard; checkpoints are written sharded so "
                     "that the run can resume with more processes")
            return self.accelerator.prepare_model(student_loss)  # one process: only moved to the device
        student_loss.to(self.accelerator.device)
        layers = decoder_layers(student_loss.student)
        for layer in layers:
            self._shard(layer, reshard_after_forward=True)
        # The root keeps its parameters (embedding, final norm, LM head) gathered between forward and
        # backward: they are needed again at once, and the fused loss reads the head inside the forward.
        self._shard(student_loss, reshard_after_forward=False)
        # Initialise FSDP's state from the root now: a decoder layer called first on its own (generation
        # before any training step) would otherwise take itself for the root.
        student_loss._get_fsdp_state()._lazy_init()
        self.root = student_loss
        log.info("parallelism fsdp2: %d decoder layers and the root sharded over %d processes", len(layers),
                 self.world)
        return student_loss

    def shard_teacher(self, teacher: nn.Module | None, student: nn.Module, setting: str) -> None:
        """Shard the teacher's decoder layers in place when ``setting`` (``train.teacher_sharding``) says so
        (auto: when it has more parameters than the student). Its body is the root of the layers, with its
        own weights (embedding, final norm) ignored by FSDP, so that they and the LM head stay whole."""
        if teacher is None or self.world == 1:
            return
        sizes = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
        if setting == "whole" or (setting == "auto" and sizes[0] <= sizes[1]):
            log.info("parallelism fsdp2: the teacher (%d parameters; the student %d) is whole on every process "
                     "(train.teacher_sharding %s)", sizes[0], sizes[1], setting)
            return
        layers = decoder_layers(teacher)
        for layer in layers:
            self._shard(layer, reshard_after_forward=True)
        body = decoder_of(teacher)
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        self._shard(body, reshard_after_forward=True,
                    ignored_params={p for p in body.parameters() if id(p) not in in_layers})
        body._get_fsdp_state()._lazy_init()
        log.info("parallelism fsdp2: the teacher's %d decoder layers sharded over %d processes (train."
                 "teacher_sharding %s; %d parameters, the student %d)", len(layers), self.world, setting, *sizes)

    def accumulate(self, module: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduce-scattered after every micro-batch (each process keeps only its shard of
        the accumulated gradient: FSDP's memory saving; DDP's no_sync would keep the whole one)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> float:
        """Clip the sharded gradients to ``max_norm`` (the norm over every shard of every process)."""
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every FSDP group (the student's, a sharded teacher's) gathered for the block and kept so after
        each forward.

        Dev evaluation, generation and the teacher cache's build run a different number of forward passes on each process (their
        own share of the dev set, sequences that end at different lengths); FSDP's per-layer all-gathers
        would then not match across processes and wait forever. Gathered once, the passes need no
        communication. The cost: the whole models' weights on every process for the block's duration."""
        groups = list(self._reshard_after_forward)
        for m in groups:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in groups:
                m.set_reshard_after_forward(self._reshard_after_forward[m], recurse=False)
                m.reshard()

    def first_nonfinite(self, student: nn.Module) -> NonFiniteTensor | None:
        """The student's first non-finite weight over all shards (a collective: every process gets the
        same answer), or None."""
        if self.root is None:
            return first_nonfinite_tensor(student)
        named = [(name, _local(t)) for name, t in [*student.named_parameters(), *student.named_buffers()]]
        index = {name: i for i, (name, _) in enumerate(named)}
        found = first_nonfinite_in(named)
        from accelerate.utils import gather_object

        reports = [r for r in gather_object([None if found is None else found.to_dict()]) if r is not None]
        if not reports:
            return None
        name = min((r["tensor"] for r in reports), key=index.__getitem__)
        same = [r for r in reports if r["tensor"] == name]
        numel = dict(student.named_parameters()).get(name)
        return NonFiniteTensor(name, sum(r["nan"] for r in same), sum(r["inf"] for r in same),
                               numel.numel() if numel is not None else sum(r["numel"] for r in same))

    def full_state_dict(self, student: nn.Module) -> dict[str, Any] | None:
        """The student's whole state dict on the main process, in CPU memory (a collective: every process
        calls it; the others get an empty dict). None with one process (the module itself is whole)."""
        if self.root is None:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Gathered separately, tied weights (embedding = LM head) arrive as two tensors, which save_pretrained
        # would write twice; keep the first name of each, as save_pretrained does for the whole model.
        names: dict[int, list[str]] = {}
        for name, param in student.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        tied = {name for group in names.values() for name in group[1:]}
        return {k: v for k, v in full.items() if k not in tied}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a plain tensor is its own shard)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
