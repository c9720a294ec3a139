from __future__ import annotations

import json
import statistics
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocl.data.builtin import (
    INSTRUCTIONS,
    build_suite_tokenizer,
    build_tokenizer,
    generate_suite,
    suite_texts,
    write_suite,
)
from pocl.data.records import load_records


@pytest.fixture(scope="module")
def suite():
    return generate_suite(seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_suite_tokenizer(seed=0)


def test_deterministic_from_seed(suite):
    assert generate_suite(seed=0) == suite
    other = generate_suite(seed=1)
    assert other["train"] != suite["train"] and other["test"] != suite["test"]
    # a split does not depend on the other splits' sizes
    assert generate_suite(n_train=10, n_dev=3, n_test=200, seed=0)["test"] == suite["test"]


def test_sizes_and_ids(suite):
    assert {k: len(v) for k, v in suite.items()} == {"train": 2000, "dev": 200, "test": 200}
    for split, rows in suite.items():
        assert [r["id"] for r in rows] == [f"{split}-{i:06d}" for i in range(len(rows))]
        for r in rows:
            assert set(r) == {"id", "instruction", "input", "output", "task", "level"}
            assert r["instruction"] == INSTRUCTIONS[r["task"]]
    small = generate_suite(n_train=5, n_dev=0, n_test=1, seed=3)
    assert [len(small[s]) for s in ("train", "dev", "test")] == [5, 0, 1]


def test_tasks_and_levels_balanced(suite):
    for rows in suite.values():
        pairs = Counter((r["task"], r["level"]) for r in rows)
        assert len(pairs) == 24
        assert max(pairs.values()) - min(pairs.values()) <= 1
        tasks = Counter(r["task"] for r in rows)
        assert max(tasks.values()) - min(tasks.values()) <= 1
        assert set(Counter(r["level"] for r in rows)) == {1, 2, 3, 4}
    for n in (5, 13, 30, 47):  # any size: every task and level within one of the others
        rows = generate_suite(n_train=n, n_dev=0, n_test=0, seed=2)["train"]
        for key, values in (("task", INSTRUCTIONS), ("level", (1, 2, 3, 4))):
            counts = [sum(r[key] == v for r in rows) for v in values]
            assert max(counts) - min(counts) <= 1, (n, key, counts)


def _solve(task: str, text: str) -> str:
    """An independent solution of each task."""
    if task == "add":
        a, plus, b = text.split()
        assert plus == "+"
        return str(int(a) + int(b))
    if task == "sort":
        return " ".join(str(n) for n in sorted(int(x) for x in text.split()))
    if task == "reverse":
        return " ".join(text.split()[::-1])
    if task == "count":
        return str(len(text.split()))
    if task == "max":
        return str(max(int(x) for x in text.split()))
    if task == "repeat":
        return f"{text} {text}"
    raise AssertionError(task)


def test_outputs_are_correct(suite):
    for rows in suite.values():
        for r in rows:
            assert r["output"] == _solve(r["task"], r["input"]), r


def test_levels_grow_with_length(suite, tok):
    rows = suite["train"]
    for task in INSTRUCTIONS:
        means = [statistics.mean(len(r["input"]) for r in rows
                                 if r["task"] == task and r["level"] == level)
                 for level in (1, 2, 3, 4)]
        assert means == sorted(means) and means[0] < means[3], (task, means)
    by_level = {lv: statistics.mean(len(tok(r["input"] + " " + r["output"])["input_ids"])
                                    for r in rows if r["level"] == lv) for lv in (1, 2, 3, 4)}
    assert by_level[1] < by_level[2] < by_level[3] < by_level[4]
    # outputs stay short
    assert max(len(tok(r["output"])["input_ids"]) for r in rows) <= 20


def test_write_suite_reads_back(tmp_path):
    paths = write_suite(tmp_path / "suite", n_train=48, n_dev=24, n_test=24, seed=5)
    assert set(paths) == {"train", "dev", "test"}
    for split, path in paths.items():
        assert path.name == f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows == generate_suite(n_train=48, n_dev=24, n_test=24, seed=5)[split]
        res = load_records(path)
        assert [r.id for r in res.records] == [r["id"] for r in rows]
        assert {r.meta["task"] for r in res.records} == set(INSTRUCTIONS)
        assert all(r.meta["level"] in (1, 2, 3, 4) for r in res.records)
    assert load_records(tmp_path / "suite", split="dev").records[0].id == "dev-000000"


def test_tokenizer_deterministic(suite):
    texts = suite_texts(suite["train"][:500])
    a = build_tokenizer(texts, vocab_size=400)
    b = build_tokenizer(list(texts), vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    c = build_tokenizer(texts[:20], vocab_size=400)
    assert c.get_vocab() != a.get_vocab()


def test_tokenizer_properties(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= 512
    assert tok.model_max_length == 1024
    ids = tok("473 + 58")["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens are added
    pieces = tok.convert_ids_to_tokens(tok("12345 and 9081")["input_ids"])
    digit_pieces = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digit_pieces == list("123459081")  # one token per digit


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_round_trip_examples(tok, suite):
    for text in suite_texts(suite["test"][:50]) + ["  x\t\ny  ", "naïve 😀 — 3.14", ""]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_is_fast_to_train(suite):
    texts = suite_texts(suite["train"])
    build_tokenizer(texts[:10])  # warm the imports
    t = time.perf_counter()
    build_tokenizer(texts)
    assert time.perf_counter() - t < 3.0


