"""TRL's GKDTrainer with and without the POCL curriculum, at the same sample budget, on pocl's built-in
task suite; both students scored with pocl's evaluation (ROUGE-L and exact match, sampling at T = 1 over
seeds 10..50, as the built-in default scores its runs).

    python examples/trl_gkd_pocl.py                      # builds a small teacher and student itself (CPU, minutes)
    python examples/trl_gkd_pocl.py --from-default runs/default   # reuses what `pocl distill` (no arguments) made

Without ``--from-default`` the example makes its own small copy of the built-in default under ``--out``:
the suite's JSONL files and tokenizer, a teacher fine-tuned on the suite and a briefly pre-trained student
(pocl.recipes.builtin_default's own functions, smaller sizes). Then:

1. the initial student ranks the training set (pocl's measurer: RRF of its ROUGE-L and loss);
2. GKD (TRL ``GKDTrainer``, lmbda = 0.5 on-policy, beta = 0.5, T = 1) for S optimizer steps over the whole set;
3. GKD + POCL: the same trainer and settings, the curriculum attached (4 cumulative stages, T 1 -> 2 in the
   divergence, a fresh AdamW and cosine schedule per stage), S steps in all: the same number of samples;
4. both students, the teacher and the initial student on the test split; results.json in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl.experimental.gkd import GKDConfig, GKDTrainer

from pocl.artifacts import atomic_write_json
from pocl.config import CurriculumConfig
from pocl.integrations import PoclCollator, PoclCurriculum, rank_dataset, stage_table
from pocl.recipes.builtin_default import (
    BuiltinSettings,
    evaluate_models,
    new_llama,
    prepare_suite,
    train_sft,
)

SIZES = {
    # tiny: a smoke run (480 samples, 39 steps per run); the students barely learn
    "tiny": {"n_train": 480, "n_dev": 32, "n_test": 96, "n_student_pretrain": 240, "vocab_size": 384,
             "teacher_arch": {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 3,
                              "num_attention_heads": 4, "num_key_value_heads": 4},
             "student_arch": {"hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4},
             "teacher_epochs": 10, "student_pretrain_epochs": 2},
    # small (default): 960 samples, a stronger teacher and student, 300 steps per run
    "small": {"n_train": 960, "n_dev": 32, "n_test": 96, "n_student_pretrain": 480, "vocab_size": 448,
              "teacher_arch": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
                               "num_attention_heads": 4, "num_key_value_heads": 4},
              "student_arch": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 4},
              "teacher_epochs": 10, "student_pretrain_epochs": 4},
}


def example_settings(size: str) -> BuiltinSettings:
    return BuiltinSettings(**SIZES[size], batch_size=32, micro_batch_size=32, max_length=96, max_prompt_length=80,
                           eval_max_new_tokens=24, generation_batch_size=96)


def build_models(out: Path, s: BuiltinSettings):
    """The suite, a teacher and an initial student, as the built-in default makes them (smaller)."""
    paths, tokenizer = prepare_suite(out, s)
    teacher = train_sft(new_llama(s.teacher_arch, len(tokenizer), tokenizer, s.seed), tokenizer, paths["train"],
                        None, out / "teacher", epochs=s.teacher_epochs, lr=s.teacher_lr, s=s, progress=False,
                        name="teacher")
    student = train_sft(new_llama(s.student_arch, len(tokenizer), tokenizer, s.seed + 1), tokenizer,
                        paths["student_pretrain"], None, out / "student-base", epochs=s.student_pretrain_epochs,
                        lr=s.student_pretrain_lr, s=s, progress=False, name="student-base")
    return paths, teacher, student


def rows(path: Path) -> list[dict]:
    keep = ("id", "instruction", "input", "output")
    return [{k: r[k] for k in keep} for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def gkd_run(name: str, out: Path, teacher: Path, student: Path, tokenizer, train, s: BuiltinSettings, *,
            steps: int | None, curriculum: PoclCurriculum | None, seed: int) -> tuple[Path, dict]:
    args = GKDConfig(output_dir=str(out / name), per_device_train_batch_size=16, gradient_accumulation_steps=1,
                     learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01,
                     max_grad_norm=1.0, seed=seed, report_to="none", use_cpu=True, save_strategy="no",
                     logging_steps=10, disable_tqdm=True, lmbda=0.5, beta=0.5, temperature=1.0,
                     max_new_tokens=s.eval_max_new_tokens, max_length=s.max_length,
                     max_steps=steps if steps is not None else -1)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args, train_dataset=train,
                         processing_class=tokenizer,
                         data_collator=PoclCollator(tokenizer, max_length=s.max_length,
                                                    max_prompt_length=s.max_prompt_length))
    info: dict = {}
    if curriculum is not None:
        callback = curriculum.attach(trainer)
        info["stages"] = stage_table(curriculum)
    t0 = time.perf_counter()
    trainer.train()
    info.update(seconds=time.perf_counter() - t0, steps=trainer.state.global_step,
                samples=trainer.state.global_step * args.per_device_train_batch_size)
    if curriculum is not None:
        info["applied"] = callback.history
    final = out / name / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    return final, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/trl_gkd_pocl", help="output folder (default %(default)s)")
    p.add_argument("--from-default", metavar="DIR", help="reuse DIR/teacher/final, DIR/student-base/final and "
                   "DIR/data of the built-in default (`pocl distill` with no arguments; its full sizes: slow on CPU)")
    p.add_argument("--stage-epochs", type=float, help="epochs per POCL stage (default: 0.5 with --size tiny, 2 "
                   "otherwise); the GKD baseline gets as many optimizer steps")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="sizes of the data and models the "
                   "example builds (default %(default)s; ignored with --from-default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(a.seed)
    t_start = time.perf_counter()
    out = Path(a.out)
    if a.from_default:
        src = Path(a.from_default)
        s = BuiltinSettings()
        paths = {split: src / "data" / f"{split}.jsonl" for split in ("train", "dev", "test")}
        teacher, student = src / "teacher" / "final", src / "student-base" / "final"
        missing = [str(x) for x in (*paths.values(), teacher, student) if not Path(x).exists()]
        if missing:
            raise SystemExit(f"--from-default {src}: missing {', '.join(missing)}; run `pocl distill` first")
    else:
        s = example_settings(a.size)
        paths, teacher, student = build_models(out, s)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(student))
    train = datasets.Dataset.from_list(rows(paths["train"]))
    t_models = time.perf_counter() - t_start

    ranking = out / "ranking.jsonl"
    t0 = time.perf_counter()
    rank_dataset(train, ranking, student=AutoModelForCausalLM.from_pretrained(student), tokenizer=tokenizer,
                 student_path=str(student), max_length=s.max_length, max_prompt_length=s.max_prompt_length,
                 config=CurriculumConfig(curriculum="pocl", rank_max_new_tokens=s.eval_max_new_tokens,
                                         rank_batch_size=s.generation_batch_size))
    t_rank = time.perf_counter() - t0
    stage_epochs = a.stage_epochs if a.stage_epochs is not None else 0.5 if a.size == "tiny" and not a.from_default \
        else 2.0
    curriculum = PoclCurriculum(ranking, train, seed=a.seed,
                                config=CurriculumConfig(curriculum="pocl", stage_epochs=stage_epochs,
                                                        on_policy_fraction_start=0.5))
    budget = sum(curriculum.plan_steps(16))
    pocl_dir, pocl_info = gkd_run("gkd-pocl", out, teacher, student, tokenizer, train, s, steps=None,
                                  curriculum=curriculum, seed=a.seed)
    gkd_dir, gkd_info = gkd_run("gkd", out, teacher, student, tokenizer, train, s, steps=budget, curriculum=None,
                                seed=a.seed)
    t0 = time.perf_counter()
    scores = evaluate_models({"teacher": teacher, "student (initial)": student, "GKD": gkd_dir,
                              "GKD + POCL": pocl_dir}, paths["test"], tokenizer, s)
    t_eval = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    print(f"\n{'model':<20} {'ROUGE-L':>16} {'exact match':>16} {'greedy R-L':>11}")
    for name, r in scores.items():
        print(f"{name:<20} {r['rouge_l']:>9.2f} ± {r['rouge_l_std']:<4.2f} {r['exact_match']:>9.2f} ± "
              f"{r['exact_match_std']:<4.2f} {r['greedy_rouge_l']:>11.2f}")
    print(f"\nsame budget: {budget} optimizer steps x 16 samples each run; GKD {gkd_info['seconds']:.0f} s, "
          f"GKD + POCL {pocl_info['seconds']:.0f} s; ranking {t_rank:.0f} s; models {t_models:.0f} s; "
          f"evaluation {t_eval:.0f} s; total {total:.0f} s")
    atomic_write_json(out / "results.json", {"scores": scores, "gkd": gkd_info, "gkd_pocl": pocl_info,
                                             "seconds": {"models": t_models, "ranking": t_rank, "evaluation": t_eval,
                                                         "total": total}}, make_parents=True)
    print(f"written: {out / 'results.json'}")


if __name__ == "__main__":
    main()
