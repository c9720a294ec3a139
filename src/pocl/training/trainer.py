"""The distillation trainer: runs a list of :class:`~pocl.training.stages.Stage` s.

One optimizer step consumes one *window* of ``batch_size`` samples (over all processes), split
into micro-batches. The loss of every micro-batch is its token sum divided by the number of
response tokens in the whole window, so the accumulated gradient equals the gradient of the token
mean over the window, however the window is split (across micro-batches and processes).

Data order is a pure function of (seed, stage, epoch): every epoch draws a fresh permutation of the
stage's samples, and the position in the run is just (stage index, optimizer steps done in the
stage). A checkpoint therefore resumes exactly where the run stopped without saving sampler state,
and the resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pocl.config import DistillConfig
from pocl.data import TokenizedDataset, TokenizedSample, collate
from pocl.errors import CheckpointError, ConfigError, PoclError
from pocl.generation import DecodingConfig
from pocl.losses import (KDLossOutput, auto_chunk_size, chunked_kd_loss_from_logits, count_target_tokens,
                         fused_kd_loss, make_divergence, select_response_tokens)
from pocl.model_checks import first_nonfinite_tensor
from pocl.models import (LMHead, hidden_states, load_training_weights, save_model_folder,
                         save_training_weights)
from pocl.training import checkpoint as ckpt
from pocl.training import onpolicy, selection
from pocl.training import teacher_cache as tcache
from pocl.training import teacher_signal as tsignal
from pocl.training.teacher_signal import TeacherSide, TeacherSignal
from pocl.training.metrics import MetricsLogger
from pocl.training.optim import build_optimizer, build_scheduler, reset_optimizer
from pocl.training.stages import Stage, check_stages
from pocl.training.summary import write_summary

log = logging.getLogger("pocl.train")


#: ``TokenizedDataset.origin`` of SeqKD training data (the teacher's answers; see pocl.baselines).
SEQKD_ORIGIN = "seqkd-teacher"


class NonFiniteLossError(PoclError):
    """Too many optimizer steps in a row had a NaN or infinite loss or gradient."""


class StudentLoss(nn.Module):
    """Wraps the student so that the whole student-side computation (body, head, loss) runs inside
    one ``forward`` — what DDP/FSDP wrappers expect of the module they wrap."""

    def __init__(self, student: nn.Module, vocab_size: int, *, fused: bool, chunk_size: int,
                 temperature_scaling: str):
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
        selected response positions (:class:`pocl.training.teacher_signal.TeacherSide`), None when
        alpha = 0."""
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


@dataclasses.dataclass
class TrainState:
    global_step: int = 0
    stage_index: int = 0
    stage_step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    # Best model and plateau (pocl.training.selection): real values of the metric named by
    # selection_metric (None in checkpoints of older versions, which stored dev ROUGE-L negated).
    best_metric: float | None = None
    best_step: int | None = None
    stage_best_metric: float | None = None
    stage_bad_evals: int = 0
    selection_metric: str | None = None
    train_seconds: float = 0.0
    stage_summaries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stage_started_at_seconds: float = 0.0
    finished: bool = False
    # GKD: optimizer steps trained on student samples (fresh or from the replay buffer), run and stage
    on_policy_steps: int = 0
    replayed_steps: int = 0
    stage_on_policy_steps: int = 0
    stage_replayed_steps: int = 0
    generation_seconds: float = 0.0


@dataclasses.dataclass
class TrainResult:
    status: str  # "completed" or "interrupted"
    output_dir: Path
    final_dir: Path | None
    best_dir: Path | None
    summary: dict[str, Any]
    #: True when the output folder already held this run, completed: nothing was trained or written
    already_completed: bool = False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _dtype_name(model: nn.Module) -> str:
    first = next(iter(model.parameters()), None)
    return "?" if first is None else str(first.dtype).removeprefix("torch.")


def _stream_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tokenized_fingerprint(data: TokenizedDataset | None) -> str | None:
    if data is None:
        return None
    h = hashlib.sha256()
    for s in data:
        h.update(s.id.encode())
        h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class DistillTrainer:
    """Trains ``student`` towards ``teacher`` through ``stages``.

    ``teacher`` may be None only when every stage has alpha = 0 (plain supervised fine-tuning, used
    for example to train the built-in teacher). ``fingerprints`` identify the models and data of the
    run; a resume with different fingerprints or config is refused.
    """

    def __init__(self, *, config: DistillConfig, student: nn.Module, tokenizer, teacher: nn.Module | None,
                 train_data: TokenizedDataset, dev_data: TokenizedDataset | None, stages: Sequence[Stage],
                 vocab_size: int, fused: bool = True, fingerprints: dict[str, Any] | None = None,
                 accelerator=None, stage_callback=None, step_callbacks: Sequence = (),
                 dev_records: Sequence | None = None):
        check_stages(stages)
        if config.loss.method != "kd":
            # The CE-only baselines (pocl.baselines): alpha 0 in every stage, the teacher is never evaluated.
            stages = [dataclasses.replace(s, alpha=0.0) for s in stages]
            if config.loss.method == "seqkd" and getattr(train_data, "origin", None) != SEQKD_ORIGIN:
                raise ConfigError("loss.method seqkd: the training data are not the teacher's answers; build them "
                                  "with pocl.baselines.apply_method(config, inputs)")
        if teacher is None and any(s.alpha > 0 for s in stages):
            raise ConfigError("a teacher is required when a stage has alpha > 0")
        self.cfg = config
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.dev_data = dev_data if dev_data is not None and len(dev_data) > 0 else None
        # the first dev_rouge_samples dev records, or all of them when 0 and best/ is chosen by dev ROUGE-L
        self.dev_records = list(dev_records or [])[: selection.dev_rouge_count(config.train, len(dev_records or []))]
        if config.train.dev_rouge_samples > 0 and not self.dev_records:
            raise ConfigError("train.dev_rouge_samples: dev ROUGE-L needs dev records (give --dev-file)")
        self.stages = list(stages)
        self.vocab_size = vocab_size
        self.fused = fused
        self.output_dir = Path(config.train.output_dir)
        self.stage_callback = stage_callback
        self.step_callbacks = list(step_callbacks)
        if accelerator is None:
            from pocl.launch import make_accelerator

            accelerator = make_accelerator(config)
        self.accelerator = accelerator
        self.device = accelerator.device
        world = accelerator.num_processes
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != world:
            # Each process would train alone on the whole data and they would overwrite each other's files.
            raise ConfigError(f"launched as {env_world} processes but the accelerator sees {world}; create it "
                              "with pocl.launch.make_accelerator (cpu=True on machines without CUDA)")
        tc = config.train
        if tc.batch_size % (tc.micro_batch_size * world) != 0:
            raise ConfigError(f"train.batch_size ({tc.batch_size}) must be a multiple of micro_batch_size x "
                              f"processes ({tc.micro_batch_size} x {world})")
        self._index_of = {s.id: i for i, s in enumerate(train_data)}
        if len(self._index_of) != len(train_data):
            raise ConfigError("training sample ids are not unique")
        self._target_counts = [count_target_tokens(torch.tensor([s.labels])) for s in train_data]
        self._stage_indices = [self._resolve_stage(stage) for stage in self.stages]
        self._check_on_policy(teacher)
        lc = config.loss
        self.replay = onpolicy.ReplayBuffer(lc.replay_buffer_size) if (
            lc.replay_buffer_size > 0 and any(self._lambda_on(s) > 0 for s in self.stages)) else None

        _seed_everything(tc.seed)
        if config.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
            if hasattr(student.config, "use_cache"):
                student.config.use_cache = False
        student.train()
        self.chunk_size = auto_chunk_size(config.loss.chunk_size, vocab_size)
        self.module = StudentLoss(student, vocab_size, fused=fused, chunk_size=self.chunk_size,
                                  temperature_scaling=config.loss.temperature_scaling)
        self.module = accelerator.prepare_model(self.module)
        self.student = accelerator.unwrap_model(self.module).student
        self.teacher = teacher
        self.teacher_head = None
        # Where the teacher side of the loss comes from: live until prepare_teacher_cache() opens a cache;
        # on-policy steps always score the student's new samples live.
        self.live_teacher: tsignal.LiveTeacher | None = None
        if teacher is not None:
            teacher.to(self.device)
            teacher.eval()
            teacher.requires_grad_(False)
            if fused:
                self.teacher_head = LMHead.from_model(teacher, vocab_size)
            self.live_teacher = tsignal.LiveTeacher(teacher, self.teacher_head, vocab_size)
        self.optimizer = accelerator.prepare_optimizer(build_optimizer(self.student, config.optim))
        self.scheduler = None
        self.state = TrainState()
        self.fingerprints = dict(fingerprints or {})
        self.fingerprints.setdefault("train_data", tokenized_fingerprint(train_data))
        self.fingerprints.setdefault("dev_data", tokenized_fingerprint(self.dev_data))
        self.fingerprints["stages"] = hashlib.sha256(json.dumps(
            [dict(s.to_dict(), ids=hashlib.sha256("\n".join(s.sample_ids or ()).encode()).hexdigest())
             for s in self.stages], sort_keys=True).encode()).hexdigest()[:16]
        self._stop_signal: int | None = None  # set by SIGINT/SIGTERM or request_stop()
        self.summary_extra: dict[str, Any] = {}  # added to summary.json (e.g. the ranking's timing)
        self._loss_cache: dict[tuple, Any] = {}
        # The teacher signals of teacher-forced steps on the training and dev data (pocl.training.teacher_signal):
        # the live teacher, or a teacher cache opened by prepare_teacher_cache() in train().
        self.train_signal: TeacherSignal | None = self.live_teacher
        self.dev_signal: TeacherSignal | None = self.live_teacher

    # ------------------------------------------------------------------ setup helpers
    def _resolve_stage(self, stage: Stage) -> list[int]:
        if stage.sample_ids is None:
            return list(range(len(self.train_data)))
        missing = [i for i in stage.sample_ids if i not in self._index_of]
        if missing:
            raise ConfigError(f"stage '{stage.name}' names {len(missing)} sample ids that are not in the training "
                              f"data, e.g. {missing[:3]}")
        return [self._index_of[i] for i in stage.sample_ids]

    def _lambda_on(self, stage: Stage) -> float:
        """The stage's on-policy fraction lambda_on (the loss config's when the stage has none)."""
        return self.cfg.loss.on_policy_fraction if stage.on_policy_fraction is None else stage.on_policy_fraction

    def _check_on_policy(self, teacher) -> None:
        lc = self.cfg.loss
        for stage in self.stages:
            if self._lambda_on(stage) <= 0:
                continue
            where = f"stage '{stage.name}': on_policy_fraction {self._lambda_on(stage):g}"
            if lc.method != "kd":
                raise ConfigError(f"{where}: on-policy steps need loss.method kd (not {lc.method})")
            if teacher is None:
                raise ConfigError(f"{where}: on-policy steps need a teacher to score the student's samples")
            if stage.alpha == 0 and not lc.on_policy_ce:
                raise ConfigError(f"{where} with alpha 0 and loss.on_policy_ce off: on-policy steps would train on "
                                  "nothing (give the stage alpha > 0, or turn on_policy_ce on)")

    def _on_policy_kind(self, stage_index: int, stage_step: int) -> str | None:
        """None (a teacher-forced step on the references), "fresh" (the student generates now) or
        "replay" (samples drawn from the replay buffer): a pure function of (seed, stage, step) and of
        the number of fresh steps so far, hence the same on every process and after a resume."""
        stage = self.stages[stage_index]
        lam = self._lambda_on(stage)
        if lam <= 0:
            return None
        u_on, u_replay = onpolicy.step_uniforms(self.cfg.train.seed, stage_index, stage.name, stage_step)
        if u_on >= lam:
            return None
        if self.replay is not None and self.replay.fresh_steps > 0 and u_replay < self.cfg.loss.replay_reuse_prob:
            return "replay"
        return "fresh"

    def _on_policy_samples(self, local: list[TokenizedSample], kind: str, stage_index: int,
                           stage_step: int) -> list[TokenizedSample]:
        """This process's share of an on-policy window: student responses to its prompts (fresh), or
        as many samples drawn from its replay buffer (replay)."""
        lc = self.cfg.loss
        stage = self.stages[stage_index]
        rank = self.accelerator.process_index
        seed = onpolicy.stream_seed(self.cfg.train.seed, kind, stage_index, stage.name, stage_step, rank)
        if kind == "replay" and self.replay is not None and len(self.replay) > 0:
            return self.replay.draw(len(local), seed)
        decoding = DecodingConfig(do_sample=True, temperature=lc.on_policy_temperature, top_p=lc.on_policy_top_p,
                                  top_k=0, no_repeat_ngram_size=0, max_new_tokens=lc.on_policy_max_new_tokens)
        t0 = time.perf_counter()
        with self.accelerator.autocast():
            fresh = onpolicy.sample_responses(self.student, self.tokenizer, local, decoding=decoding, seed=seed,
                                              batch_size=self.cfg.train.micro_batch_size,
                                              max_length=self.cfg.data.max_length)
        self.state.generation_seconds += time.perf_counter() - t0
        if self.replay is not None and kind == "fresh":
            # (A "replay" step that found this process's buffer empty generated instead; its samples are
            # not added, so that fresh_steps, which the decisions read, stays equal on every process.)
            self.replay.push(fresh)
        return fresh

    def _divergence(self, stage: Stage):
        if stage.alpha == 0:
            return None
        key = (self.cfg.loss.divergence, stage.skew)
        if key not in self._loss_cache:
            params = self.cfg.loss.divergence_params(skew=stage.skew)
            self._loss_cache[key] = make_divergence(self.cfg.loss.divergence, **params)
        return self._loss_cache[key]

    def _stage_total_steps(self, i: int) -> int:
        return self.stages[i].total_steps(len(self._stage_indices[i]), self.cfg.train.batch_size)

    def _steps_per_epoch(self, i: int) -> int:
        return self.stages[i].steps_per_epoch(len(self._stage_indices[i]), self.cfg.train.batch_size)

    def window(self, stage_index: int, stage_step: int) -> list[int]:
        """Dataset indices of the samples of one optimizer step (the whole global batch)."""
        indices = self._stage_indices[stage_index]
        spe = self._steps_per_epoch(stage_index)
        epoch, pos = divmod(stage_step, spe)
        gen = torch.Generator().manual_seed(_stream_seed(self.cfg.train.seed, stage_index,
                                                         self.stages[stage_index].name, epoch))
        perm = torch.randperm(len(indices), generator=gen).tolist()
        b = self.cfg.train.batch_size
        return [indices[i] for i in perm[pos * b:(pos + 1) * b]]

    # ------------------------------------------------------------------ loss computation
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _teacher_cache_temperatures(self) -> list[float]:
        """The temperatures of the stages with a KD term (every one is evaluated on the dev set, teacher
        forced); empty when no step would read a cache (no teacher-forced KD step at all)."""
        kd = [s for s in self.stages if s.alpha > 0]
        if self.teacher is None or self.cfg.loss.teacher_cache == "off" or all(self._lambda_on(s) >= 1 for s in kd):
            return []
        return sorted({s.temperature for s in kd})

    def _teacher_fingerprint(self) -> str:
        """The pipeline's fingerprint of the teacher; without one (the trainer built directly), a hash
        of its weights, so that a cache is never reused for another teacher."""
        given = self.fingerprints.get("teacher")
        if given:
            return str(given)
        h = hashlib.sha256()
        for name, tensor in self.teacher.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return "weights-" + h.hexdigest()[:16]

    def prepare_teacher_cache(self) -> None:
        """Reuse, finish or build the teacher caches of the training and dev data (``loss.teacher_cache``
        hidden or topk), switch the teacher-forced signals to them, and measure an approximate cache
        against the live teacher (refused above ``loss.teacher_cache_max_error`` unless accepted)."""
        temperatures = self._teacher_cache_temperatures()
        if not temperatures:
            return
        lc = self.cfg.loss
        kind = lc.teacher_cache
        if kind == "hidden" and self.teacher_head is None:
            log.info("teacher cache hidden: the unfused loss path has no teacher LM head to recompute the logits "
                     "with; the live teacher is used")
            return
        root = Path(lc.teacher_cache_dir) if lc.teacher_cache_dir else self.output_dir / "teacher_cache"
        teacher = self._teacher_fingerprint()
        dtype = str(next(self.teacher.parameters()).dtype).removeprefix("torch.")
        live = self.live_teacher
        if kind == "hidden":
            def rows(batch):
                return live.hidden_rows(self._to_device(batch))
        else:
            def rows(batch):
                return live.topk_rows(self._to_device(batch), k=lc.teacher_cache_topk, temperatures=temperatures,
                                      chunk_size=self.chunk_size)
        infos: dict[str, Any] = {}
        for name, data in (("train", self.train_data), ("dev", self.dev_data)):
            if data is None:
                continue
            stamp = tcache.cache_stamp(kind=kind, teacher_fingerprint=teacher, teacher_dtype=dtype,
                                       data_fingerprint=tokenized_fingerprint(data), dtype=lc.teacher_cache_dtype,
                                       vocab_size=self.vocab_size, topk=lc.teacher_cache_topk,
                                       temperatures=temperatures)
            cache, infos[name] = tcache.prepare_teacher_cache(
                root / name, data, teacher_fn=rows, stamp=stamp, batch_size=self.cfg.train.micro_batch_size,
                pad_token_id=self.tokenizer.pad_token_id, accelerator=self.accelerator,
                progress=self.cfg.train.progress, name=name)
            signal = (tsignal.CachedHiddenTeacher(cache, self.teacher_head, self.device) if kind == "hidden"
                      else tsignal.CachedTopKTeacher(cache, self.device))
            setattr(self, f"{name}_signal", signal)
        infos["signal"] = self.train_signal.name
        infos["exact"] = self.train_signal.exact
        if not self.train_signal.exact:
            errors = self._measure_signal_error(self.train_signal)
            infos["error_vs_live"] = [e.to_dict() for e in errors]
            tsignal.check_signal_error(self.train_signal, errors, max_error=lc.teacher_cache_max_error,
                                       accepted=[lc.accept_approximation])
        self.summary_extra["teacher_cache"] = infos

    def _measure_signal_error(self, signal: TeacherSignal) -> list[tsignal.SignalError]:
        """``signal`` against the live teacher on the first training samples, with the student as it
        is now, at the (temperature, divergence) of every KD stage."""
        samples = [self.train_data[i] for i in range(min(self.cfg.loss.teacher_cache_check_samples,
                                                         len(self.train_data)))]
        size = self.cfg.train.micro_batch_size
        batches = [self._to_device(collate(samples[i:i + size], self.tokenizer.pad_token_id))
                   for i in range(0, len(samples), size)]
        # One check per distinct (temperature, divergence) of the KD stages, labelled as in the log.
        checks: dict[tuple[float, str], Stage] = {}
        for stage in self.stages:
            if stage.alpha > 0:
                label = self.cfg.loss.divergence + ("" if stage.skew is None else f"(skew={stage.skew:g})")
                checks.setdefault((stage.temperature, label), stage)

        def divergence_sum(batch, side, temperature, label):
            with self.accelerator.autocast():
                out = self.module(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher=side,
                                  divergence=self._divergence(checks[temperature, label]), temperature=temperature,
                                  alpha=1.0, normalizer=1.0)
            return float(out.divergence_sum), int(out.num_tokens)

        was_training = self.module.training
        self.module.eval()
        try:
            return tsignal.measure_signal_error(signal, self.live_teacher, batches, checks=sorted(checks),
                                                divergence_sum=divergence_sum)
        finally:
            self.module.train(was_training)

    def _micro_loss(self, batch: dict[str, Any], stage: Stage, normalizer: float, *,
                    on_policy: bool = False, signal: TeacherSignal | None = None) -> KDLossOutput:
        """The loss of one micro-batch; the teacher side comes from ``signal`` (the live teacher on
        on-policy steps, whose samples no cache holds)."""
        alpha = stage.alpha
        if on_policy and not self.cfg.loss.on_policy_ce and alpha > 0:
            # No CE on the student's own samples: alpha * s(T) * D / normalizer, computed as the engine's
            # alpha = 1 (CE weight 0) with the normaliser divided by alpha.
            alpha, normalizer = 1.0, normalizer / stage.alpha
        teacher = None
        if alpha > 0:
            teacher = (self.live_teacher if on_policy else signal).side(batch)
        with self.accelerator.autocast():
            return self.module(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher=teacher,
                               divergence=self._divergence(stage), temperature=stage.temperature,
                               alpha=alpha, normalizer=normalizer)

    def _micro_batches(self, samples: list[TokenizedSample], size: int) -> list[list[TokenizedSample]]:
        if self.cfg.train.sort_micro_batches:
            # Stable sort by length: fewer pad tokens; the step's gradient is a sum, so order is free.
            samples = sorted(samples, key=lambda s: len(s.input_ids))
        return [samples[i:i + size] for i in range(0, len(samples), size)]

    def _train_step(self, stage: Stage, window: list[int]) -> dict[str, float]:
        acc = self.accelerator
        samples = [self.train_data[i] for i in window]
        world, rank = acc.num_processes, acc.process_index
        local = samples[rank::world]
        kind = self._on_policy_kind(self.state.stage_index, self.state.stage_step)
        if kind is None:
            # Token count of the whole window on every process (each knows the window), so no
            # communication is needed; DDP averages gradients over processes, hence "/ world".
            total_tokens = sum(self._target_counts[i] for i in window)
        else:
            bad = first_nonfinite_tensor(self.student)
            if bad is not None:
                # The student cannot sample from NaN probabilities (torch.multinomial fails): a non-finite
                # step, so that the run ends through the non-finite guard with its message.
                return self._skip_nonfinite_step(f"the student's weights are not finite ({bad.describe()}); "
                                                 "no on-policy samples generated")
            # Each process generates (or draws) its own share; the normaliser counts the tokens of the
            # sequences actually trained on, summed over processes.
            local = self._on_policy_samples(local, kind, self.state.stage_index, self.state.stage_step)
            counts = torch.tensor([sum(count_target_tokens(torch.tensor([s.labels])) for s in local)],
                                  dtype=torch.float64, device=self.device)
            if world > 1:
                counts = acc.reduce(counts, reduction="sum")
            total_tokens = int(counts.item())
            self.state.on_policy_steps += 1
            self.state.stage_on_policy_steps += 1
            if kind == "replay":
                self.state.replayed_steps += 1
                self.state.stage_replayed_steps += 1
        normalizer = max(total_tokens, 1) / world
        micro = self._micro_batches(local, self.cfg.train.micro_batch_size)
        loss_sum = ce_sum = div_sum = 0.0
        tokens = 0
        pad = self.tokenizer.pad_token_id
        for j, mb in enumerate(micro):
            batch = self._to_device(collate(mb, pad))
            last = j == len(micro) - 1
            ctx = acc.no_sync(self.module) if (world > 1 and not last) else _nullcontext()
            with ctx:
                out = self._micro_loss(batch, stage, normalizer, on_policy=kind is not None, signal=self.train_signal)
                acc.backward(out.loss)
            loss_sum += float(out.loss.detach())
            ce_sum += float(out.ce_sum)
            div_sum += float(out.divergence_sum)
            tokens += int(out.num_tokens)
        stats = torch.tensor([loss_sum, ce_sum, div_sum, tokens], dtype=torch.float64, device=self.device)
        if world > 1:
            stats = acc.reduce(stats, reduction="sum")
            stats[0] /= world  # each process's loss_sum is already scaled by world / total tokens
        loss_value, ce_total, div_total, tok_total = (float(x) for x in stats.tolist())
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        grad_norm = float(acc.clip_grad_norm_(self.student.parameters(), max_norm))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.state.consecutive_nonfinite = 0
        else:
            self.state.consecutive_nonfinite += 1
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite loss (%s) or gradient norm (%s); step skipped (%d in a row)",
                        self.state.global_step + 1, loss_value, grad_norm, self.state.consecutive_nonfinite)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        tok = max(tok_total, 1.0)
        return {"loss": loss_value, "ce": ce_total / tok, "kd": div_total / tok, "grad_norm": grad_norm,
                "tokens": tok_total, "lr": lr, "skipped": 0.0 if finite else 1.0,
                "on_policy": 0.0 if kind is None else 1.0, "replayed": 1.0 if kind == "replay" else 0.0}

    def _skip_nonfinite_step(self, why: str) -> dict[str, float]:
        """Count the current optimizer step as non-finite without computing it (no update)."""
        self.state.consecutive_nonfinite += 1
        self.state.skipped_steps += 1
        log.warning("step %d: %s; step skipped (%d in a row)", self.state.global_step + 1, why,
                    self.state.consecutive_nonfinite)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        nan = math.nan
        return {"loss": nan, "ce": nan, "kd": nan, "grad_norm": nan, "tokens": 0.0, "lr": lr, "skipped": 1.0,
                "on_policy": 0.0, "replayed": 0.0}

    @torch.no_grad()
    def evaluate(self, stage: Stage) -> dict[str, float]:
        """Dev loss at the stage's temperature and alpha, plus the reference CE (comparable across stages)."""
        assert self.dev_data is not None
        self.module.eval()
        acc = self.accelerator
        idx = list(range(len(self.dev_data)))[acc.process_index::acc.num_processes]
        ce_sum = div_sum = 0.0
        tokens = 0
        bs = self.cfg.train.eval_batch_size
        samples = sorted((self.dev_data[i] for i in idx), key=lambda s: len(s.input_ids))
        for k in range(0, len(samples), bs):
            batch = self._to_device(collate(samples[k:k + bs], self.tokenizer.pad_token_id))
            out = self._micro_loss(batch, stage, 1.0, signal=self.dev_signal)
            ce_sum += float(out.ce_sum)
            div_sum += float(out.divergence_sum)
            tokens += int(out.num_tokens)
        stats = torch.tensor([ce_sum, div_sum, tokens], dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
        ce_sum, div_sum, tokens = stats.tolist()
        self.module.train()
        tok = max(tokens, 1.0)
        scale = stage.temperature ** 2 if self.cfg.loss.temperature_scaling == "t2" else 1.0
        ce, kd = ce_sum / tok, div_sum / tok
        out = {"dev_loss": (1 - stage.alpha) * ce + stage.alpha * scale * kd, "dev_ce": ce, "dev_kd": kd,
               "dev_tokens": tokens}
        if self.dev_records:
            skip = self._rouge_skip_reason(out)
            if skip is None:
                out["dev_rouge_l"] = self._dev_rouge()
            else:
                # Sampling from NaN probabilities fails (torch.multinomial); NaN is never a new best, and the
                # run stops through the non-finite guard of the training steps.
                (log.warning if acc.is_main_process else log.debug)(
                    "step %d: dev ROUGE-L not computed: %s; recorded as NaN (never a new best)",
                    self.state.global_step, skip)
                out["dev_rouge_l"] = math.nan
        return out

    def _rouge_skip_reason(self, dev: dict[str, float]) -> str | None:
        """Why the dev answers cannot be generated now (non-finite dev loss or student weights), or None.
        Every process holds the same weights and the reduced dev values: the same decision everywhere."""
        bad = [k for k in ("dev_loss", "dev_ce") if not math.isfinite(dev[k])]
        if bad:
            return f"{bad[0]} is {dev[bad[0]]}"
        tensor = first_nonfinite_tensor(self.student)
        if tensor is not None:
            return f"the student's weights are not finite ({tensor.describe()})"
        return None

    def _dev_rouge(self) -> float:
        """ROUGE-L x 100 of sampled answers (T = 1, the run's seed) on the first dev samples; computed
        on the main process and shared, so every process takes the same best-model decisions."""
        from pocl.evaluation.runner import evaluate_records
        from pocl.generation import DecodingConfig

        acc = self.accelerator
        value = [0.0]
        if acc.is_main_process:
            from pocl.data import get_template

            dc = self.cfg.data
            template = get_template(dc.template, tokenizer=self.tokenizer, use_prompt_field=dc.use_prompt_field)
            result = evaluate_records(
                self.student, self.tokenizer, self.dev_records, template=template,
                decoding=DecodingConfig(max_new_tokens=self.cfg.train.dev_rouge_max_new_tokens),
                seeds=[self.cfg.train.seed], batch_size=self.cfg.train.eval_batch_size,
                max_prompt_length=dc.max_prompt_length, truncation_side=dc.truncation_side)
            value = [float(result.rouge_l)]
            self.student.train()
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list(value)
        return value[0]

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state_dict(self) -> dict[str, Any]:
        return {
            "state": dataclasses.asdict(self.state),
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.training_hash(),
            "fingerprints": self.fingerprints,
            "stages": [s.to_dict() for s in self.stages],
            "num_processes": self.accelerator.num_processes,
        }

    def _rng_state(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (main process only) and prune old ones.

        Never a checkpoint of non-finite student weights: then nothing is written (a warning names the
        tensor), the previous checkpoints stay, and a resume starts from finite weights. Returns None
        then (the decision is the same on every process: they hold the same weights)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / "checkpoints" / ckpt.step_dir_name(self.state.global_step)
        bad = first_nonfinite_tensor(self.student)
        if bad is not None:
            kept = ckpt.list_checkpoints(folder.parent)
            (log.warning if acc.is_main_process else log.debug)(
                "step %d: the student's weights are not finite (%s); not saving checkpoint %s. %s",
                self.state.global_step, bad.describe(), folder,
                f"The last checkpoint, {kept[0][1]}, is kept: a resume starts from it." if kept else
                "There is no earlier checkpoint: a resume starts over.")
            return None
        # Every process's RNG state, so that a resumed run continues each process's random stream.
        rng_states = [self._rng_state()]
        replay_states = [self.replay.state_dict()] if self.replay is not None else []
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object(rng_states)
            if self.replay is not None:
                replay_states = gather_object(replay_states)
        if acc.is_main_process:
            def write(tmp: Path) -> None:
                save_training_weights(self.student, self.tokenizer, tmp)
                (tmp / "trainer_state.json").write_text(json.dumps(self._trainer_state_dict(), indent=1,
                                                                   default=str), encoding="utf-8")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict() if self.scheduler is not None else {}, tmp / "scheduler.pt")
                torch.save({"per_process": rng_states}, tmp / "rng.pt")
                if self.replay is not None:
                    (tmp / onpolicy.REPLAY_FILE).write_text(json.dumps(
                        {"format": "pocl-replay-buffer-v1", "per_process": replay_states}), encoding="utf-8")

            ckpt.atomic_folder_write(folder, write, manifest_extra={"step": self.state.global_step})
            ckpt.prune_checkpoints(folder.parent, self.cfg.train.save_total_limit)
        acc.wait_for_everyone()
        return folder

    def _check_resume_compatible(self, saved: dict[str, Any], folder: Path) -> None:
        problems = ckpt.resume_differences(saved, config=self.cfg, fingerprints=self.fingerprints,
                                           num_processes=self.accelerator.num_processes)
        if problems:
            message = ckpt.resume_refusal_message(folder, problems)
            if self.cfg.train.allow_config_change:
                log.warning("%s\nresuming anyway (--allow-config-change)", message.rsplit("\n", 1)[0])
            else:
                raise CheckpointError(message)

    def _load_student_weights(self, folder: Path) -> None:
        load_training_weights(self.student, folder)

    def _resume(self) -> Path | None:
        tc = self.cfg.train
        folder_root = self.output_dir / "checkpoints"
        ckpt.clean_temporaries(folder_root)
        ckpt.clean_temporaries(self.output_dir)
        existing = ckpt.list_checkpoints(folder_root)
        if tc.resume == "never" or not existing:
            return None
        folder = ckpt.latest_valid_checkpoint(folder_root)
        if folder is None:
            raise CheckpointError(f"{folder_root} has checkpoints but none is complete and intact; "
                                  "use --overwrite to start over")
        saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        self._check_resume_compatible(saved, folder)
        state = TrainState(**saved["state"])
        if self._completed_on_disk(state):
            self.state = state  # for the summary of the result; the weights are not loaded
            self._completed_checkpoint = folder
            return folder
        self._load_student_weights(folder)
        self.state = state
        self._resume_optimizer_from = folder
        rng_all = torch.load(folder / "rng.pt", weights_only=False)["per_process"]
        rng = rng_all[self.accelerator.process_index]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.replay is not None:
            replay_file = folder / onpolicy.REPLAY_FILE
            if replay_file.is_file():
                states = json.loads(replay_file.read_text(encoding="utf-8"))["per_process"]
                self.replay.load_state_dict(states[self.accelerator.process_index])
            else:
                log.warning("%s has no replay buffer; resuming with an empty one", folder)
        log.info("resuming from %s (stage %d '%s', step %d of the stage, global step %d)", folder,
                 self.state.stage_index + 1, self.stages[min(self.state.stage_index, len(self.stages) - 1)].name,
                 self.state.stage_step, self.state.global_step)
        return folder

    def _prepare_output_dir(self) -> None:
        tc = self.cfg.train
        if tc.overwrite and self.output_dir.exists() and self.accelerator.is_main_process:
            for name in ("checkpoints", "final", "best", "tensorboard", "metrics.jsonl", "summary.json",
                         "summary.md", "config.yaml"):
                p = self.output_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self.accelerator.wait_for_everyone()
        if tc.resume == "never" and ckpt.list_checkpoints(self.output_dir / "checkpoints"):
            raise CheckpointError(f"{self.output_dir} already holds checkpoints; use --resume auto to continue, "
                                  "--overwrite to start over, or another --output-dir")

    # ------------------------------------------------------------------ signals
    def request_stop(self) -> None:
        """Stop after the current optimizer step: save a checkpoint and return "interrupted"."""
        self._stop_signal = int(signal.SIGTERM)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("received %s: finishing the current step, saving a checkpoint and exiting",
                        signal.Signals(signum).name)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # ------------------------------------------------------------------ main loop
    def train(self) -> TrainResult:
        acc = self.accelerator
        tc = self.cfg.train
        self._prepare_output_dir()
        self._resume_optimizer_from = None
        self._completed_checkpoint = None
        resumed = self._resume()
        if self._completed_checkpoint is not None:
            return self._already_completed()
        self.prepare_teacher_cache()  # after the resume check: a refused resume costs no teacher pass
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")
            if self.device.type != "cpu":  # the models' load lines (pocl.models) say where they were loaded
                log.info("training on %s (%d process%s): student %s%s", self.device, acc.num_processes,
                         "" if acc.num_processes == 1 else "es", _dtype_name(self.student),
                         "" if self.teacher is None else f", teacher {_dtype_name(self.teacher)}")
        metrics = MetricsLogger(self.output_dir, tensorboard=tc.tensorboard, enabled=acc.is_main_process,
                                resume_step=self.state.global_step if resumed else None)
        totals = [self._stage_total_steps(i) for i in range(len(self.stages))]
        progress = None
        if acc.is_main_process:
            # A bar on a terminal (unless --no-progress), else a plain line every log_every steps.
            from pocl.progress import make_progress

            progress = make_progress(self._planned_total(totals), desc="distill", unit="step", bar=tc.progress,
                                     every=tc.log_every, initial=self.state.global_step, logger=log)
        previous_handlers = self._install_signal_handlers()
        status = "completed"
        try:
            status = self._run_stages(metrics, progress, totals)
        finally:
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            if progress is not None:
                progress.close()
            metrics.close()
        final_dir = best_dir = None
        if status == "completed":
            final_dir = self.output_dir / "final"
            if self.state.global_step > 0 and self.state.skipped_steps >= self.state.global_step:
                # Fewer steps than --max-nonfinite-steps, all skipped: the student was never trained.
                raise NonFiniteLossError(
                    f"all {self.state.global_step} optimizer steps of the run had a non-finite loss or gradient, so "
                    f"the student was never updated; not writing {final_dir}. Lower the learning rate, check the "
                    "data and the teacher, or check the student's weights.")
            self._check_finite_weights(final_dir)  # on every process, before any of them writes
            if acc.is_main_process:
                ckpt.atomic_folder_write(final_dir, self._save_model_folder)
            best = self.output_dir / "best"
            best_dir = best if best.exists() else None
        summary = self.summary(status)
        if acc.is_main_process:
            write_summary(self.output_dir, summary)
        acc.wait_for_everyone()
        return TrainResult(status, self.output_dir, final_dir, best_dir, summary)

    def _completed_on_disk(self, state: TrainState) -> bool:
        """Whether the output folder holds this run completed: every stage done in the newest checkpoint,
        final/ intact (its manifest's files present with their sizes) and summary.json saying so. A run
        that stopped between its last checkpoint and writing final/ or the summary is not: it finishes."""
        if not (state.finished or state.stage_index >= len(self.stages)):
            return False
        final = self.output_dir / "final"
        try:
            ckpt.verify_folder(final, check_hashes=False)
            summary = json.loads((self.output_dir / "summary.json").read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(summary, dict) and summary.get("status") == "completed"

    def _already_completed(self) -> TrainResult:
        """A rerun of a completed run: one line, nothing trained, nothing written (not even config.yaml,
        metrics.jsonl or summary.json), exit status 0."""
        if self.accelerator.is_main_process:
            log.warning("run in %s already completed at step %d (%s exists); nothing to do: nothing was trained "
                        "or written. To train again, give a new --output-dir, or --overwrite to start this run over "
                        "(it deletes the run's checkpoints, final/, best/, metrics and summary; the difficulty "
                        "ranking and the teacher cache are kept and reused when they fit)", self.output_dir,
                        self.state.global_step, self.output_dir / "final")
        best = self.output_dir / "best"
        summary = dict(self.summary("completed"), already_completed=True)
        return TrainResult("completed", self.output_dir, self.output_dir / "final", best if best.exists() else None,
                           summary, already_completed=True)

    def _save_model_folder(self, tmp: Path) -> None:
        # tmp is the temporary folder of final/ or best/ (.tmp-NAME-xxxxxxxx): refused before any file is
        # written there, and atomic_folder_write removes it, so the folder on disk stays as it was.
        name = tmp.name[len(".tmp-"):].rsplit("-", 1)[0] if tmp.name.startswith(".tmp-") else tmp.name
        self._check_finite_weights(tmp.parent / name)
        save_model_folder(self.student, self.tokenizer, tmp)  # LoRA adapters merged: a plain HF folder

    def _check_finite_weights(self, target: Path) -> None:
        """Raise NonFiniteLossError (naming the tensor) when the student's weights hold NaN or inf: such a
        model is never written to final/ or best/."""
        bad = first_nonfinite_tensor(self.student)
        if bad is not None:
            raise NonFiniteLossError(
                f"the student's weights are not finite at global step {self.state.global_step}: {bad.describe()}; "
                f"not writing {target} (nothing was written). No checkpoint holds such weights (checkpoints are "
                f"saved only with finite weights): the last one in {self.output_dir / 'checkpoints'} is a finite "
                "state to resume from. Lower the learning rate or check the data.")

    def _start_stage(self, i: int, total: int) -> None:
        stage = self.stages[i]
        lr = stage.lr or self.cfg.optim.lr
        if stage.restart_optimizer or i == 0:
            reset_optimizer(self.optimizer, lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total, lr=lr)
        if self._resume_optimizer_from is not None:
            folder = self._resume_optimizer_from
            # At a stage boundary a restarting stage begins from a fresh optimizer, exactly as the
            # uninterrupted run does; inside a stage the saved moments and schedule continue.
            if self.state.stage_step > 0 or not stage.restart_optimizer:
                self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
            sched_state = torch.load(folder / "scheduler.pt", weights_only=False)
            if sched_state and self.state.stage_step > 0:
                self.scheduler.load_state_dict(sched_state)
            self._resume_optimizer_from = None

    def _run_stages(self, metrics: MetricsLogger, progress, totals: list[int]) -> str:
        tc = self.cfg.train
        while self.state.stage_index < len(self.stages):
            i = self.state.stage_index
            stage = self.stages[i]
            total = totals[i]
            spe = self._steps_per_epoch(i)
            if self.state.stage_step == 0:
                self.state.stage_best_metric = None
                self.state.stage_bad_evals = 0
                self.state.stage_started_at_seconds = self.state.train_seconds
                self.state.stage_on_policy_steps = 0
                self.state.stage_replayed_steps = 0
                log.info("stage %d/%d '%s': %d samples, %d steps, T=%.3g, alpha=%.3g", i + 1, len(self.stages),
                         stage.name, len(self._stage_indices[i]), total, stage.temperature, stage.alpha)
            self._start_stage(i, total)
            window_stats: list[dict[str, float]] = []
            t_last = time.perf_counter()
            advance_early = False
            while self.state.stage_step < total:
                t0 = time.perf_counter()
                stats = self._train_step(stage, self.window(i, self.state.stage_step))
                self.state.stage_step += 1
                self.state.global_step += 1
                self.state.train_seconds += time.perf_counter() - t0
                window_stats.append(stats)
                for callback in self.step_callbacks:
                    callback(self)
                if self.state.consecutive_nonfinite >= tc.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.state.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or "
                        f"gradient (last at global step {self.state.global_step}); stopping without writing "
                        f"the current weights. The last good checkpoint is in {self.output_dir / 'checkpoints'}. "
                        "Lower the learning rate, check the data, or raise --max-nonfinite-steps.")
                end_of_epoch = self.state.stage_step % spe == 0
                end_of_stage = self.state.stage_step >= total
                shown_loss = stats["loss"]
                if self.state.global_step % tc.log_every == 0 or end_of_stage:
                    now = time.perf_counter()
                    rec = self._aggregate(window_stats, now - t_last)
                    rec.update(step=self.state.global_step, stage=stage.name, stage_index=i,
                               epoch=self.state.stage_step / spe,
                               temperature=stage.temperature, alpha=stage.alpha, split="train")
                    metrics.log(rec, tb_prefix="train")
                    window_stats, t_last = [], now
                    shown_loss = rec.get("loss", shown_loss)  # the mean over the steps since the last line
                if progress is not None:
                    postfix = {"stage": f"{i + 1}/{len(self.stages)}", "loss": f"{shown_loss:.4f}"}
                    if self.state.skipped_steps:
                        postfix["skipped"] = self.state.skipped_steps
                    progress.update(1, **postfix)
                do_eval = self.dev_data is not None and (
                    (tc.eval_every > 0 and self.state.global_step % tc.eval_every == 0)
                    or (tc.eval_every == 0 and end_of_epoch) or end_of_stage)
                if do_eval:
                    dev = self.evaluate(stage)
                    metrics.log(dict(dev, step=self.state.global_step, stage=stage.name, split="dev"), tb_prefix="dev")
                    advance_early, new_best = self._track_dev(dev, stage)
                    self._log_dev(dev, i, new_best)
                if advance_early:
                    log.info("stage '%s': dev metric has not improved for %d evaluations; advancing",
                             stage.name, stage.plateau_patience)
                    end_of_stage = True
                    if progress is not None:  # the stage's remaining planned steps will not run
                        progress.set_total(progress.total - (total - self.state.stage_step))
                if end_of_stage:
                    self._finish_stage(i, total, advanced_early=advance_early)
                    if self.stage_callback is not None:
                        self.stage_callback(self, i)
                    self.save_checkpoint()
                    break
                if (tc.save_every > 0 and self.state.global_step % tc.save_every == 0) or (
                        tc.save_every == 0 and end_of_epoch):
                    self.save_checkpoint()
                if self._stop_signal is not None:
                    self.save_checkpoint()
                    return "interrupted"
            if self._stop_signal is not None:
                return "interrupted"
        self.state.finished = True
        return "completed"

    def _aggregate(self, stats: list[dict[str, float]], seconds: float) -> dict[str, float]:
        if not stats:
            return {}
        tokens = sum(s["tokens"] for s in stats)
        out = {k: sum(s[k] * s["tokens"] for s in stats) / max(tokens, 1.0) for k in ("ce", "kd")}
        out["loss"] = sum(s["loss"] for s in stats) / len(stats)
        out["grad_norm"] = sum(s["grad_norm"] for s in stats) / len(stats)
        out["lr"] = stats[-1]["lr"]
        out["tokens_per_s"] = tokens / max(seconds, 1e-9)
        out["skipped_steps"] = self.state.skipped_steps
        if any(s.get("on_policy") for s in stats) or self.state.on_policy_steps:
            # On-policy steps: their ce/kd are over the student's own samples (ce: its NLL of them).
            out["on_policy_steps"] = sum(s.get("on_policy", 0.0) for s in stats)
            out["replayed_steps"] = sum(s.get("replayed", 0.0) for s in stats)
        return out

    def _planned_total(self, totals: list[int]) -> int:
        """Optimizer steps of the whole run as planned from where it stands (steps done so far, the rest
        of the current stage, the later stages): what the progress counts to."""
        i = self.state.stage_index
        if i >= len(totals):
            return self.state.global_step
        return self.state.global_step + max(totals[i] - self.state.stage_step, 0) + sum(totals[i + 1:])

    def _log_dev(self, dev: dict[str, float], stage_index: int, new_best: bool) -> None:
        """One INFO line per dev evaluation, whatever the progress display: the step, the stage, the dev
        values and whether best/ was replaced."""
        stage = self.stages[stage_index]
        parts = [f"dev_ce {dev['dev_ce']:.4f}", f"dev_loss {dev['dev_loss']:.4f}"]
        if "dev_rouge_l" in dev:
            value = dev["dev_rouge_l"]
            parts.append(f"dev_rouge_l {value:.4f}" if math.isfinite(value) else
                         "dev_rouge_l not computed (non-finite weights or dev loss)")
        name = self.state.selection_metric or self.cfg.train.selection_metric
        if new_best:
            verdict = f"new best {name}: best/ replaced"
        elif self.state.best_step is not None:
            verdict = f"not a new best (best {name} {self.state.best_metric:.4f} at step {self.state.best_step})"
        else:
            verdict = "not a new best (no finite value yet)"
        log.info("step %d, stage %d/%d '%s': %s; %s", self.state.global_step, stage_index + 1, len(self.stages),
                 stage.name, ", ".join(parts), verdict)

    def _track_dev(self, dev: dict[str, float], stage: Stage) -> tuple[bool, bool]:
        """Update best-model tracking; returns (the stage's plateau is reached, a new best of the run).

        The metric is --selection-metric, compared in its own direction (pocl.training.selection: dev
        ROUGE-L, the default, higher is better; dev CE and dev loss, lower is better); the state holds
        its real values. A trainer built without dev records cannot compute dev ROUGE-L: it selects by
        dev CE instead, with a warning (also in summary.json, ``selection_note``)."""
        name, note = selection.fallback_metric(self.cfg.train.selection_metric, dev)
        if note is not None and self.summary_extra.get("selection_note") != note:
            log.warning("%s", note)
            self.summary_extra["selection_note"] = note
        new_best, _ = selection.Selection(name, self.state).update(dev[name], self.state.global_step)
        if new_best and self.accelerator.is_main_process:
            ckpt.atomic_folder_write(self.output_dir / "best", self._save_model_folder,
                                     manifest_extra={"step": self.state.global_step, name: dev[name],
                                                     "selection_metric": name})
        plateau = stage.plateau_patience is not None and self.state.stage_bad_evals >= stage.plateau_patience
        return plateau, new_best

    def _finish_stage(self, i: int, total: int, *, advanced_early: bool) -> None:
        stage = self.stages[i]
        # best_in_stage: a real value of the selection metric (an older checkpoint's negated ROUGE-L converted)
        selection.Selection(self.cfg.train.selection_metric, self.state).adopt()
        self.state.stage_summaries.append({
            **stage.to_dict(),
            "index": i,
            "num_samples": len(self._stage_indices[i]),
            "planned_steps": total,
            "steps": self.state.stage_step,
            "advanced_early": advanced_early,
            "on_policy_fraction": self._lambda_on(stage),
            "on_policy_steps": self.state.stage_on_policy_steps,
            "replayed_steps": self.state.stage_replayed_steps,
            "end_global_step": self.state.global_step,
            "train_seconds": self.state.train_seconds - self.state.stage_started_at_seconds,
            "best_in_stage": self.state.stage_best_metric,
            "selection_metric": self.state.selection_metric,
        })
        self.state.stage_index += 1
        self.state.stage_step = 0

    def summary(self, status: str) -> dict[str, Any]:
        # Real values (a checkpoint of an older version stored dev ROUGE-L negated: converted once).
        selection.Selection(self.cfg.train.selection_metric, self.state).adopt()
        best_metric = self.state.best_metric
        name = self.state.selection_metric or self.cfg.train.selection_metric
        note = None
        if self.state.best_step is None:
            note = ("no dev set: no dev evaluation and no best/ model (final/ is the run's model)"
                    if self.dev_data is None else "no dev evaluation with a finite value yet: no best/ model")
        return {
            **self.summary_extra,
            "status": status,
            "global_steps": self.state.global_step,
            "skipped_steps": self.state.skipped_steps,
            "on_policy_steps": self.state.on_policy_steps,
            "replayed_steps": self.state.replayed_steps,
            "generation_seconds": self.state.generation_seconds,
            "method": self.cfg.loss.method,
            "train_seconds": self.state.train_seconds,
            "selection_metric": name,
            "selection_direction": selection.metric(name).direction,
            "best_metric": best_metric,
            "best_step": self.state.best_step,
            "best_note": note,
            "stages": self.state.stage_summaries,
            "fingerprints": self.fingerprints,
            "output_dir": str(self.output_dir),
            "num_processes": self.accelerator.num_processes,
        }


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
