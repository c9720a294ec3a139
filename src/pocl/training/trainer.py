"""The distillation trainer: runs a list of :class:`~pocl.training.stages.Stage` s.

This module is the wiring, the optimizer step and the stage loop; the rest lives next to it:

* :mod:`pocl.training.student_loss` -- the student's loss and its micro-batches (the loss of a
  window is its token sum over the window's response tokens, however it is split);
* :mod:`pocl.training.teacher_signal` -- the teacher side: live, or an exact or approximate cache;
* :mod:`pocl.training.stage_teachers` -- the run's teachers (a stage may name its own);
* :mod:`pocl.training.onpolicy` -- which steps train on the student's own samples, and the replay buffer;
* :mod:`pocl.training.stages` -- the data order (a pure function of seed, stage and epoch);
* :mod:`pocl.training.sharding` -- how the processes hold the student (DDP or FSDP2);
* :mod:`pocl.training.run_store` -- the output folder, checkpoints, resume, final/ and best/;
* :mod:`pocl.training.selection` -- dev evaluation, best model and plateau;
* :mod:`pocl.training.metrics`, :mod:`pocl.training.summary` -- log records, progress, summary.json.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pocl.launch import cpu_auto_bf16, make_accelerator
from pocl.training import selection
from pocl.training import student_loss as sloss
from pocl.training import teacher_signal as tsignal
from pocl.training.metrics import TrainLog, log_device
from pocl.training.onpolicy import OnPolicySchedule
from pocl.training.optim import build_optimizer, build_scheduler, reset_optimizer
from pocl.training.run_store import RunStore, seed_everything
from pocl.training.sharding import make_parallelism
from pocl.training.stage_teachers import RunTeachers
from pocl.training.stages import Stage, StagePlan, stage_record
from pocl.training.state import NonFiniteLossError, StopRequest, TrainResult, TrainState
from pocl.training.student_loss import SEQKD_ORIGIN, StudentLoss

if TYPE_CHECKING:  # annotations only
    from pocl.config import DistillConfig
    from pocl.data import TokenizedDataset, TokenizedSample
    from pocl.losses import KDLossOutput

__all__ = ["SEQKD_ORIGIN", "DistillTrainer", "NonFiniteLossError", "StudentLoss", "TrainResult", "TrainState"]

log = logging.getLogger("pocl.train")


class DistillTrainer:
    """Trains ``student`` towards ``teacher`` through ``stages``.

    ``teacher`` may be None only when every stage has alpha = 0 (SFT, e.g. of the built-in teacher);
    ``stage_teachers``: the teachers stages name, by path (:mod:`pocl.training.stage_teachers`). ``fingerprints``
    identify the models and data (a resume with other fingerprints or config is refused). ``step_callbacks``:
    ``callback(trainer)`` after every optimizer step; ``stage_hooks``: ``hook(trainer, i)`` before stage i runs
    (:class:`pocl.curriculum.remeasure.StageRemeasure`); ``dev_records``: what dev ROUGE-L answers."""

    def __init__(self, *, config: DistillConfig, student: nn.Module, tokenizer, teacher: nn.Module | None,
                 train_data: TokenizedDataset, dev_data: TokenizedDataset | None, stages: Sequence[Stage],
                 vocab_size: int, fused: bool = True, fingerprints: dict[str, Any] | None = None,
                 accelerator=None, step_callbacks: Sequence = (), dev_records: Sequence | None = None,
                 stage_teachers: dict[str, nn.Module] | None = None, stage_hooks: Sequence = ()):
        """Check the setup (ConfigError), seed, wrap the student, freeze the teachers; the output folder is untouched."""
        self.cfg = config
        self.stages = sloss.method_stages(config, stages, train_data=train_data, has_teacher=teacher is not None)
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.dev_data = dev_data if dev_data is not None and len(dev_data) > 0 else None
        self.dev_records = selection.dev_rouge_records(config.train, dev_records)
        self.vocab_size = vocab_size
        self.fused = fused
        self.output_dir = Path(config.train.output_dir)
        self.step_callbacks = list(step_callbacks)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config)
        self.device = self.accelerator.device
        # Model passes: accelerate's mixed precision or CPU bf16 autocast (cpu_auto_bf16); the loss math is float32.
        self.cpu_bf16, self.precision_note = cpu_auto_bf16(config.model.mixed_precision, self.accelerator, student)
        tc = config.train
        self.stage_hooks = list(stage_hooks)
        self.replan()
        self.on_policy = OnPolicySchedule(config, self.stages, has_teacher=teacher is not None)
        seed_everything(tc.seed)
        student_loss = sloss.build_student_loss(student, config, vocab_size, fused=fused, device=self.device)
        self.parallel = make_parallelism(config, self.accelerator)  # DDP or FSDP2 (pocl.training.sharding)
        self.module = self.parallel.wrap(student_loss)
        self.student, self.chunk_size = student_loss.student, student_loss.chunk_size
        self.divergences = sloss.Divergences(config.loss)
        for model in [teacher, *(stage_teachers or {}).values()]:
            self.parallel.shard_teacher(model, student, tc.teacher_sharding)  # FSDP2: by size, or as configured
        # Every teacher, live until prepare_teacher_cache() opens caches; _use_teacher() picks the stage's.
        self.teachers = RunTeachers(teacher, dict(stage_teachers or {}), self.stages, device=self.device,
                                    vocab_size=vocab_size, fused=fused)
        self.optimizer = self.accelerator.prepare_optimizer(build_optimizer(self.student, config.optim))
        self.scheduler = None
        self.state = TrainState()
        self.store = RunStore(config, self.accelerator, fingerprints=fingerprints, train_data=train_data,
                              dev_data=self.dev_data, stages=self.stages, parallel=self.parallel)
        self.fingerprints = self.store.fingerprints
        self.dev_eval = selection.DevEvaluator(config, accelerator=self.accelerator, tokenizer=tokenizer,
                                               dev_data=self.dev_data, dev_records=self.dev_records)
        self._stop = StopRequest()  # SIGINT/SIGTERM during train(), or request_stop()
        self._resume_optimizer_from: Path | None = None
        self.summary_extra: dict[str, Any] = {}  # added to summary.json (e.g. the ranking's timing)
        self.summary_extra["precision"] = {
            "model_passes": "bf16-autocast" if self.cpu_bf16 else str(self.accelerator.mixed_precision),
            "why": self.precision_note or f"model.mixed_precision {config.model.mixed_precision}"}
        self._use_teacher(self.stages[0].teacher)

    def _use_teacher(self, key: str | None) -> None:
        """Make teacher ``key`` (a stage's ``teacher``; None: model.teacher) the one steps and dev evaluations read."""
        self.teacher = self.teachers.models[key]
        self.live_teacher = self.teachers.live[key]
        self.teacher_head = None if self.live_teacher is None else self.live_teacher.head
        self.train_signal, self.dev_signal = self.teachers.signals[key]

    def replan(self) -> None:
        """(Re)resolve the stages' samples on the training data (after a stage hook changed them)."""
        tc = self.cfg.train
        self.plan = StagePlan(self.stages, self.train_data, batch_size=tc.batch_size,
                              micro_batch_size=tc.micro_batch_size, world=self.accelerator.num_processes, seed=tc.seed)

    def autocast(self):
        """The model passes' context: bf16 autocast on CPU (``pocl.launch.cpu_auto_bf16``), else accelerate's."""
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return self.accelerator.autocast()

    # ------------------------------------------------------------------ data and teacher
    def window(self, stage_index: int, stage_step: int) -> list[int]:
        """Dataset indices of the samples of one optimizer step (the whole global batch)."""
        return self.plan.window(stage_index, stage_step)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch (tensors [B, L]) on the training device."""
        return tsignal.to_device(batch, self.device)

    def prepare_teacher_cache(self) -> None:
        """Reuse, finish or build each teacher's caches of the training and dev data (``loss.teacher_cache``
        hidden or topk; a stage teacher's for its stages' temperatures), switch the teacher-forced signals to
        them, and measure an approximate cache against the live teacher (refused above
        ``loss.teacher_cache_max_error`` unless accepted)."""
        lc = self.cfg.loss
        infos = self.teachers.prepare_caches(
            loss_config=lc, datasets={"train": self.train_data, "dev": self.dev_data}, fingerprints=self.fingerprints,
            root=Path(lc.teacher_cache_dir) if lc.teacher_cache_dir else self.output_dir / "teacher_cache",
            on_policy_fraction=self.on_policy.fraction, measure=self._measure_signal_error,
            chunk_size=self.chunk_size, batch_size=self.cfg.train.micro_batch_size,
            pad_token_id=self.tokenizer.pad_token_id, accelerator=self.accelerator, device=self.device,
            progress=self.cfg.train.progress)
        self._use_teacher(self.stages[min(self.state.stage_index, len(self.stages) - 1)].teacher)
        if infos:
            self.summary_extra["teacher_cache"] = infos

    def _measure_signal_error(self, signal: tsignal.TeacherSignal, live=None,
                              stages: Sequence[Stage] | None = None) -> list[tsignal.SignalError]:
        """``signal`` against ``live`` (default: the current teacher's) on the first training samples, at every
        (T, D) of ``stages``' KD stages (default: all)."""
        n = min(self.cfg.loss.teacher_cache_check_samples, len(self.train_data))
        batches = [sloss.batch_on(mb, self.tokenizer.pad_token_id, self.device) for mb in sloss.length_batches(
            [self.train_data[i] for i in range(n)], self.cfg.train.micro_batch_size, sort=False)]
        with sloss.eval_mode(self.module):
            return tsignal.measure_run_signal(
                signal, live or self.live_teacher, batches, stages or self.stages, divergence=self.cfg.loss.divergence,
                divergence_sum=sloss.divergence_sum_fn(self.module, self.autocast, self.divergences))

    def _on_policy_samples(self, local: list[TokenizedSample], kind: str, stage_index: int,
                           stage_step: int) -> list[TokenizedSample]:
        """This process's share of an on-policy window: fresh student samples, or draws from its replay buffer."""
        return self.on_policy.samples(local, kind, stage_index, stage_step, student=self.student,
                                      tokenizer=self.tokenizer, accelerator=self.accelerator, state=self.state,
                                      autocast=self.autocast, teacher=self.teacher)

    # ------------------------------------------------------------------ the optimizer step
    def _micro_loss(self, batch: dict[str, Any], stage: Stage, normalizer: float, *,
                    on_policy: bool = False, signal: tsignal.TeacherSignal | None = None) -> KDLossOutput:
        """The loss of one micro-batch (``batch``: [B, L] tensors on the device); the teacher side comes
        from ``signal`` (the live teacher on on-policy steps, whose samples no cache holds)."""
        alpha, normalizer = sloss.loss_weights(stage, normalizer, on_policy=on_policy,
                                               on_policy_ce=self.cfg.loss.on_policy_ce)
        # Both models' passes under the run's mixed precision (model.mixed_precision); the loss math
        # itself is float32 (pocl.losses.kernels).
        with self.autocast():
            teacher = (self.live_teacher if on_policy else signal).side(batch) if alpha > 0 else None
            return self.module(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher=teacher,
                               divergence=self.divergences.for_stage(stage), temperature=stage.temperature,
                               alpha=alpha, normalizer=normalizer)

    def _train_step(self, stage: Stage, window: list[int]) -> dict[str, float]:
        """One optimizer step on ``window`` (dataset indices of the global batch): this process's share,
        or its on-policy samples, in micro-batches whose gradients accumulate; the update is skipped
        when the loss or the gradient norm is not finite. Returns the step's statistics."""
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        local = [self.train_data[i] for i in window][rank::world]
        kind = self.on_policy.kind(self.state.stage_index, self.state.stage_step)
        if kind is None:
            # Token count of the whole window on every process (each knows the window), so no
            # communication is needed; DDP averages gradients over processes, hence "/ world".
            total_tokens = self.plan.window_tokens(window)
        else:
            with self.parallel.gathered():  # generation differs between processes (FSDP2: gathered first)
                why = self.on_policy.unsampleable(self.student)
                if why is not None:
                    # A non-finite step, so that the run ends through the non-finite guard with its message.
                    return self._skip_nonfinite_step(why)
                # Each process generates (or draws) its own share; the normaliser counts the tokens of the
                # sequences actually trained on, summed over processes.
                local = self._on_policy_samples(local, kind, self.state.stage_index, self.state.stage_step)
            total_tokens = int(sloss.reduce_sum([sum(s.num_targets for s in local)], acc, self.device)[0])
            self.on_policy.count(kind, self.state)
        normalizer = max(total_tokens, 1) / world
        micro = sloss.length_batches(local, self.cfg.train.micro_batch_size, sort=self.cfg.train.sort_micro_batches)
        loss_sum = ce_sum = div_sum = 0.0
        tokens = 0
        for j, mb in enumerate(micro):
            batch = sloss.batch_on(mb, self.tokenizer.pad_token_id, self.device)
            last = j == len(micro) - 1
            with self.parallel.accumulate(self.module, last=last):
                out = self._micro_loss(batch, stage, normalizer, on_policy=kind is not None, signal=self.train_signal)
                acc.backward(out.loss)
            loss_sum += float(out.loss.detach())
            ce_sum += float(out.ce_sum)
            div_sum += float(out.divergence_sum)
            tokens += int(out.num_tokens)
        loss_value, ce_total, div_total, tok_total = sloss.reduce_sum([loss_sum, ce_sum, div_sum, tokens], acc,
                                                                      self.device)
        loss_value /= world  # each process's loss_sum is already scaled by world / total tokens
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        grad_norm = self.parallel.clip_grad_norm(self.student.parameters(), max_norm)
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

    # ------------------------------------------------------------------ dev evaluation and best model
    @torch.no_grad()
    def evaluate(self, stage: Stage) -> dict[str, float]:
        """Dev loss at the stage's T and alpha, reference CE and dev ROUGE-L (:class:`selection.DevEvaluator`)."""
        assert self.dev_data is not None
        with self.parallel.gathered():  # each process evaluates its own share (FSDP2: gathered first)
            return self.dev_eval.evaluate(
                stage, module=self.module, student=self.student, step=self.state.global_step,
                micro_loss=lambda batch, st, normalizer: self._micro_loss(batch, st, normalizer,
                                                                          signal=self.dev_signal))

    def _rouge_skip_reason(self, dev: dict[str, float]) -> str | None:
        """Why the dev answers cannot be generated now (non-finite dev loss or student weights), or None."""
        return self.dev_eval.rouge_skip_reason(dev, self.student)

    def _write_best(self, metric: str, value: float) -> None:
        """Replace best/ with the student now (a new best ``value`` of ``metric``)."""
        self._write_student("best", manifest_extra={"step": self.state.global_step, metric: value,
                                                    "selection_metric": metric})

    def _write_student(self, name: str, manifest_extra: dict[str, Any] | None = None) -> None:
        """Write final/ or best/ (every process calls it: a sharded student is gathered first)."""
        full = self.parallel.full_state_dict(self.student)  # None when the student is whole
        write = self._save_model_folder if full is None else (lambda tmp: self._save_model_folder(tmp, full))
        self.store.write_model(name, write, manifest_extra=manifest_extra)

    # ------------------------------------------------------------------ the output folder
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` (``RunStore.save_checkpoint``); None when the weights are not finite."""
        return self.store.save_checkpoint(student=self.student, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                          scheduler=self.scheduler, state=self.state, stages=self.stages,
                                          fingerprints=self.fingerprints, replay=self.on_policy.replay,
                                          module=self.module)

    def _save_model_folder(self, tmp: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the student (or the gathered ``state_dict`` of a sharded one) into ``tmp``, the temporary
        folder of final/ or best/ (refused, with nothing written, when its weights are not finite)."""
        self.store.save_model_folder(tmp, self.student, self.tokenizer, self.state.global_step, state_dict, self.summary)

    def summary(self, status: str) -> dict[str, Any]:
        """``summary.json`` of the run as it stands (:func:`pocl.training.summary.run_summary`)."""
        return self.store.summary(status, self.state, extra=self.summary_extra, has_dev=self.dev_data is not None)

    def request_stop(self) -> None:
        """Stop after the current optimizer step: save a checkpoint and return "interrupted"."""
        self._stop.request()

    # ------------------------------------------------------------------ main loop
    def train(self) -> TrainResult:
        """Run (or resume) every stage, then write final/ and the summary. A rerun of a completed run
        trains and writes nothing (``already_completed``); a stop request returns "interrupted"."""
        acc = self.accelerator
        self.store.prepare()
        self._resume_optimizer_from = None
        resumed = self.store.resume(student=self.student, stages=self.stages, fingerprints=self.fingerprints,
                                    replay=self.on_policy.replay, module=self.module)
        if resumed is not None:
            self.state = resumed.state
            self.divergences.restore(self.state)  # TAID's t where the checkpoint left it
            if resumed.completed:  # nothing trained or written (not even config.yaml, metrics or summary)
                self.store.report_already_completed(self.state.global_step)
                return TrainResult("completed", self.output_dir, self.output_dir / "final", self.store.existing("best"),
                                   dict(self.summary("completed"), already_completed=True), already_completed=True)
            self._resume_optimizer_from = resumed.folder
        with self.parallel.gathered():  # processes build different shares (FSDP2: gathered first)
            self.prepare_teacher_cache()  # after the resume check: a refused resume costs no teacher pass
        self.store.write_config()
        if acc.is_main_process:  # the models' load lines (pocl.models) say where they were loaded
            log_device(self.device, acc.num_processes, self.student, self.teacher)
            if self.precision_note:
                log.info("precision: %s", self.precision_note)
        totals = [self.plan.total_steps(i) for i in range(len(self.stages))]
        tlog = TrainLog(self.output_dir, self.cfg.train, main=acc.is_main_process,
                        resume_step=self.state.global_step if resumed else None,
                        planned_total=self.plan.planned_total(totals, self.state), initial=self.state.global_step)
        restore_handlers = self._stop.install()
        status = "completed"
        try:
            status = self._run_stages(tlog, totals)
        finally:
            restore_handlers()
            tlog.close()
        final_dir = best_dir = None
        if status == "completed":
            final_dir = self.output_dir / "final"
            if self.state.global_step > 0 and self.state.skipped_steps >= self.state.global_step:
                raise NonFiniteLossError.never_updated(self.state.global_step, final_dir)  # all steps skipped
            # on every process, before any of them writes
            self.store.check_finite_weights(self.student, final_dir, self.state.global_step)
            self._write_student("final")
            best_dir = self.store.existing("best")
        summary = self.summary(status)
        self.store.write_summary(summary)
        acc.wait_for_everyone()
        return TrainResult(status, self.output_dir, final_dir, best_dir, summary)

    def _start_stage(self, i: int, total: int) -> None:
        """A fresh optimizer (a restarting stage, or the first) and schedule of ``total`` steps for stage
        ``i``; a resumed run loads the checkpoint's optimizer and schedule here."""
        stage = self.stages[i]
        self._use_teacher(stage.teacher)  # progressive distillation: the stage's own teacher, also on a resume
        if self.teachers.progressive:
            log.info("stage '%s': teacher %s", stage.name, self.teachers.describe(stage))
        lr = stage.lr or self.cfg.optim.lr
        if stage.restart_optimizer or i == 0:
            reset_optimizer(self.optimizer, lr)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total, lr=lr)
        if self._resume_optimizer_from is not None:
            self.store.load_optimizer(self._resume_optimizer_from, self.optimizer, self.scheduler,
                                      stage_step=self.state.stage_step, restart_optimizer=stage.restart_optimizer,
                                      module=self.module)
            self._resume_optimizer_from = None

    def _run_stages(self, tlog: TrainLog, totals: list[int]) -> str:
        """The stage loop from where the state stands: steps, logs, dev evaluations, plateaus and
        checkpoints. Returns "completed" or "interrupted" (a stop request: checkpoint saved)."""
        tc = self.cfg.train
        st = self.state
        while st.stage_index < len(self.stages):
            i = st.stage_index
            for hook in self.stage_hooks:  # e.g. re-measuring chooses the stage's samples (same sizes)
                hook(self, i)
            stage = self.stages[i]
            total = totals[i]
            spe = self.plan.steps_per_epoch(i)
            if st.stage_step == 0:
                st.begin_stage()
                self.divergences.start_stage(st, first=i == 0)
                log.info("stage %d/%d '%s': %d samples, %d steps, T=%.3g, alpha=%.3g", i + 1, len(self.stages),
                         stage.name, len(self.plan.stage_indices[i]), total, stage.temperature, stage.alpha)
            self._start_stage(i, total)
            tlog.start_stage()
            advance_early = False
            while st.stage_step < total:
                t0 = time.perf_counter()
                stats = self._train_step(stage, self.window(i, st.stage_step))
                st.stage_step += 1
                st.global_step += 1
                st.train_seconds += time.perf_counter() - t0
                self.divergences.after_step(st, math.nan if stats["skipped"] else stats["kd"], stage_total=total,
                                            run_total=sum(totals))
                for callback in self.step_callbacks:
                    callback(self)
                if st.consecutive_nonfinite >= tc.max_nonfinite_steps:
                    raise NonFiniteLossError.in_a_row(st, self.output_dir / "checkpoints")
                end_of_epoch = st.stage_step % spe == 0
                end_of_stage = st.stage_step >= total
                tlog.step(stats, st, stage=stage, stage_index=i, num_stages=len(self.stages), steps_per_epoch=spe,
                          end_of_stage=end_of_stage)
                if self.dev_data is not None and ((tc.eval_every > 0 and st.global_step % tc.eval_every == 0)
                                                  or (tc.eval_every == 0 and end_of_epoch) or end_of_stage):
                    dev = self.evaluate(stage)
                    tlog.dev(dev, st.global_step, stage.name)
                    advance_early, new_best = selection.track_dev(
                        dev, stage, st, configured=tc.selection_metric, notes=self.summary_extra,
                        write_best=self._write_best)
                    selection.log_dev(dev, st, configured=tc.selection_metric, stage_index=i, stages=self.stages,
                                      new_best=new_best)
                if advance_early:
                    log.info("stage '%s': dev metric has not improved for %d evaluations; advancing",
                             stage.name, stage.plateau_patience)
                    end_of_stage = True
                    tlog.drop_planned(total - st.stage_step)  # the stage's remaining planned steps will not run
                if end_of_stage:
                    self._finish_stage(i, total, advanced_early=advance_early)
                    self.save_checkpoint()
                    break
                if (tc.save_every > 0 and st.global_step % tc.save_every == 0) or (
                        tc.save_every == 0 and end_of_epoch):
                    self.save_checkpoint()
                if self._stop.requested:
                    self.save_checkpoint()
                    return "interrupted"
            if self._stop.requested:
                return "interrupted"
        st.finished = True
        return "completed"

    def _finish_stage(self, i: int, total: int, *, advanced_early: bool) -> None:
        """Record stage ``i``'s summary (``total`` planned steps) and move to the next stage."""
        # best_in_stage: a real value of the selection metric (an older checkpoint's negated ROUGE-L converted)
        selection.Selection(self.cfg.train.selection_metric, self.state).adopt()
        self.state.stage_summaries.append(stage_record(
            self.stages[i], i, num_samples=len(self.plan.stage_indices[i]), planned_steps=total, state=self.state,
            advanced_early=advanced_early, on_policy_fraction=self.on_policy.fraction(self.stages[i])))
        self.state.stage_index += 1
        self.state.stage_step = 0
