"""The student's loss: the module DDP wraps, the loss each method trains, and the micro-batch helpers.

One optimizer step consumes one *window* of ``batch_size`` samples (over all processes), split into
micro-batches. The loss of every micro-batch is its token sum divided by the number of response
tokens in the whole window, so the accumulated gradient equals the gradient of the token mean over
the window, however the window is split (across micro-batches and processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pocl.data import TokenizedSample, collate
from pocl.errors import ConfigError
from pocl.losses import (
    KDLossOutput,
    auto_chunk_size,
    chunked_kd_loss_from_logits,
    fused_kd_loss,
    make_divergence,
    select_response_tokens,
)
from pocl.losses.kernels import has_kernel, set_compile_mode, uses_compiled_kernels
from pocl.models import LMHead, hidden_states
from pocl.training.stages import Stage, check_stages
from pocl.training.taid import TaidSchedule
from pocl.training.teacher_signal import TeacherSide, to_device

log = logging.getLogger("pocl.train")

__all__ = ["SEQKD_ORIGIN", "Divergences", "StudentLoss", "batch_on", "build_student_loss", "divergence_sum_fn",
           "eval_mode", "length_batches", "loss_weights", "method_stages", "reduce_sum"]

#: ``TokenizedDataset.origin`` of SeqKD training data (the teacher's answers; see pocl.baselines).
SEQKD_ORIGIN = "seqkd-teacher"


def method_stages(config, stages: Sequence[Stage], *, train_data, has_teacher: bool) -> list[Stage]:
    """The stages as ``config.loss.method`` trains them: the CE-only baselines (pocl.baselines) get
    alpha 0 in every stage (the teacher is never evaluated). Refuses (ConfigError) invalid stages,
    seqkd data that are not the teacher's answers, and a KD stage without a teacher."""
    check_stages(stages)
    if config.loss.method == "taid" and any(s.temperature != 1.0 for s in stages):
        # TAID has no temperature: a curriculum's rising T is not applied (its alpha schedule is).
        log.info("loss.method taid: the stages' temperatures are set to 1 (TAID has no temperature)")
        stages = [dataclasses.replace(s, temperature=1.0) for s in stages]
    if not config.loss.distills:
        stages = [dataclasses.replace(s, alpha=0.0) for s in stages]
        if config.loss.method == "seqkd" and getattr(train_data, "origin", None) != SEQKD_ORIGIN:
            raise ConfigError("loss.method seqkd: the training data are not the teacher's answers; build them "
                              "with pocl.baselines.apply_method(config, inputs)")
    if not has_teacher and any(s.alpha > 0 for s in stages):
        raise ConfigError("a teacher is required when a stage has alpha > 0")
    return list(stages)


class StudentLoss(nn.Module):
    """Wraps the student so that the whole student-side computation (body, head, loss) runs inside
    one ``forward`` — what DDP/FSDP wrappers expect of the module they wrap."""

    def __init__(self, student: nn.Module, vocab_size: int, *, fused: bool, chunk_size: int,
                 temperature_scaling: str):
        """``fused``: the loss from hidden states through the LM head chunk by chunk (no [N, V] logits);
        ``chunk_size``: response positions per chunk; ``vocab_size``: V, the shared vocabulary."""
        super().__init__()
        self.student = student
        self.vocab_size = vocab_size
        self.fused = fused
        self.chunk_size = chunk_size
        self.temperature_scaling = temperature_scaling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                teacher: TeacherSide | None, divergence, temperature: float, alpha: float,
                normalizer: float) -> KDLossOutput:
        """``input_ids``/``attention_mask``/``labels``: [B, L]. ``teacher``: the teacher side of the
        N selected response positions (:class:`pocl.training.teacher_signal.TeacherSide`: hidden [N, H_t]
        + head, logits [N, V] or top-k), None when alpha = 0. Returns the loss (a scalar: token sums
        divided by ``normalizer``) and its CE and divergence sums over the N positions."""
        topk = None if teacher is None else teacher.topk
        opts = dict(divergence=divergence, temperature=temperature, alpha=alpha, normalizer=normalizer,
                    chunk_size=self.chunk_size, temperature_scaling=self.temperature_scaling, teacher_topk=topk)
        if self.fused:
            hidden, targets = select_response_tokens(hidden_states(self.student, input_ids, attention_mask), labels)
            head = LMHead.from_model(self.student, self.vocab_size)
            t_hidden = t_w = t_b = t_fn = None
            if teacher is not None and teacher.hidden is not None:
                t_hidden, t_w, t_b, t_fn = teacher.hidden, teacher.head.weight, teacher.head.bias, teacher.head.logit_fn
            return fused_kd_loss(hidden, head.weight, head.bias, t_hidden, t_w, t_b, targets,
                                 vocab_size=self.vocab_size, student_logit_fn=head.logit_fn, teacher_logit_fn=t_fn,
                                 **opts)
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        sel, targets = select_response_tokens(logits[..., : self.vocab_size], labels)
        t_logits = None
        if teacher is not None and teacher.topk is None:
            if teacher.logits is None:  # hidden states given to the unfused path: make the logits here
                t_logits = teacher.head.logits(teacher.hidden)
            else:
                t_logits = teacher.logits
        return chunked_kd_loss_from_logits(sel, t_logits, targets, **opts)


def build_student_loss(student: nn.Module, config, vocab_size: int, *, fused: bool,
                       device: torch.device | None = None) -> StudentLoss:
    """The student made ready to train (gradient checkpointing when configured, train mode) inside its
    :class:`StudentLoss` (chunk size: ``loss.chunk_size``, automatic when 0; the divergence kernels run as
    ``loss.kernels`` says). ``device``: where the loss will run (default: the student's), which decides
    whether the kernels are compiled and so how large an automatic chunk may be."""
    set_compile_mode(config.loss.kernels)
    if config.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        if hasattr(student.config, "use_cache"):
            student.config.use_cache = False
    student.train()
    loss = config.loss
    # The compiled kernel path (fewer temporaries per chunk, so larger chunks) needs full teacher logits.
    if device is None:
        device = next(student.parameters()).device
    kernel = (loss.teacher_cache != "topk" and not loss.teacher_signal_file
              and uses_compiled_kernels(device, torch.float32) and has_kernel(make_divergence(loss.divergence, **loss.divergence_params())))
    chunk_size = auto_chunk_size(loss.chunk_size, vocab_size, kernel=kernel)
    return StudentLoss(student, vocab_size, fused=fused, chunk_size=chunk_size,
                       temperature_scaling=config.loss.temperature_scaling)


class Divergences:
    """The divergence of each stage (``loss.divergence`` with the stage's skew), built once per setting;
    with ``loss.method taid``, TAID's at the current interpolation time (:attr:`taid`, moved after every
    optimizer step by :meth:`after_step` and kept in the training state)."""

    def __init__(self, loss_config):
        """``loss_config``: the run's :class:`pocl.config.LossConfig`."""
        self.loss_config = loss_config
        self._cache: dict[tuple, Any] = {}
        self.taid = TaidSchedule(loss_config) if loss_config.method == "taid" else None

    def for_stage(self, stage: Stage):
        """The divergence of ``stage``; None when its alpha is 0 (no KD term)."""
        if stage.alpha == 0:
            return None
        if self.taid is not None:
            return make_divergence("taid", t=self.taid.t)
        key = (self.loss_config.divergence, stage.skew)
        if key not in self._cache:
            params = self.loss_config.divergence_params(skew=stage.skew)
            self._cache[key] = make_divergence(self.loss_config.divergence, **params)
        return self._cache[key]


    def start_stage(self, state, *, first: bool) -> None:
        """A stage starts (TAID: t restarts with ``taid_scope stage``, or at the first stage); ``state``: the
        run's :class:`pocl.training.state.TrainState`, which keeps TAID's state for checkpoints."""
        if self.taid is not None:
            self.taid.start_stage(first=first)
            state.taid = self.taid.state_dict()

    def after_step(self, state, loss: float, *, stage_total: int, run_total: int) -> None:
        """TAID's update after the optimizer step just counted in ``state`` whose KD term (window token mean)
        was ``loss``; its schedule spans the stage's ``stage_total`` or the run's ``run_total`` steps."""
        if self.taid is None:
            return
        if self.taid.scope == "stage":
            self.taid.update(loss, step=state.stage_step - 1, total=stage_total)
        else:
            self.taid.update(loss, step=state.global_step - 1, total=run_total)
        state.taid = self.taid.state_dict()

    def restore(self, state) -> None:
        """TAID's state from a resumed ``state`` (a checkpoint's)."""
        if self.taid is not None and state.taid is not None:
            self.taid.load_state_dict(state.taid)


def divergence_sum_fn(module: nn.Module, autocast: Callable[[], Any], divergences: Divergences
                      ) -> Callable[[dict[str, Any], TeacherSide, Stage], tuple[float, int]]:
    """``(batch, side, stage) -> (divergence sum, tokens)``: the student's (``module``, a wrapped
    :class:`StudentLoss`) divergence from the teacher ``side`` over the response tokens of ``batch``
    ([B, L] tensors on the device), at the stage's temperature and divergence, not T²-scaled; the passes
    run in ``autocast()`` (the run's precision)."""
    def divergence_sum(batch: dict[str, Any], side: TeacherSide, stage: Stage) -> tuple[float, int]:
        """(Σ divergence over the batch's N response tokens, N)."""
        with autocast():
            out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher=side,
                         divergence=divergences.for_stage(stage), temperature=stage.temperature, alpha=1.0,
                         normalizer=1.0)
        return float(out.divergence_sum), int(out.num_tokens)

    return divergence_sum


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def loss_weights(stage: Stage, normalizer: float, *, on_policy: bool, on_policy_ce: bool) -> tuple[float, float]:
    """(alpha, normalizer) the loss engine is called with for a micro-batch of ``stage``.

    On an on-policy step without CE on the student's own samples the loss is alpha * s(T) * D /
    normalizer: computed as the engine's alpha = 1 (CE weight 0) with the normaliser divided by alpha."""
    if on_policy and not on_policy_ce and stage.alpha > 0:
        return 1.0, normalizer / stage.alpha
    return stage.alpha, normalizer


def length_batches(samples: Sequence[TokenizedSample], size: int, *, sort: bool = True) -> list[list[TokenizedSample]]:
    """``samples`` in batches of ``size``; with ``sort``, stably sorted by length first (fewer pad tokens:
    a step's gradient and a dev evaluation are sums, so their order is free)."""
    if sort:
        samples = sorted(samples, key=lambda s: len(s.input_ids))
    samples = list(samples)
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def batch_on(samples: Sequence[TokenizedSample], pad_token_id: int, device) -> dict[str, Any]:
    """``samples`` collated (``input_ids``, ``attention_mask``, ``labels``: [B, L], right padded; ``ids``)
    and moved to ``device``."""
    return to_device(collate(list(samples), pad_token_id), device)


def reduce_sum(values: Sequence[float], accelerator, device) -> list[float]:
    """``values`` summed over processes (float64; no communication with one process)."""
    stats = torch.tensor(list(values), dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, reduction="sum")
    return [float(x) for x in stats.tolist()]
