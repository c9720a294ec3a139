"""The built-in default: everything from code, nothing downloaded, minutes on a laptop CPU.

1. The built-in task suite (``pocl.data.builtin``) is written as JSONL (train/dev/test) plus a
   separate small "pretraining" set for the student, and a byte-level BPE tokenizer is trained on it.
2. A small Llama-style teacher is trained on the suite (plain supervised fine-tuning, alpha = 0).
3. A smaller student is pre-trained briefly on the separate set: like a pretrained base model it
   knows the format a little but is much weaker than the teacher (a randomly initialised student
   would make the difficulty measure of the curriculum meaningless).
4. The student is distilled from the teacher with the POCL curriculum (the initial student ranks
   the training set; Baby Step stages), and, as a baseline, with plain KD over all the data for
   the same sample budget (the same number of passes over samples), with the same divergence.
5. Teacher, initial student and both distilled students are evaluated on the test split (the
   papers' protocol: sampling at T = 1 over five seeds, mean and std; and greedy decoding; exact
   match and ROUGE-L, also per difficulty level), and the scores are printed side by side and
   written to ``results.json``.

Steps 2 and 3 are skipped when their outputs already exist (re-running resumes where it stopped).

Every setting of ``pocl distill`` given on the command line or in its ``--config`` YAML file applies
to both runs of step 4, exactly as to a run of your own (docs/training.md, "Settings and the
curriculum"); ``--epochs``/``--stage-epochs`` set the lengths of the two runs (:func:`run_budgets`).
Both runs keep ``best/`` by dev ROUGE-L on the 192 dev samples (answers of at most 24 tokens).

Reproducibility: every random choice is seeded (the models' initialisation, the data order, the sampled
answers of the ranking, the dev evaluations and the test evaluation), so a rerun on the same machine with
the same torch build and the same number of torch threads gives the same figures, bit for bit. Another CPU
(other instruction set or BLAS kernels) or another thread count can round floats differently; the
trajectories then drift apart and the figures differ by about the spread over seeds. ``results.json``
records what decides this (:func:`numerics`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pocl.artifacts import atomic_write
from pocl.config import DistillConfig
from pocl.curriculum.schedule import same_budget_epochs, same_budget_stage_epochs
from pocl.data import (
    TEMPLATE_PHRASES,
    build_tokenizer,
    generate_suite,
    get_template,
    load_records,
    suite_texts,
    tokenize_records,
)
from pocl.generation import DecodingConfig
from pocl.training import checkpoint as ckpt
from pocl.training.stages import Stage
from pocl.training.trainer import DistillTrainer

log = logging.getLogger("pocl.builtin")


@dataclasses.dataclass
class BuiltinSettings:
    """Sizes of the built-in default (the test suite uses a smaller copy)."""

    n_train: int = 2400
    n_dev: int = 192
    n_test: int = 240
    n_student_pretrain: int = 960
    seed: int = 0
    vocab_size: int = 512
    teacher_arch: dict = dataclasses.field(default_factory=lambda: {
        "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6,
        "num_key_value_heads": 6})
    student_arch: dict = dataclasses.field(default_factory=lambda: {
        "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4})
    teacher_epochs: float = 12
    teacher_lr: float = 2e-3
    student_pretrain_epochs: float = 4
    student_pretrain_lr: float = 2e-3
    kd_epochs: float = 10
    kd_lr: float = 1e-3
    batch_size: int = 32
    micro_batch_size: int = 32
    max_length: int = 96
    max_prompt_length: int = 80
    eval_max_new_tokens: int = 24
    generation_batch_size: int = 64


def new_llama(arch: dict, vocab_size: int, tokenizer, seed: int):
    """A randomly initialised Llama of the built-in default (``arch``: BuiltinSettings.teacher_arch or
    .student_arch), seeded with ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **arch)
    return LlamaForCausalLM(cfg)


def prepare_suite(out: Path, s: BuiltinSettings):
    """Write the suite's JSONL files and the tokenizer (idempotent)."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    suite = generate_suite(s.n_train, s.n_dev, s.n_test, seed=s.seed)
    suite["student_pretrain"] = [dict(r, id=r["id"].replace("train", "pre")) for r in
                                 generate_suite(s.n_student_pretrain, 0, 0, seed=s.seed + 1)["train"]]
    paths = {}
    for split, rows in suite.items():
        path = data_dir / f"{split}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write(path, text)
        paths[split] = path
    tok_dir = out / "tokenizer"
    # Trained on the training split only, so that the vocabulary (and hence a trained teacher) does
    # not depend on the size of the student's pretraining set.
    tokenizer = build_tokenizer(suite_texts(suite["train"]), vocab_size=s.vocab_size, phrases=TEMPLATE_PHRASES)
    tokenizer.save_pretrained(tok_dir)
    return paths, tokenizer


def train_sft(model, tokenizer, train_file: Path, dev_file: Path | None, out_dir: Path, *, epochs: float, lr: float,
              s: BuiltinSettings, progress: bool, name: str) -> Path:
    """Supervised fine-tuning (alpha = 0: cross-entropy only) with the same trainer as KD."""
    final = out_dir / "final"
    try:
        ckpt.verify_folder(final)
        log.info("%s: reusing %s", name, final)
        return final
    except Exception as exc:  # noqa: BLE001 - no usable earlier output, whatever the reason: train it
        log.debug("%s: not reusing %s (%s)", name, final, exc)
    config = DistillConfig.from_dict({
        "data": {"max_length": s.max_length, "max_prompt_length": s.max_prompt_length},
        "loss": {"alpha": 0.0},
        "optim": {"lr": lr, "min_lr": lr * 0.05, "warmup_ratio": 0.05},
        # final/ is what the recipe uses; the dev CE is logged (choosing best/ by dev ROUGE-L would only add
        # generation time here)
        "train": {"output_dir": str(out_dir), "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size,
                  "epochs": epochs, "seed": s.seed, "progress": progress, "eval_every": 0, "log_every": 20,
                  "save_total_limit": 1, "selection_metric": "dev_ce"},
    })
    template = get_template("alpaca")
    train = tokenize_records(load_records(train_file).records, tokenizer, template, max_length=s.max_length,
                             max_prompt_length=s.max_prompt_length)
    dev = None
    if dev_file is not None:
        dev = tokenize_records(load_records(dev_file).records, tokenizer, template, max_length=s.max_length,
                               max_prompt_length=s.max_prompt_length)
    log.info("%s: training %.1fM parameters on %d samples for %g epochs", name,
             sum(p.numel() for p in model.parameters()) / 1e6, len(train), epochs)
    trainer = DistillTrainer(config=config, student=model, tokenizer=tokenizer, teacher=None, train_data=train,
                             dev_data=dev, stages=[Stage(name=name, epochs=epochs, alpha=0.0)],
                             vocab_size=len(tokenizer), fused=True)
    result = trainer.train()
    if result.status != "completed":
        raise KeyboardInterrupt
    return final


EVAL_SEEDS = (10, 20, 30, 40, 50)


def evaluate_models(models: dict[str, Path], test_file: Path, tokenizer, s: BuiltinSettings) -> dict[str, dict]:
    """Every model on the test split, twice: the evaluation protocol of the papers (sampling at
    T = 1, top-p 1, no top-k, no_repeat_ngram_size 6, seeds 10..50; mean and sample std over seeds)
    and greedy decoding. Exact match and ROUGE-L x 100, overall and per difficulty level."""
    from pocl.evaluation.runner import evaluate_records
    from pocl.models import load_model

    records = load_records(test_file).records
    levels = sorted({str(r.meta.get("level")) for r in records})
    common = {"template": get_template("alpaca"), "batch_size": s.generation_batch_size,
              "max_prompt_length": s.max_prompt_length}
    results = {}
    for name, path in models.items():
        model = load_model(str(path))
        t0 = time.perf_counter()
        sampled = evaluate_records(model, tokenizer, records, decoding=DecodingConfig(
            max_new_tokens=s.eval_max_new_tokens), seeds=EVAL_SEEDS, **common)
        greedy = evaluate_records(model, tokenizer, records, decoding=DecodingConfig.greedy(
            max_new_tokens=s.eval_max_new_tokens, no_repeat_ngram_size=0), seeds=[s.seed], **common)
        seconds = time.perf_counter() - t0
        by_level = {}
        for level in levels:  # mean over seeds of the per-level exact match
            idx = [i for i, r in enumerate(records) if str(r.meta.get("level")) == level]
            per_seed = [sum(sample.exact_match[k] for sample in (sampled.samples[i] for i in idx)) / len(idx)
                        for k in range(len(EVAL_SEEDS))]
            by_level[level] = sum(per_seed) / len(per_seed)
        results[name] = {
            "exact_match": sampled.exact_match, "exact_match_std": sampled.exact_match_std,
            "rouge_l": sampled.rouge_l, "rouge_l_std": sampled.rouge_l_std,
            "greedy_exact_match": greedy.exact_match, "greedy_rouge_l": greedy.rouge_l,
            "exact_match_by_level": by_level, "seeds": list(EVAL_SEEDS), "generation_seconds": seconds,
            "path": str(path)}
    return results


def numerics() -> dict[str, Any]:
    """What decides the float rounding of a run, hence whether another machine reproduces its figures bit for
    bit: the torch build, its CPU kernels (instruction set) and BLAS, and the number of torch threads. The
    same values on the same CPU give the same figures; any difference can change them (by about the spread
    over seeds)."""
    import platform

    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "machine": platform.machine()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        pass
    info["mkl"] = torch.backends.mkl.is_available()
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run_config(values: dict[str, Any], user: dict[str, dict[str, Any]], output_dir: Path,
                extra: dict[str, dict[str, Any]] | None = None) -> DistillConfig:
    """The recipe's ``values`` < the user's settings < ``extra`` (what the run must be)."""
    merged = {k: dict(v) for k, v in values.items()}
    for section, items in list(user.items()) + list((extra or {}).items()):
        merged.setdefault(section, {}).update(items)
    merged.setdefault("train", {})["output_dir"] = str(output_dir)
    return DistillConfig.from_dict(merged)


def user_settings(config: DistillConfig | None, user_overrides: dict[str, dict[str, Any]] | None
                  ) -> dict[str, dict[str, Any]]:
    """What the user gave: the given values of ``config`` (a YAML file and flags, as `pocl distill`
    builds it), then ``user_overrides`` on top (Python API)."""
    user = config.given_values() if config is not None else {}
    for section, items in (user_overrides or {}).items():
        user.setdefault(section, {}).update(items)
    return user


DIFFERENT_BUDGETS = "--epochs and --stage-epochs as given: NOT the same sample budget"


def run_budgets(user: dict[str, dict[str, Any]], n_stages: int, s: BuiltinSettings,
                fractions: Sequence[float | None] | None = None) -> tuple[float, float, str]:
    """(KD epochs, POCL epochs per stage, how they were chosen). The same sample budget by default
    (:func:`pocl.curriculum.same_budget_stage_epochs`: n equal cumulative slices cover (n + 1) / 2 passes
    per stage epoch; ``fractions``, the stages' own fractions, change that). ``--epochs`` sets the KD
    run's epochs (and POCL's budget from it), ``--stage-epochs`` POCL's (and KD's from it); both: as given."""
    epochs = user.get("train", {}).get("epochs")
    stage_epochs = user.get("curriculum", {}).get("stage_epochs")
    if epochs is None and stage_epochs is None:
        return s.kd_epochs, same_budget_stage_epochs(s.kd_epochs, n_stages, fractions), "the same sample budget"
    if stage_epochs is None:
        return (float(epochs), same_budget_stage_epochs(epochs, n_stages, fractions),
                "the same sample budget, from --epochs")
    if epochs is None:
        return (same_budget_epochs(stage_epochs, n_stages, fractions), float(stage_epochs),
                "the same sample budget, from --stage-epochs")
    same = abs(same_budget_stage_epochs(epochs, n_stages, fractions) - float(stage_epochs)) < 1e-9
    return float(epochs), float(stage_epochs), "the same sample budget" if same else DIFFERENT_BUDGETS


def run_builtin_default(config: DistillConfig | None = None, *, user_overrides: dict[str, dict[str, Any]] | None = None,
                        settings: BuiltinSettings | None = None) -> dict[str, Any]:
    """Run the whole built-in default (POCL and the plain KD baseline); returns and writes the results.

    ``config``: what `pocl distill` built from ``--config`` and the flags; its *given* values
    (:meth:`DistillConfig.given_values`) apply on top of the recipe's, to both runs, exactly as they
    would to a run of your own (``--alpha``/``--temperature``/``--max-steps`` with the curriculum:
    docs/curriculum.md). ``user_overrides``: more ``{section: {field: value}}`` on top (Python API).
    ``--epochs`` and ``--stage-epochs`` set the two runs' lengths (:func:`run_budgets`); ``--curriculum``
    is not used (both runs are always made; said in the log)."""
    from pocl.errors import ConfigError
    from pocl.launch import world_size_from_env
    from pocl.pipeline import distill

    user = user_settings(config, user_overrides)
    mine = [f"{section}.{name}" for section, name in (("model", "teacher"), ("model", "student"),
                                                       ("data", "train_file"), ("data", "dev_file"))
            if user.get(section, {}).get(name) is not None]
    if mine:  # the built-in default makes its own models and data; it never takes them from the user
        raise ConfigError(f"{', '.join(mine)}: the built-in default makes its own models and data; give "
                          "--teacher, --student and --train-file for a run of your own, or none of them")
    if (world_size_from_env() or 1) > 1 or user.get("train", {}).get("num_processes", 1) > 1:
        raise ConfigError("train.num_processes: the built-in default runs in one process; use --num-processes with "
                          "your own --teacher/--student/--train-file")
    s = settings or BuiltinSettings()
    out = Path(user.get("train", {}).get("output_dir", "runs/default"))
    progress = user.get("train", {}).get("progress", True)
    if "curriculum" in user.get("curriculum", {}):
        log.warning("curriculum.curriculum=%s is not used: the built-in default always runs POCL and the plain KD "
                    "baseline side by side", user["curriculum"]["curriculum"])
    user.get("curriculum", {}).pop("curriculum", None)
    t_start = time.perf_counter()
    print(f"pocl built-in default -> {out}/")
    print("  1/5 writing the built-in task suite and training its tokenizer")
    paths, tokenizer = prepare_suite(out, s)
    timings: dict[str, float] = {}

    # Both runs' configs first: a refused setting stops before anything is trained.
    teacher_dir, student_dir = out / "teacher" / "final", out / "student-base" / "final"
    values = {
        "model": {"teacher": str(teacher_dir), "student": str(student_dir)},
        "data": {"train_file": str(paths["train"]), "dev_file": str(paths["dev"]), "max_length": s.max_length,
                 "max_prompt_length": s.max_prompt_length},
        "optim": {"lr": s.kd_lr, "min_lr": s.kd_lr * 0.05},
        # best/ by dev ROUGE-L (the default) on all dev samples, answers as long as the test answers
        "train": {"batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size, "seed": s.seed,
                  "log_every": 20, "save_total_limit": 1, "dev_rouge_max_new_tokens": s.eval_max_new_tokens,
                  "eval_batch_size": s.generation_batch_size},
    }
    ranking = {"rank_max_new_tokens": s.eval_max_new_tokens, "rank_batch_size": s.generation_batch_size}
    curriculum = _run_config(dict(values, curriculum=ranking), user, out / "pocl").curriculum
    n_stages = curriculum.num_stages
    kd_epochs, stage_epochs, budget = run_budgets(user, n_stages, s, [o.get("fraction") for o in curriculum.stages])
    # Plain KD: the curriculum settings are POCL's only. POCL: the KD run's --epochs became stage_epochs.
    kd_user = {k: v for k, v in user.items() if k != "curriculum"}
    kd_config = _run_config(values, kd_user, out / "kd", {"train": {"epochs": kd_epochs},
                                                          "curriculum": {"curriculum": "none"}})
    pocl_user = {k: ({f: x for f, x in v.items() if f != "epochs"} if k == "train" else v) for k, v in user.items()}
    pocl_config = _run_config(dict(values, curriculum=ranking), pocl_user, out / "pocl",
                              {"curriculum": {"curriculum": "pocl", "stage_epochs": stage_epochs}})
    pocl_config.curriculum_flag_overrides()  # a refused combination stops before the runs
    if budget == DIFFERENT_BUDGETS:
        log.warning("%s (%g KD epochs vs %g epochs in each of %d stages)", budget, kd_epochs, stage_epochs, n_stages)
    print("  2/5 training the teacher on the suite (supervised fine-tuning)")
    t0 = time.perf_counter()
    train_sft(new_llama(s.teacher_arch, len(tokenizer), tokenizer, s.seed), tokenizer, paths["train"], paths["dev"],
              out / "teacher", epochs=s.teacher_epochs, lr=s.teacher_lr, s=s, progress=progress, name="teacher")
    timings["teacher_seconds"] = time.perf_counter() - t0

    print("  3/5 pre-training the smaller student briefly on a separate set (the 'base model')")
    t0 = time.perf_counter()
    train_sft(new_llama(s.student_arch, len(tokenizer), tokenizer, s.seed + 1), tokenizer, paths["student_pretrain"],
              None, out / "student-base", epochs=s.student_pretrain_epochs, lr=s.student_pretrain_lr, s=s,
              progress=progress, name="student-base")
    timings["student_base_seconds"] = time.perf_counter() - t0

    lc = kd_config.loss
    print(f"  4/5 POCL: ranking the training set with the initial student, then {n_stages} stages "
          f"({lc.divergence}, {stage_epochs:.3g} epochs per stage; {budget})")
    t0 = time.perf_counter()
    pocl_result = distill(pocl_config)
    timings["pocl_seconds"] = time.perf_counter() - t0
    if pocl_result.status != "completed":
        print("interrupted: run the same command again to resume")
        return {"status": pocl_result.status}
    print(f"  5/5 plain KD baseline ({kd_config.train.epochs:g} epochs over all data; {budget})")
    t0 = time.perf_counter()
    kd_result = distill(kd_config)
    timings["kd_seconds"] = time.perf_counter() - t0
    if kd_result.status != "completed":
        print("interrupted: run the same command again to resume")
        return {"status": kd_result.status}

    print("  evaluating on the test split (sampled over 5 seeds, and greedy)")
    t0 = time.perf_counter()
    # Each student as the spec selects it: best/ by dev ROUGE-L (final/ when no dev evaluation chose one).
    scores = evaluate_models({"teacher": teacher_dir, "student (initial)": student_dir,
                              f"student, {lc.divergence} KD": kd_result.best_dir or kd_result.final_dir,
                              f"student, {lc.divergence} KD + POCL": pocl_result.best_dir or pocl_result.final_dir},
                             paths["test"], tokenizer, s)
    timings["eval_seconds"] = time.perf_counter() - t0
    timings["total_seconds"] = time.perf_counter() - t_start
    ranking = pocl_result.summary.get("ranking", {})
    timings["pocl_ranking_seconds"] = ranking.get("measure_seconds", 0.0)  # also when the ranking was reused
    timings["pocl_training_seconds"] = pocl_result.summary["train_seconds"]
    timings["kd_training_seconds"] = kd_result.summary["train_seconds"]
    import yaml

    # the configs the runs saved (config.yaml)
    run_configs = {name: yaml.safe_load((out / name / "config.yaml").read_text(encoding="utf-8"))
                   for name in ("kd", "pocl")}
    report = {"status": "completed", "settings": dataclasses.asdict(s), "user_settings": user,
              "numerics": numerics(), "budget": budget, "kd_config": run_configs["kd"],
              "pocl_config": run_configs["pocl"], "scores": scores, "timings": timings,
              "kd_summary": kd_result.summary, "pocl_summary": pocl_result.summary}
    atomic_write(out / "results.json", json.dumps(report, indent=2, default=str))
    _print_scores(scores, timings, out)
    return report


def _print_scores(scores: dict[str, dict], timings: dict[str, float], out: Path) -> None:
    print(f"\nTest split of the built-in suite ({out / 'data' / 'test.jsonl'}): sampling at T = 1 over seeds "
          f"{' '.join(map(str, EVAL_SEEDS))} (mean ± std), and greedy decoding:")
    width = max(len(k) for k in scores) + 2
    levels = sorted(next(iter(scores.values()))["exact_match_by_level"])
    header = (f"{'model':<{width}}{'exact match':>14}{'ROUGE-L':>14}{'EM greedy':>11}{'RL greedy':>11}"
              + "".join(f"{'EM L' + l:>7}" for l in levels))
    print(header)
    print("-" * len(header))
    for name, sc in scores.items():
        row = (f"{name:<{width}}{sc['exact_match']:>8.1f} ± {sc['exact_match_std']:<3.1f}"
               f"{sc['rouge_l']:>8.1f} ± {sc['rouge_l_std']:<3.1f}"
               f"{sc['greedy_exact_match']:>11.1f}{sc['greedy_rouge_l']:>11.1f}")
        row += "".join(f"{sc['exact_match_by_level'][l]:>7.1f}" for l in levels)
        print(row)
    print("(EM L1-L4: exact match per difficulty level of the suite, sampled, mean over seeds)")
    t = timings
    rank_share = 100 * t["pocl_ranking_seconds"] / max(t["pocl_ranking_seconds"] + t["pocl_training_seconds"], 1e-9)
    print(f"\nPOCL: ranking {t['pocl_ranking_seconds']:.0f} s ({rank_share:.0f}% of ranking + training), training "
          f"{t['pocl_training_seconds']:.0f} s; plain KD: training {t['kd_training_seconds']:.0f} s")
    print(f"wall time: {t['total_seconds']:.0f} s (teacher {t['teacher_seconds']:.0f} s, student base "
          f"{t['student_base_seconds']:.0f} s, POCL {t['pocl_seconds']:.0f} s, KD {t['kd_seconds']:.0f} s, "
          f"evaluation {t['eval_seconds']:.0f} s)")
    print(f"results: {out / 'results.json'}; students (best/ by dev ROUGE-L, evaluated above): {out / 'pocl' / 'best'}, "
          f"{out / 'kd' / 'best'}; "
          f"summaries: {out / 'pocl' / 'summary.md'}, {out / 'kd' / 'summary.md'}")
