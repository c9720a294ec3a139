"""``pocl rank``: rank a data set by difficulty for the initial student (the POCL measurer), or reuse the ranking.
The measurers teacher_kl, teacher_entropy and rrf_teacher also need the teacher (``--teacher``)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from pocl.commands.flags import add_section_flags, build_config
from pocl.config import CurriculumConfig, DataConfig, ModelConfig, TrainConfig
from pocl.errors import ConfigError

TRAIN_FLAGS = ("output_dir", "seed", "progress")


def register(sub) -> None:
    p = sub.add_parser(
        "rank", help="Rank samples from easy to hard for the student (the POCL difficulty measurer).",
        description="Score every sample of --train-file with the initial student (its loss on the reference and "
                    "the ROUGE-L of its near-greedy answer), fuse the two ranks (RRF) and write the order to "
                    "--ranking-file (default OUTPUT_DIR/ranking.jsonl). A file that still matches the student, "
                    "data and settings is reused; a change of measurer only re-ranks the stored signals. Takes "
                    "the same --config file and flags as `pocl distill`. The teacher is used only by the measurers "
                    "teacher_kl, teacher_entropy and rrf_teacher, which need --teacher (with the student's "
                    "tokenizer): one extra teacher forward pass over the data, no generation.")
    p.add_argument("--config", metavar="FILE", help="YAML config file, the same as `pocl distill --config` (the "
                   "model, data and curriculum sections are used, and train.output_dir, train.seed and "
                   "train.progress; the other distill settings are accepted and not needed here; an 'eval:' "
                   "section, read by `pocl eval`, is ignored).")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    add_section_flags(p, ModelConfig, "model options")
    add_section_flags(p, DataConfig, "data options")
    add_section_flags(p, CurriculumConfig, "curriculum options")
    add_section_flags(p, TrainConfig, "output options",
                      exclude=[f.name for f in dataclasses.fields(TrainConfig) if f.name not in TRAIN_FLAGS])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch, transformers and the models: imported here so that `pocl rank --help` does not load them.
    import torch

    from pocl.curriculum import (load_or_compute_ranking, measurer_needs_teacher, ranking_data_settings, ranking_path,
                                 summarize_quartiles)
    from pocl.fingerprints import model_fingerprint
    from pocl.pipeline import fit_to_context, load_data, load_models

    config = build_config(args)
    if config.model.student is None:
        raise ConfigError("model.student: give --student (the initial student ranks the samples)")
    if config.data.train_file is None:
        raise ConfigError("data.train_file: give --train-file (the samples to rank)")
    measurer = config.curriculum.measurer
    use_teacher = measurer_needs_teacher(measurer)
    if use_teacher and config.model.teacher is None:
        raise ConfigError(f"model.teacher: the measurer {measurer} (curriculum.measurer) ranks with the teacher's "
                          "signals; give --teacher PATH (a model with the student's tokenizer), or choose a "
                          "student-only measurer (rrf, rouge, loss, random, reverse)")
    # Only the training data is ranked; the same loader as `pocl distill` keeps the stamps identical.
    config = config.replace(data={"dev_file": None})
    path = ranking_path(config)
    # lengths vs the student's (and the teacher's, when it is used) context, before loading
    fit_to_context(config, need_teacher=use_teacher, ranking=True)
    check_rank_outputs(config, use_teacher=use_teacher)  # before the models are loaded
    t0 = time.perf_counter()
    # The teacher as `pocl distill` loads it (tokenizer check, dtype, frozen): the same fingerprint.
    tokenizer, teacher, student, _ = load_models(config, need_teacher=use_teacher)
    _, _, records, _ = load_data(config, tokenizer)
    ranking, info = load_or_compute_ranking(
        path, records=records, tokenizer=tokenizer, model=student,
        model_fingerprint=model_fingerprint(config.model.student, student), curriculum=config.curriculum,
        data_settings=ranking_data_settings(config.data), seed=config.train.seed, progress=config.train.progress,
        device=torch.device("cpu" if config.model.cpu or not torch.cuda.is_available() else "cuda"),
        teacher=teacher, teacher_fingerprint=model_fingerprint(config.model.teacher, teacher) if use_teacher else None)
    seconds = time.perf_counter() - t0
    print(f"ranking: {path}")
    print(f"{len(ranking)} samples ranked by {config.curriculum.measurer} ({info['action']}: {info['reason']})")
    for signal, counts in (info.get("batches") or {}).items():
        word = "generation" if signal == "rouge_l" else signal  # loss, teacher
        print(f"{word} batches: {counts['measured']} measured now, {counts['reused']} reused from an interrupted run")
    timings = {k: v for k, v in info["timings"].items() if k in ("loss_seconds", "teacher_seconds", "generate_seconds")}
    spent = ", ".join(f"{k.replace('_seconds', '')} {v:.1f} s" for k, v in timings.items())
    when = "measured earlier" if info["reused"] else "measurement"
    print(f"time: {seconds:.1f} s in all, models and data loading included" + (f" ({when}: {spent})" if spent else ""))
    rows = summarize_quartiles(ranking)
    # The teacher columns only when the ranking holds the teacher signals (the table is unchanged otherwise).
    extra = [k for k in ("teacher_kl", "teacher_entropy") if any(row[k] is not None for row in rows)]
    print(f"\n{'quartile':<10} {'ranks':>13} {'ROUGE-L':>9} {'loss':>9}" + "".join(f" {k:>15}" for k in extra))
    for row in rows:
        ranks = "-" if row["ranks"] is None else f"{row['ranks'][0]}-{row['ranks'][1]}"
        rouge = "-" if row["rouge_l"] is None else f"{row['rouge_l']:.2f}"
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        cols = "".join(f" {'-' if row[k] is None else format(row[k], '.4f'):>15}" for k in extra)
        print(f"Q{row['part']:<9} {ranks:>13} {rouge:>9} {loss:>9}" + cols)
    return 0


def check_rank_outputs(config, *, use_teacher: bool = False) -> None:
    """Refuse to write where `pocl rank` must not (ConfigError, exit 2): a --ranking-file that would replace
    a file pocl did not write or lies in the student's (or the used teacher's) folder, or (without
    --ranking-file) an --output-dir that is not empty and not a pocl run folder, or is, lies inside or
    contains the student (or the teacher)."""
    from pocl.training.output_dirs import check_output_dir, check_ranking_file

    inputs = [("student", config.model.student)]
    if use_teacher:
        inputs.append(("teacher", config.model.teacher))
    if config.curriculum.ranking_file:
        check_ranking_file(config.curriculum.ranking_file, inputs=inputs, data=[config.data.train_file])
    else:
        check_output_dir(config.train.output_dir, inputs=inputs, kind="run")
