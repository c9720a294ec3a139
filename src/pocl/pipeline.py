"""From a config to a trained student: load models and data, build the stages, train.

This is the Python API behind ``pocl distill``::

    from pocl import DistillConfig, distill
    cfg = DistillConfig.from_dict({"model": {"teacher": "t", "student": "s"},
                                   "data": {"train_file": "train.jsonl"}})
    result = distill(cfg)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from pocl import hub
from pocl.config import DistillConfig
from pocl.context_length import Context, Fit, context_of, fit_distill_config, read_context, smallest
from pocl.data import TokenizedDataset, get_template, load_records, tokenize_records
from pocl.errors import ConfigError, ModelError
from pocl.model_checks import split_model_spec
from pocl.fingerprints import model_fingerprint, tokenized_fingerprint
from pocl.models import (LMHead, check_fused_head, check_tokenizers, freeze_teacher, load_model, load_tokenizer,
                         resolve_dtype, shared_vocab_size)
from pocl.training.stages import Stage
from pocl.training import output_dirs
from pocl.training import selection
from pocl.training.run_store import check_resume_before_training
from pocl.training.trainer import DistillTrainer, TrainResult

log = logging.getLogger("pocl")


@dataclasses.dataclass
class RunInputs:
    """Everything a trainer needs, loaded and checked."""

    tokenizer: Any
    teacher: torch.nn.Module | None
    student: torch.nn.Module
    train_data: TokenizedDataset
    dev_data: TokenizedDataset | None
    vocab_size: int
    fused: bool
    fingerprints: dict[str, Any]
    train_records: list
    dev_records: list | None
    #: progressive distillation: the teachers stages name, by path (:func:`load_stage_teachers`)
    stage_teachers: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)


def _device(config: DistillConfig) -> torch.device:
    if config.model.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_data(config: DistillConfig, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset | None, list, list | None]:
    """Load, validate and tokenise the training and dev data of ``config``."""
    dc = config.data
    if dc.train_file is None:
        raise ConfigError("data.train_file: no training data given (the built-in suite is used only by "
                          "`pocl distill` without model and data arguments)")
    template = get_template(dc.template, tokenizer=tokenizer, use_prompt_field=dc.use_prompt_field)

    def load(source: str, split: str, limit: int | None, name: str):
        result = load_records(source, split=split, skip_invalid=dc.skip_invalid_rows)  # logs what it skipped
        records = result.records[:limit] if limit else result.records
        data = tokenize_records(records, tokenizer, template, max_length=dc.max_length,
                                max_prompt_length=dc.max_prompt_length, truncation_side=dc.truncation_side)
        st = data.stats
        log.info("%s data: %d samples from %s (%d prompts and %d responses truncated)", name, len(data), source,
                 st.prompts_truncated, st.responses_truncated)
        return data, records

    train, train_records = load(dc.train_file, dc.train_split, dc.max_train_samples, "training")
    dev = dev_records = None
    if dc.dev_file:
        dev, dev_records = load(dc.dev_file, dc.dev_split, dc.max_dev_samples, "dev")
    return train, dev, train_records, dev_records


def run_context(config: DistillConfig, *, need_teacher: bool = True, teacher=None, student=None) -> Context | None:
    """The context of a run: the smaller of the teacher's (when it is used) and the student's number of
    positions (the teacher scores the same sequences), read from the loaded models when given, else from
    their config files (no weights loaded); None when neither names one."""
    mc = config.model
    opts = {"local_files_only": mc.local_files_only, "trust_remote_code": mc.trust_remote_code}

    def one(spec, model, what):
        if spec is None:
            return None
        name = f"the {what} '{spec}'"
        return context_of(model, name) if model is not None else read_context(spec, name, **opts)

    contexts = [one(mc.student, student, "student")]
    if need_teacher:
        contexts.append(one(mc.teacher, teacher, "teacher"))
    return smallest(contexts)


def fit_to_context(config: DistillConfig, *, need_teacher: bool = True, stages: list[Stage] | None = None,
                   teacher=None, student=None, ranking: bool = False) -> Fit | None:
    """Check the run's lengths against its context (:func:`run_context`) and put the effective values
    into ``config`` in place: a given length that does not fit is a ConfigError naming the flag and the
    model; defaults that do not fit are clipped, in one warning (see :mod:`pocl.context_length`).
    Idempotent: a second call on a fitted config changes and logs nothing."""
    context = run_context(config, need_teacher=need_teacher, teacher=teacher, student=student)
    return fit_distill_config(config, context, stages=stages, ranking=ranking)


def load_models(config: DistillConfig, *, need_teacher: bool = True):
    """Tokenizer, teacher (frozen) and student, with the tokenizer and vocabulary checks.

    The lengths of ``config`` are checked against the models' context first (from their config files,
    before any weights are read) and again once they are loaded: the effective (clipped) lengths are put
    into ``config`` in place (:func:`fit_to_context`)."""
    mc = config.model
    if mc.student is None:
        raise ConfigError("model.student: no student given")
    device = _device(config)
    opts = dict(local_files_only=mc.local_files_only, trust_remote_code=mc.trust_remote_code)
    # Every path is checked before any model is read (a mistyped or wrong folder fails in a second,
    # without a hub lookup); then each model is validated on load (manifest, files, finite weights).
    tokenizer = load_tokenizer(mc.tokenizer or mc.student, what="tokenizer" if mc.tokenizer else "student", **opts)
    if need_teacher and mc.teacher is not None:
        split_model_spec(mc.teacher, what="teacher")
    split_model_spec(mc.student, what="student")
    fit_to_context(config, need_teacher=need_teacher)  # a length that cannot fit stops before the weights are read
    if need_teacher and mc.teacher is not None and mc.tokenizer is None:
        check_tokenizers(load_tokenizer(mc.teacher, what="teacher", **opts), tokenizer)
    teacher = None
    if need_teacher and mc.teacher is not None:
        teacher = freeze_teacher(load_model(mc.teacher, dtype=resolve_dtype(mc.teacher_dtype, device),
                                            attn_implementation=mc.attn_implementation, what="teacher", **opts))
    # The student keeps float32 master weights; mixed precision is applied by autocast.
    student = load_model(mc.student, dtype=torch.float32, attn_implementation=mc.attn_implementation,
                         what="student", **opts)
    # The loaded models' own configs (the same as their files': nothing changes then).
    fit_to_context(config, need_teacher=need_teacher, teacher=teacher, student=student)
    vocab = shared_vocab_size(teacher, student, tokenizer)
    if mc.lora_r > 0:
        from pocl.models import apply_lora

        # The adapters' random initialisation comes from the run's seed, not from whatever the
        # global RNG holds at this point: the same config gives the same run (and resumes exactly).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed)
            student = apply_lora(student, r=mc.lora_r, alpha=mc.lora_alpha, dropout=mc.lora_dropout,
                                 target_modules=mc.lora_target_modules)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        log.info("LoRA student: %d trainable parameters (rank %d)", trainable, mc.lora_r)
    return tokenizer, teacher, student, vocab


def load_stage_teachers(config: DistillConfig, inputs: RunInputs, stages: list[Stage]) -> RunInputs:
    """``inputs`` with the teachers that ``stages`` name (progressive distillation; none: ``inputs`` as they are).

    Each is checked like model.teacher: its path before any weights are read, its tokenizer against the run's
    (unless --tokenizer is given), its context against the run's lengths, its vocabulary against the student's,
    and its LM head against the fused loss path. Their fingerprints go to ``fingerprints["stage_teachers"]``
    (a resume with another teacher for a stage is refused)."""
    specs = sorted({s.teacher for s in stages if s.teacher is not None})
    if not specs:
        return inputs
    if inputs.teacher is None:
        raise ConfigError(f"stage teacher {specs[0]}: loss.method {config.loss.method} trains without a teacher")
    mc = config.model
    opts = {"local_files_only": mc.local_files_only, "trust_remote_code": mc.trust_remote_code}
    device = _device(config)
    loaded: dict[str, torch.nn.Module] = {}
    for spec in specs:
        what = f"stage teacher {spec}"
        split_model_spec(spec, what=what)
        if mc.tokenizer is None:
            check_tokenizers(load_tokenizer(spec, what=what, **opts), inputs.tokenizer, teacher_name=what)
        model = freeze_teacher(load_model(spec, dtype=resolve_dtype(mc.teacher_dtype, device),
                                          attn_implementation=mc.attn_implementation, what=what, **opts))
        context = context_of(model, f"the {what}")
        if context is not None and context.length < config.data.max_length:  # the data are tokenized already
            raise ConfigError(f"{what}: a context of {context.length} positions, below data.max_length "
                              f"{config.data.max_length}; give --max-length {context.length} or less")
        vocab = shared_vocab_size(model, inputs.student, inputs.tokenizer)
        if vocab != inputs.vocab_size:
            raise ModelError(f"{what}: a vocabulary of {vocab} shared rows, but the run's teacher and student share "
                             f"{inputs.vocab_size}; every teacher must cover the same vocabulary")
        if inputs.fused and not decide_fused(config, model, None, vocab):
            raise ModelError(f"{what}: its logits cannot be computed from its hidden states, but the run's other "
                             "models use the fused loss path; give --loss-path logits")
        loaded[spec] = model
    log.info("progressive distillation: %s", "; ".join(
        f"{s.name}: {s.teacher or 'model.teacher'}" for s in stages))
    fingerprints = dict(inputs.fingerprints, stage_teachers={k: model_fingerprint(k, m) for k, m in loaded.items()})
    return dataclasses.replace(inputs, stage_teachers=loaded, fingerprints=fingerprints)


def decide_fused(config: DistillConfig, teacher, student, vocab: int) -> bool:
    path = config.loss.loss_path
    if path == "logits":
        return False
    problems = []
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        try:
            ok, diff = check_fused_head(model, LMHead.from_model(model, vocab))
        except ModelError as exc:
            ok, diff = False, str(exc)
        if not ok:
            problems.append(f"{name}: {diff}")
    if problems:
        if path == "fused":
            raise ModelError("loss.loss_path=fused, but logits computed from hidden states do not match the model's "
                             "own logits (" + "; ".join(problems) + "); use --loss-path logits")
        log.warning("falling back to full logits (more memory): the output layer cannot be reproduced from "
                    "hidden states (%s)", "; ".join(problems))
        return False
    return True


def prepare_run(config: DistillConfig, *, need_teacher: bool = True) -> RunInputs:
    tokenizer, teacher, student, vocab = load_models(config, need_teacher=need_teacher)
    train, dev, train_records, dev_records = load_data(config, tokenizer)
    fused = decide_fused(config, teacher, student, vocab)
    mc = config.model
    fingerprints = {
        "teacher": model_fingerprint(mc.teacher, teacher) if teacher is not None else None,
        "student_init": model_fingerprint(mc.student, student),
    }
    return RunInputs(tokenizer, teacher, student, train, dev, vocab, fused, fingerprints, train_records, dev_records)


def kd_stages(config: DistillConfig) -> list[Stage]:
    """Plain KD: one stage over the whole training set with the loss config's T and alpha."""
    lc, tc = config.loss, config.train
    return [Stage(name="kd", epochs=tc.epochs, max_steps=tc.max_steps, temperature=lc.temperature,
                  alpha=lc.alpha, skew=lc.skew)]


def check_supported_distribution(accelerator) -> None:
    """pocl runs single-process, data-parallel (DDP) and fully sharded (``--parallelism fsdp2``, which
    pocl applies itself, the same on CPU and GPU). accelerate's own FSDP or DeepSpeed wrapping (from an
    ``accelerate launch --config_file`` with a ``fsdp_config`` or ``deepspeed_config``) is refused: its
    checkpoints and optimizer handling are not pocl's, and a checkpoint of partial weights is worse than
    an error. The message names what to use instead."""
    kind = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    fsdp2 = ("use pocl's own FSDP2 instead: --parallelism fsdp2 with --num-processes N (or `accelerate launch "
             "--multi_gpu -m pocl distill --parallelism fsdp2 ...` without an FSDP or DeepSpeed config)")
    if kind == "DEEPSPEED" and not torch.cuda.is_available():
        raise ConfigError(f"DeepSpeed ZeRO (accelerate's deepspeed config) needs CUDA GPUs and this machine has "
                          f"none; to shard the student on CPU, {fsdp2}. See docs/distributed.md")
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise ConfigError(f"{kind} through accelerate is not supported by this version of pocl: {fsdp2}; "
                          "see docs/distributed.md")


def check_resume_before_ranking(config: DistillConfig, inputs: RunInputs, accelerator) -> None:
    """Refuse a resume that the trainer would refuse, before the expensive steps that come first (the
    ranking pass, the teacher's SeqKD answers) run and rewrite their files: a changed student, data or
    setting is reported at once and nothing in the output folder is touched. The stage fingerprint
    (known only after ranking) and, for seqkd, the training targets are checked by the trainer."""
    tc = config.train
    if tc.resume == "never" or tc.overwrite or tc.allow_config_change:
        return

    def fingerprints() -> dict[str, Any]:
        """The run's fingerprints known before ranking (computed only when there is a checkpoint)."""
        dev = inputs.dev_data if inputs.dev_data is not None and len(inputs.dev_data) > 0 else None
        found = dict(inputs.fingerprints, dev_data=tokenized_fingerprint(dev))
        if config.loss.method != "seqkd":
            found["train_data"] = tokenized_fingerprint(inputs.train_data)
        return found

    check_resume_before_training(Path(tc.output_dir), config=config, fingerprints=fingerprints,
                                 num_processes=accelerator.num_processes)


def resolve_selection(config: DistillConfig, inputs: RunInputs) -> int:
    """How ``best/`` will be chosen, said in the log; returns the number of dev samples whose answers
    are generated at every dev evaluation (``train.dev_rouge_samples`` 0 with dev ROUGE-L as the
    selection metric: all of them)."""
    tc = config.train
    if inputs.dev_data is None or len(inputs.dev_data) == 0:
        log.info("no dev set: no dev evaluation and no best/ model (final/ is the run's model); give --dev-file "
                 "to choose best/ by %s", tc.selection_metric)
        return 0
    n = selection.dev_rouge_count(tc, len(inputs.dev_records or []))
    metric = selection.metric(tc.selection_metric)
    log.info("best/: the student with the best %s (%s) over the dev evaluations%s", metric.name, metric.direction,
             f"; dev ROUGE-L generates answers to {n} of {len(inputs.dev_data)} dev prompts (at most "
             f"{tc.dev_rouge_max_new_tokens} new tokens) at every dev evaluation" if n else "")
    return n


def make_trainer(config: DistillConfig, inputs: RunInputs, stages: list[Stage], *, accelerator=None,
                 stage_hooks=()) -> DistillTrainer:
    """The trainer of a run (its dev ROUGE-L samples: :func:`pocl.training.selection.dev_rouge_count`)."""
    trainer = DistillTrainer(config=config, student=inputs.student, tokenizer=inputs.tokenizer,
                             teacher=inputs.teacher, train_data=inputs.train_data, dev_data=inputs.dev_data,
                             stages=stages, vocab_size=inputs.vocab_size, fused=inputs.fused,
                             fingerprints=inputs.fingerprints, accelerator=accelerator,
                             dev_records=inputs.dev_records, stage_teachers=inputs.stage_teachers,
                             stage_hooks=stage_hooks)
    if inputs.dev_data is not None and len(inputs.dev_data) > 0:
        trainer.summary_extra["dev_rouge_samples"] = len(trainer.dev_records)
    return trainer


def curriculum_overrides(config: DistillConfig, stages: list[Stage]) -> tuple[list[Stage], dict[str, Any]]:
    """Apply the global settings given with the curriculum (``DistillConfig.curriculum_flag_overrides``):
    ``--alpha``/``--temperature`` hold in every stage, ``--max-steps`` caps the whole run. Each is
    logged; the returned record goes to summary.json (``curriculum_overrides``)."""
    from pocl.curriculum.schedule import cap_total_steps, override_every_stage

    flags = config.curriculum_flag_overrides()
    record: dict[str, Any] = {}
    cc = config.curriculum
    for key, start, end, per_stage in (("alpha", cc.alpha_start, cc.alpha_end, "--alpha-start/--alpha-end"),
                                       ("temperature", cc.t_start, cc.t_max, "--t-start/--t-max")):
        if key in flags:
            log.warning("--%s %g (loss.%s) overrides every stage of the curriculum: %s %g in all %d stages instead of "
                        "%g -> %g (per stage: %s, curriculum.stages[i].%s)", key, flags[key], key, key, flags[key],
                        len(stages), start, end, per_stage, key)
            stages = override_every_stage(stages, **{key: flags[key]})
            record[key] = flags[key]
    if "max_steps" in flags:
        planned = sum(st.total_steps(len(st.sample_ids), config.train.batch_size) for st in stages)
        stages, notes = cap_total_steps(stages, flags["max_steps"], config.train.batch_size)
        if notes:
            log.warning("--max-steps %d caps the whole curriculum (%d planned optimizer steps): %s", flags["max_steps"],
                        planned, "; ".join(notes))
        else:
            log.info("--max-steps %d: the curriculum's %d planned optimizer steps are within the cap",
                     flags["max_steps"], planned)
        record["max_steps"] = flags["max_steps"]
        record["max_steps_changes"] = notes
    return stages, record


def curriculum_stages(config: DistillConfig, inputs: RunInputs) -> tuple[list[Stage], dict[str, Any]]:
    """POCL: rank the training data with the initial student (or reuse the ranking file), then the
    Baby Step stages, with the global settings given with the curriculum applied
    (:func:`curriculum_overrides`; the record is in ``info["overrides"]``). Runs before the trainer
    restores any checkpoint, so the measured and fingerprinted student is always the initial one."""
    from pocl.curriculum import format_schedule, prepare_curriculum

    stages, _, info = prepare_curriculum(config, records=inputs.train_records, tokenizer=inputs.tokenizer,
                                         model=inputs.student, model_fingerprint=inputs.fingerprints["student_init"],
                                         device=_device(config), teacher=inputs.teacher,
                                         teacher_fingerprint=inputs.fingerprints.get("teacher"))
    stages, overrides = curriculum_overrides(config, stages)
    log.info("POCL schedule:\n%s", format_schedule(stages, len(inputs.train_data),
                                                    batch_size=config.train.batch_size))
    info = {k: v for k, v in info.items() if k != "meta"}  # the stamp inputs stay in the ranking's meta file
    # What producing the ranking cost, also when it was reused now (from the measurement's timings).
    info["measure_seconds"] = sum(float(v) for v in (info.get("timings") or {}).values())
    info["overrides"] = overrides
    return stages, info


def distill(config: DistillConfig, *, stages: list[Stage] | None = None, inputs: RunInputs | None = None,
            accelerator=None) -> TrainResult:
    """Train the student of ``config``: plain KD, or the POCL curriculum when
    ``config.curriculum.curriculum == "pocl"`` (rank, then every stage in this process).
    Returns where the final and best models are and the run summary."""
    from pocl.launch import make_accelerator

    if stages is None:
        config.curriculum_flag_overrides()  # a refused setting (--epochs with the curriculum) stops before any work
        unused = config.unused_curriculum_settings()
        if unused:
            log.warning("not used without --curriculum pocl (plain KD over all the data): %s", ", ".join(unused))
    # No command writes into a folder it did not create, nor into its own input models (docs/reliability.md).
    models = [("teacher", config.model.teacher), ("student", config.model.student)]
    output_dirs.check_output_dir(config.train.output_dir, inputs=models, kind="run")
    if config.curriculum.ranking_file:
        output_dirs.check_ranking_file(config.curriculum.ranking_file, inputs=models,
                                data=[config.data.train_file, config.data.dev_file])
    if config.loss.teacher_cache_dir:
        output_dirs.check_output_dir(config.loss.teacher_cache_dir, inputs=models, kind="teacher-cache",
                              flag="--teacher-cache-dir")
    # The lengths against the models' context, before anything is loaded: a given length that cannot fit
    # stops here; defaults that do not fit are clipped (one warning) in this run's own copy of the config,
    # which the trainer records (config.yaml).
    config = copy.deepcopy(config)
    need_teacher = config.loss.method != "sft"
    context_fit = fit_to_context(config, need_teacher=need_teacher, stages=stages,
                                 teacher=inputs.teacher if inputs is not None else None,
                                 student=inputs.student if inputs is not None else None)
    if inputs is not None and context_fit is not None and {"data.max_length", "data.max_prompt_length"} & set(
            context_fit.clipped):
        raise ConfigError("the given run inputs were tokenized with lengths beyond the models' context ("
                          + ", ".join(f"{k} {old}" for k, (old, _) in context_fit.clipped.items()
                                      if k.startswith("data.")) + f"): prepare them with {context_fit.context.length} "
                          "positions or less (pocl.pipeline.fit_to_context(config) sets the lengths that fit)")
    # Created first: it sets up the process group that the ranking pass also uses.
    accelerator = accelerator or make_accelerator(config)
    check_supported_distribution(accelerator)
    inputs = inputs or prepare_run(config, need_teacher=need_teacher)
    if config.loss.teacher_signal_file:  # an imported teacher signal: checked before any work, fingerprinted
        from pocl.training.teacher_signal_io import preflight
        inputs = preflight(config, inputs)
    resolve_selection(config, inputs)  # says how best/ will be chosen, before the ranking pass
    # From here on files are written into the run folder: one pocl process at a time (output_dirs.run_lock).
    with output_dirs.run_lock(config.train.output_dir):
        return _distill_locked(config, stages, inputs, accelerator, context_fit)


def _distill_locked(config: DistillConfig, stages: list[Stage] | None, inputs: RunInputs, accelerator,
                    context_fit: Fit | None) -> TrainResult:
    """The part of :func:`distill` that writes into the run folder (under its lock)."""
    check_resume_before_ranking(config, inputs, accelerator)
    from pocl.baselines import apply_method

    # SeqKD: the training targets become the teacher's answers (generated once, cached, stamped).
    inputs, method_info = apply_method(config, inputs, accelerator=accelerator, device=_device(config))
    extra: dict[str, Any] = {"curriculum": config.curriculum.curriculum, "method": config.loss.method}
    if method_info:
        extra["seqkd"] = method_info
    if context_fit is not None and context_fit.clipped:
        extra["context"] = context_fit.record()  # the model's context and the defaults clipped to fit it
    if stages is None and config.curriculum.curriculum == "pocl":
        stages, info = curriculum_stages(config, inputs)
        overrides = info.pop("overrides")
        extra.update(measurer=config.curriculum.measurer, ranking=info)
        if overrides:
            extra["curriculum_overrides"] = overrides
    stages = stages or kd_stages(config)
    inputs = load_stage_teachers(config, inputs, stages)
    hooks = []
    if config.curriculum.curriculum == "pocl" and config.curriculum.remeasure:
        from pocl.curriculum.remeasure import StageRemeasure

        hooks.append(StageRemeasure(config, records=inputs.train_records, tokenizer=inputs.tokenizer,
                                    teacher=inputs.teacher))
    trainer = make_trainer(config, inputs, stages, accelerator=accelerator, stage_hooks=hooks)
    trainer.summary_extra.update(extra, command=hub.command_line())
    return hub.push_after_run(config, trainer.train(), main=accelerator.is_main_process)
