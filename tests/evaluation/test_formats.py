"""Every evaluation-set layout loads without flags; malformed files name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocl.errors import DataError
from pocl.evaluation.formats import describe, load_eval_set
from tests.conftest import SHARED_DATA, write_jsonl

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:\n")


def test_dolly_and_selfinst_layout(tmp_path):
    rows = [{"topic": "closed_qa", "instruction": "When?", "input": "In 2000 it began.", "output": "2000",
             "prompt": "P1"},
            {"topic": "open_qa", "instruction": "Why?", "input": "", "output": "Because.", "prompt": "P2"}]
    s = load_eval_set(write_jsonl(tmp_path / "dolly.jsonl", rows))
    assert s.name == "dolly" and s.layout == "instruction" and len(s) == 2 and s.total_rows == 2
    assert s.records[0].references == ["2000"] and s.records[0].prompt == "P1"
    assert s.records[0].meta["topic"] == "closed_qa" and s.records[1].id == "000001"
    assert not s.multi_reference and "2 samples" in describe(s)


def test_vicuna_layout_without_input(tmp_path):
    rows = [{"instruction": "Tell a joke.", "category": "generic", "prompt": ALPACA.format("Tell a joke."),
             "output": "Why did..."}]
    s = load_eval_set(write_jsonl(tmp_path / "vicuna.jsonl", rows))
    assert s.records[0].input == "" and s.records[0].references == ["Why did..."]


def test_sni_and_unni_processed_layout_with_reference_lists(tmp_path):
    rows = [{"prompt": "p", "instruction": "Define x.", "input": "x = 1", "output": ["one", "1", "unity"]},
            {"prompt": "q", "instruction": "Say hi.", "input": "", "output": ["hi"]}]
    s = load_eval_set(write_jsonl(tmp_path / "sinst_test.jsonl", rows), name="S-NI")
    assert s.name == "S-NI" and s.layout == "instruction" and s.multi_reference
    assert s.records[0].references == ["one", "1", "unity"] and s.records[1].references == ["hi"]
    assert "references per sample" in describe(s)


@pytest.mark.parametrize("key", ["references", "outputs"])
def test_reference_list_fields(tmp_path, key):
    rows = [{"id": "a", "instruction": "Name a colour.", key: ["red", "blue"]},
            {"id": "b", "instruction": "Name a number.", "input": "small", key: "one"}]
    s = load_eval_set(write_jsonl(tmp_path / "unni.jsonl", rows))
    assert s.layout == "references"
    assert [r.references for r in s.records] == [["red", "blue"], ["one"]]
    assert [r.id for r in s.records] == ["a", "b"] and s.records[1].input == "small"


def test_natural_instructions_rows(tmp_path):
    rows = [{"id": "task1-0", "task_name": "task1", "definition": ["Translate to French.", "Be brief."],
             "inputs": "cat", "targets": ["chat"]},
            {"id": "task1-1", "task_name": "task1", "definition": "Translate to French.", "inputs": "dog",
             "targets": "chien"}]
    s = load_eval_set(write_jsonl(tmp_path / "sni.jsonl", rows))
    assert s.layout == "natural-instructions"
    r0, r1 = s.records
    assert r0.instruction == "Translate to French.\n\nBe brief." and r0.input == "cat" and r0.references == ["chat"]
    assert r1.references == ["chien"] and r0.meta["task_name"] == "task1"


def test_json_array_file_and_max_samples(tmp_path):
    rows = [{"instruction": f"q{i}", "output": [f"a{i}", f"b{i}"]} for i in range(5)]
    path = tmp_path / "set.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    s = load_eval_set(path, max_samples=3)
    assert len(s) == 3 and s.total_rows == 5 and s.name == "set" and "first 3 of 5" in describe(s)
    alias = tmp_path / "alias.json"
    alias.write_text(json.dumps([{"instruction": "q", "references": ["a"]}]), encoding="utf-8")
    assert load_eval_set(alias).records[0].references == ["a"]


def _error(tmp_path: Path, lines: list[str], name: str = "bad.jsonl") -> DataError:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_eval_set(path)
    return e.value


GOOD = json.dumps({"instruction": "q", "output": "a"})


@pytest.mark.parametrize("bad,line,field,fragment", [
    ('{"instruction": "q", "output": "a"', 2, None, "invalid JSON"),
    (json.dumps({"instruction": "q"}), 2, "output", "missing references"),
    (json.dumps({"instruction": "q", "output": []}), 2, "output", "empty list"),
    (json.dumps({"instruction": "q", "output": ["a", 3]}), 2, "output", "reference 1"),
    (json.dumps({"instruction": 5, "output": "a"}), 2, "instruction", "must be a string"),
    (json.dumps({"instruction": "q", "references": 7}), 2, "references", "string or a list"),
    (json.dumps({"definition": 3, "targets": "t"}), 2, "definition", "must be a string"),
    (json.dumps({"definition": "d", "targets": [""]}), 2, "targets", "reference 0"),
    (json.dumps({"instruction": "q", "output": "a", "references": ["b"]}), 2, "references", "both 'output'"),
    (json.dumps({"instruction": "q", "references": ["a"], "outputs": ["b"]}), 2, "outputs", "both"),
    (json.dumps({"instruction": "q", "definition": "d", "targets": "t"}), 2, "definition", "both 'instruction'"),
    (json.dumps({"definition": [], "targets": "t"}), 2, "definition", "non-empty list"),
    (json.dumps({"definition": "d", "inputs": "x"}), 2, "output", "missing references"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, bad, line, field, fragment):
    err = _error(tmp_path, [GOOD, bad, GOOD])
    assert err.path.endswith("bad.jsonl") and err.line == line and err.field == field
    assert fragment in str(err) and f"bad.jsonl:{line}" in str(err)


def test_alias_layout_errors_also_catch_bad_json_and_duplicates(tmp_path):
    err = _error(tmp_path, [json.dumps({"instruction": "q", "references": ["a"]}), "{nope"])
    assert err.line == 2 and "invalid JSON" in str(err)
    err = _error(tmp_path, [json.dumps({"id": 1, "instruction": "q", "references": ["a"]}),
                            json.dumps({"id": 1, "instruction": "r", "references": ["b"]})])
    assert err.line == 2 and err.field == "id" and "duplicate" in str(err)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_eval_set(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_eval_set(tmp_path / "empty.jsonl")


REAL = {"dolly.jsonl": (500, 1), "self_inst.jsonl": (242, 1), "vicuna.jsonl": (80, 1)}


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_evaluation_files(name):
    path = SHARED_DATA / "eval" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    s = load_eval_set(path)
    rows, refs = REAL[name]
    assert len(s) == rows and s.layout == "instruction"
    assert all(len(r.references) == refs and r.prompt and r.prompt.endswith("### Response:\n") for r in s.records)
    if name == "vicuna.jsonl":
        assert all(r.input == "" for r in s.records)
