"""Shared fixtures: the built-in tokenizer, tiny random-initialised model pairs saved as normal
Hugging Face folders, and a tiny instruction dataset in JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def suite_tokenizer():
    from pocl.data import build_suite_tokenizer

    return build_suite_tokenizer(seed=0)


def make_llama(tokenizer, *, hidden: int, layers: int, heads: int = 2, seed: int = 0, vocab_rows: int | None = None,
               tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_rows or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=None,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, suite_tokenizer):
    """(teacher_dir, student_dir): a 2-layer 32-wide teacher and a 1-layer 16-wide student."""
    root = tmp_path_factory.mktemp("tiny_pair")
    teacher = save_model(make_llama(suite_tokenizer, hidden=32, layers=2, seed=1), suite_tokenizer, root / "teacher")
    student = save_model(make_llama(suite_tokenizer, hidden=16, layers=1, seed=2), suite_tokenizer, root / "student")
    return teacher, student


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(train.jsonl, dev.jsonl, test.jsonl) of the built-in suite: 48 / 16 / 16 rows."""
    from pocl.data import write_suite

    root = tmp_path_factory.mktemp("tiny_data")
    paths = write_suite(root, n_train=48, n_dev=16, n_test=16, seed=0)
    return paths["train"], paths["dev"], paths["test"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, tiny_pair, tiny_data, **sections):
    """A DistillConfig for the tiny pair and data; ``sections`` override fields."""
    from pocl.config import DistillConfig

    teacher, student = tiny_pair
    values = {
        "model": {"teacher": str(teacher), "student": str(student)},
        "data": {"train_file": str(tiny_data[0]), "dev_file": str(tiny_data[1]), "max_length": 48,
                 "max_prompt_length": 32},
        "loss": {"divergence": "fkl", "alpha": 0.5, "temperature": 1.0},
        "optim": {"lr": 1e-2, "min_lr": 1e-4},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "micro_batch_size": 4, "epochs": 1,
                  "seed": 3, "progress": False, "tensorboard": False, "log_every": 1},
    }
    for section, items in sections.items():
        values.setdefault(section, {}).update(items)
    if values.get("curriculum", {}).get("curriculum") == "pocl":
        # The stages set their own alpha, T and length: the plain-KD values above would override every
        # stage (alpha, temperature) or be refused (epochs).
        for section, key in (("train", "epochs"), ("loss", "alpha"), ("loss", "temperature")):
            if key not in sections.get(section, {}):
                values[section].pop(key, None)
    return DistillConfig.from_dict(values)
