"""The built-in synthetic instruction suite and its tokenizer (no download, nothing outside the
repository).

Six tasks, each at four difficulty levels that grow with the number of digits, numbers or words,
so that a curriculum has an easy-to-hard order to find:

==========  ========================================  =========================================
task        instruction                               level 1 ... level 4
==========  ========================================  =========================================
add         Add the two numbers.                      1-digit ... 4-digit first operand
sort        Sort the numbers in ascending order.      3 one-digit ... 6 two-digit numbers
reverse     Reverse the order of the words.           2 ... 5 words
count       Count the words in the text.              1-3 ... 10-12 words
max         What is the largest number?               3 one-digit ... 6 three-digit numbers
repeat      Repeat the text twice.                    1 ... 4 words
==========  ========================================  =========================================

Outputs are short (at most 17 tokens with :func:`build_suite_tokenizer`). Rows are generated
deterministically from a seed (one ``random.Random`` stream per split, seeded from the seed and
the split name, so a split does not change when another split's size does). Tasks and levels are
balanced: each (task, level) pair occurs ``n // 24`` or ``n // 24 + 1`` times in a split. Easy
items (level 1) necessarily repeat across splits: there are only 100 one-digit additions.

The suite is scored by exact match (:func:`pocl.evaluation.exact_match`) and ROUGE-L.

The tokenizer keeps the fixed parts of the Alpaca template and the six instructions as single
tokens (:data:`TEMPLATE_PHRASES`), so that a sample is about 20 tokens instead of 63: the
boilerplate carries no information for these tasks and would triple the cost of every pass on a
CPU. Texts are still encoded and decoded exactly.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pocl.artifacts import atomic_open
from pocl.errors import ConfigError

from .records import Record
from .templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, AlpacaTemplate

SPLITS = ("train", "dev", "test")
LEVELS = (1, 2, 3, 4)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

WORDS = (
    "red", "blue", "green", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "car",
    "book", "cup", "hat", "box", "rain", "snow", "wind", "fire", "milk", "bread", "ship", "door",
)

INSTRUCTIONS = {
    "add": "Add the two numbers.",
    "sort": "Sort the numbers in ascending order.",
    "reverse": "Reverse the order of the words.",
    "count": "Count the words in the text.",
    "max": "What is the largest number?",
    "repeat": "Repeat the text twice.",
}
TASKS = tuple(INSTRUCTIONS)

# The constant segments of the two Alpaca templates (the text before {instruction}, between
# {instruction} and {input}, and before the response) and the instructions of the suite.
TEMPLATE_PHRASES = (
    ALPACA_WITH_INPUT.split("{instruction}")[0],
    ALPACA_NO_INPUT.split("{instruction}")[0],
    ALPACA_WITH_INPUT.split("{instruction}")[1].split("{input}")[0],
    ALPACA_NO_INPUT.split("{instruction}")[1],
    *INSTRUCTIONS.values(),
)


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits (0-9 for one digit)."""
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _add(rng: random.Random, level: int) -> tuple[str, str]:
    a = _number(rng, level)
    b = _number(rng, rng.randint(1, level))
    return f"{a} + {b}", str(a + b)


def _sort(rng: random.Random, level: int) -> tuple[str, str]:
    count = level + 2
    top = (9, 9, 99, 99)[level - 1]
    nums = [rng.randint(0, top) for _ in range(count)]
    return " ".join(map(str, nums)), " ".join(map(str, sorted(nums)))


def _reverse(rng: random.Random, level: int) -> tuple[str, str]:
    words = _words(rng, level + 1)
    return " ".join(words), " ".join(reversed(words))


def _count(rng: random.Random, level: int) -> tuple[str, str]:
    n = rng.randint(3 * level - 2, 3 * level)
    return " ".join(_words(rng, n)), str(n)


def _max(rng: random.Random, level: int) -> tuple[str, str]:
    count = level + 2
    top = (9, 99, 99, 999)[level - 1]
    nums = [rng.randint(0, top) for _ in range(count)]
    return " ".join(map(str, nums)), str(max(nums))


def _repeat(rng: random.Random, level: int) -> tuple[str, str]:
    text = " ".join(_words(rng, level))
    return text, f"{text} {text}"


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "add": _add, "sort": _sort, "reverse": _reverse, "count": _count, "max": _max,
    "repeat": _repeat,
}


def _combo_order() -> list[tuple[str, int]]:
    """All 24 (task, level) pairs in an order whose every prefix is balanced within one across
    tasks and across levels, so that any split size is balanced (task j % 6; level j % 4,
    shifted by one in the second half: each task meets each level exactly once)."""
    n_t, n_l = len(TASKS), len(LEVELS)
    order = [(TASKS[j % n_t], LEVELS[(j % n_l + j // (n_t * n_l // 2)) % n_l])
             for j in range(n_t * n_l)]
    assert len(set(order)) == n_t * n_l
    return order


_COMBOS = _combo_order()


def _split_rows(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"pocl-suite/{seed}/{split}")
    plan = [_COMBOS[i % len(_COMBOS)] for i in range(n)]
    rng.shuffle(plan)
    rows = []
    for i, (task, level) in enumerate(plan):
        inp, out = _GENERATORS[task](rng, level)
        rows.append({"id": f"{split}-{i:06d}", "instruction": INSTRUCTIONS[task], "input": inp,
                     "output": out, "task": task, "level": level})
    return rows


def generate_suite(n_train: int = 2000, n_dev: int = 200, n_test: int = 200,
                   seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The suite as ``{"train": rows, "dev": rows, "test": rows}``; each row has ``id``
    (``"train-000123"``), ``instruction``, ``input``, ``output``, ``task`` and ``level``."""
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{name} must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return {name: _split_rows(name, n, seed) for name, n in sizes.items()}


def write_suite(out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Path]:
    """Write ``train.jsonl``, ``dev.jsonl`` and ``test.jsonl`` (arguments of
    :func:`generate_suite`); return ``{split: path}``. Empty splits are not written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, rows in generate_suite(**kwargs).items():
        if not rows:
            continue
        path = out / f"{split}.jsonl"
        with atomic_open(path) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def suite_texts(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Rows rendered through the Alpaca template, each followed by its output."""
    template = AlpacaTemplate()
    texts = []
    for row in rows:
        record = Record(id=str(row["id"]), instruction=row["instruction"],
                        input=row.get("input", ""), output=row["output"])
        texts.append(template.render(record) + row["output"])
    return texts


def build_tokenizer(texts: Sequence[str] | Iterable[str], vocab_size: int = 512, *,
                    model_max_length: int = 1024, phrases: Sequence[str] = ()):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers tokenizer.

    Digits are split one by one (``Digits(individual_digits=True)``) so that numbers are read
    digit by digit; the byte-level alphabet covers every string and the ByteLevel decoder makes
    ``decode(encode(s)) == s``. Special tokens: ``<|endoftext|>`` (EOS, id 0) and ``<pad>``
    (pad, id 1); no BOS is added. Deterministic: the same texts give the same vocabulary.
    ``phrases`` are added as whole tokens (matched before pre-tokenisation, in the given order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ConfigError("build_tokenizer needs at least one text")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ConfigError(f"vocab_size must be at least {len(alphabet) + 2} (the byte alphabet "
                          f"and two special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=sorted(alphabet), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if phrases:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(p, normalized=False, single_word=False, lstrip=False, rstrip=False)
                        for p in phrases])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, model_max_length=model_max_length,
                                   padding_side="right", clean_up_tokenization_spaces=False)


def build_suite_tokenizer(seed: int = 0, vocab_size: int = 512, **kwargs: Any):
    """:func:`build_tokenizer` trained on the suite's training split (rendered with the Alpaca
    template) of ``generate_suite(seed=seed)``."""
    rows = generate_suite(seed=seed, n_dev=0, n_test=0)["train"]
    kwargs.setdefault("phrases", TEMPLATE_PHRASES)
    return build_tokenizer(suite_texts(rows), vocab_size=vocab_size, **kwargs)


__all__ = [
    "EOS_TOKEN",
    "INSTRUCTIONS",
    "LEVELS",
    "PAD_TOKEN",
    "SPLITS",
    "TASKS",
    "TEMPLATE_PHRASES",
    "WORDS",
    "build_suite_tokenizer",
    "build_tokenizer",
    "generate_suite",
    "suite_texts",
    "write_suite",
]
