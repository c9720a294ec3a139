"""Fixtures of the integration tests: a 16-row built-in-suite dataset, its pocl ranking made by the
real measurer with the tiny student, and helpers that train with a real ``transformers.Trainer`` /
TRL ``GKDTrainer`` while recording what every optimizer step trained on."""

from __future__ import annotations

import pytest

from pocl.config import CurriculumConfig

N_TRAIN = 16


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state: a Trainer's (e.g. GKDConfig's bf16) would refuse the next test's
    Accelerator with another precision, here or in the pocl tests that run after these (and a pocl run's state
    would refuse a Trainer's). Reset before and after each test."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


@pytest.fixture(scope="session")
def suite_rows():
    from pocl.data import generate_suite

    rows = generate_suite(n_train=N_TRAIN, n_dev=4, n_test=2, seed=0)["train"]
    return [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in rows]


@pytest.fixture(scope="session")
def train_dataset(suite_rows):
    import datasets

    return datasets.Dataset.from_list(suite_rows)


@pytest.fixture(scope="session")
def ranking_file(tmp_path_factory, train_dataset, tiny_pair, suite_tokenizer):
    from transformers import AutoModelForCausalLM

    from pocl.integrations import rank_dataset

    _, student_dir = tiny_pair
    path = tmp_path_factory.mktemp("ranking") / "ranking.jsonl"
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    cfg = CurriculumConfig(curriculum="pocl", rank_max_new_tokens=8, rank_batch_size=16)
    rank_dataset(train_dataset, path, student=student, tokenizer=suite_tokenizer, student_path=str(student_dir),
                 config=cfg, max_length=64, max_prompt_length=48)
    return path
