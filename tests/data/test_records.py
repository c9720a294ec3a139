from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocl.data import records as records_mod
from pocl.data.records import Record, id_sort_key, load_records
from pocl.errors import DataError, PoclError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_rows(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


# --- accepted formats ----------------------------------------------------------------------


def test_alpaca_spelling(tmp_path):
    f = write_rows(tmp_path / "a.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Echo.", "input": "x", "output": "x", "category": "qa"},
    ])
    res = load_records(f)
    assert [r.instruction for r in res.records] == ["Say hi.", "Echo."]
    assert res.records[0].input == "" and res.records[1].input == "x"
    assert res.records[1].output == "x"
    assert res.records[1].meta == {"category": "qa"}
    assert res.records[0].source == str(f)
    assert [r.line for r in res.records] == [1, 2]
    assert res.skipped == []


def test_dolly_spelling_context_response(tmp_path):
    f = write_rows(tmp_path / "d.jsonl", [
        {"instruction": "Q?", "context": "ctx", "response": "A.", "category": "closed_qa"}])
    (r,) = load_records(f).records
    assert (r.instruction, r.input, r.output) == ("Q?", "ctx", "A.")
    assert r.meta == {"category": "closed_qa"}
    assert r.references == ["A."]


def test_vicuna_rows_without_input_and_prompt_field(tmp_path):
    prompt = "Below is ...\n\n### Response:\n"
    f = write_rows(tmp_path / "v.jsonl", [
        {"instruction": "Tell me.", "category": "fermi", "prompt": prompt, "output": "ok"}])
    (r,) = load_records(f).records
    assert r.input == ""
    assert r.prompt == prompt
    assert r.meta == {"category": "fermi"}


def test_prompt_only_row_without_instruction(tmp_path):
    f = write_rows(tmp_path / "p.jsonl", [{"prompt": "Do it:\n", "output": "done"}])
    (r,) = load_records(f).records
    assert r.instruction == "" and r.prompt == "Do it:\n"


def test_require_output_false(tmp_path):
    f = write_rows(tmp_path / "p.jsonl", [{"instruction": "Do."}])
    (r,) = load_records(f, require_output=False).records
    assert r.output == "" and r.references == [] and not r.has_output
    with pytest.raises(DataError):
        load_records(f)


def test_list_outputs_become_tuples(tmp_path):
    f = write_rows(tmp_path / "sni.jsonl", [
        {"instruction": "Name a colour.", "output": ["red", "blue"]}])
    (r,) = load_records(f).records
    assert r.output == ("red", "blue")
    assert r.references == ["red", "blue"]
    assert r.target == "red"
    hash(r)  # records stay hashable


def test_null_input_is_absent(tmp_path):
    f = write_rows(tmp_path / "n.jsonl", [{"instruction": "I", "input": None, "output": "o"}])
    assert load_records(f).records[0].input == ""


def test_blank_lines_are_not_rows(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('\n{"instruction": "a", "output": "1"}\n   \n\n{"instruction": "b", '
                 '"output": "2"}\n\n', encoding="utf-8")
    res = load_records(f)
    assert [r.line for r in res.records] == [2, 5]
    assert [r.id for r in res.records] == ["000000", "000001"]


def test_crlf_and_bom(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "1"}\r\n'
                  b'{"instruction": "b", "output": "2"}\r\n')
    assert [r.output for r in load_records(f).records] == ["1", "2"]


def test_explicit_and_generated_ids(tmp_path):
    f = write_rows(tmp_path / "i.jsonl", [
        {"id": 7, "instruction": "a", "output": "1"},
        {"instruction": "b", "output": "2"},
        {"id": "x-1", "instruction": "c", "output": "3"},
    ])
    assert [r.id for r in load_records(f).records] == ["7", "000001", "x-1"]


def test_id_field_argument(tmp_path):
    f = write_rows(tmp_path / "i.jsonl", [
        {"uid": "a", "id": "ignored-into-meta", "instruction": "a", "output": "1"},
        {"uid": "b", "instruction": "b", "output": "2"},
    ])
    recs = load_records(f, id_field="uid").records
    assert [r.id for r in recs] == ["a", "b"]
    assert recs[0].meta == {"id": "ignored-into-meta"}
    g = write_rows(tmp_path / "j.jsonl", [{"instruction": "b", "output": "2"}])
    with pytest.raises(DataError, match="uid"):
        load_records(g, id_field="uid")


def test_generated_ids_do_not_shift_when_a_row_is_skipped(tmp_path):
    f = write_lines(tmp_path / "s.jsonl", [
        json.dumps({"instruction": "a", "output": "1"}),
        "not json",
        json.dumps({"instruction": "c", "output": "3"}),
    ])
    res = load_records(f, skip_invalid=True)
    assert [r.id for r in res.records] == ["000000", "000002"]


def test_natural_sort():
    ids = ["10", "2", "1", "train-10", "train-9", "b", "a2", "a10", "02"]
    assert sorted(ids, key=id_sort_key) == [
        "1", "02", "2", "10", "a2", "a10", "b", "train-9", "train-10"]
    assert id_sort_key("2") < id_sort_key("10")
    assert id_sort_key("000009") < id_sort_key("000010")
    # a total order: distinct ids never compare equal
    assert id_sort_key("02") != id_sort_key("2")


def test_json_array(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "1"},
                             {"instruction": "b", "output": "2"}], indent=2), encoding="utf-8")
    res = load_records(f)
    assert [r.output for r in res.records] == ["1", "2"]
    assert [r.line for r in res.records] == [1, 2]  # element indices


@pytest.mark.parametrize("key", ["data", "rows", "train"])
def test_wrapped_json(tmp_path, key):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"version": 1, key: [{"instruction": "a", "output": "1"}]}),
                 encoding="utf-8")
    assert load_records(f).records[0].output == "1"


def test_wrapped_json_with_splits(tmp_path):
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"train": [{"instruction": "a", "output": "1"}],
                             "test": [{"instruction": "b", "output": "2"}]}), encoding="utf-8")
    assert load_records(f, split="test").records[0].output == "2"
    with pytest.raises(DataError, match="several list-valued keys"):
        load_records(f)


def test_directory_of_split_files(tmp_path):
    write_rows(tmp_path / "train.jsonl", [{"instruction": "a", "output": "1"}])
    (tmp_path / "dev.json").write_text(json.dumps([{"instruction": "b", "output": "2"}]),
                                       encoding="utf-8")
    assert load_records(tmp_path).records[0].output == "1"
    assert load_records(tmp_path, split="dev").records[0].output == "2"
    with pytest.raises(DataError, match="available splits: dev, train"):
        load_records(tmp_path, split="test")


def test_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([
        {"instruction": "a", "context": "", "response": "1", "category": "qa"},
        {"instruction": "b", "context": "c", "response": "2", "category": "gen"},
    ])
    ds.save_to_disk(str(tmp_path / "ds"))
    res = load_records(tmp_path / "ds")
    assert [(r.instruction, r.input, r.output) for r in res.records] == [
        ("a", "", "1"), ("b", "c", "2")]
    assert [r.line for r in res.records] == [1, 2]
    assert res.records[1].meta == {"category": "gen"}


def test_saved_dataset_dict(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"instruction": "a", "output": "1"}]),
        "validation": datasets.Dataset.from_list([{"instruction": "b", "output": ["2", "two"]}]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd").records[0].output == "1"
    assert load_records(tmp_path / "dd", split="validation").records[0].output == ("2", "two")
    with pytest.raises(DataError, match="available splits: train, validation"):
        load_records(tmp_path / "dd", split="test")


def test_saved_dataset_bad_row_names_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "a", "output": "1"},
                                {"instruction": "b", "output": "  "}]).save_to_disk(
        str(tmp_path / "ds"))
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "ds")
    assert e.value.line == 2 and e.value.field == "output"


def test_hub_name_failure_is_wrapped(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="offline mode"):
        load_records("someone/no-such-dataset")


def test_missing_path_never_goes_to_hub(tmp_path, monkeypatch):
    import datasets

    def boom(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("hub contacted")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        load_records(missing)
    assert "nope.jsonl" in str(e.value) and "no such file" in str(e.value)
    with pytest.raises(DataError):
        load_records("./data/train.jsonl")


# --- bad input -----------------------------------------------------------------------------

GOOD = json.dumps({"instruction": "ok", "output": "fine"})


@pytest.mark.parametrize("bad, field, words", [
    ('{"instruction": "a", "output": ', None, "invalid JSON"),
    ('[1, 2]', None, "not a JSON object"),
    ('"text"', None, "not a JSON object"),
    (json.dumps({"input": "x", "output": "o"}), "instruction", "missing instruction"),
    (json.dumps({"instruction": "a"}), "output", "missing output"),
    (json.dumps({"instruction": "a", "output": ""}), "output", "empty"),
    (json.dumps({"instruction": "a", "output": " \n\t"}), "output", "empty"),
    (json.dumps({"instruction": "a", "response": "  "}), "response", "empty"),
    (json.dumps({"instruction": "a", "output": []}), "output", "empty list"),
    (json.dumps({"instruction": 3, "output": "o"}), "instruction", "must be a string"),
    (json.dumps({"instruction": "", "output": "o"}), "instruction", "empty"),
    (json.dumps({"instruction": "a", "output": 5}), "output", "got number"),
    (json.dumps({"instruction": "a", "output": ["x", 2]}), "output", "reference 1"),
    (json.dumps({"instruction": "a", "output": {"x": 1}}), "output", "got object"),
    (json.dumps({"instruction": "a", "input": ["x"], "output": "o"}), "input", "got list"),
    (json.dumps({"instruction": "a", "input": "x", "context": "y", "output": "o"}),
     "context", "both 'input' and 'context'"),
    (json.dumps({"instruction": "a", "output": "o", "response": "r"}),
     "response", "both 'output' and 'response'"),
    (json.dumps({"instruction": "a", "output": "o", "prompt": 4}), "prompt", "must be a string"),
    (json.dumps({"id": 1.5, "instruction": "a", "output": "o"}), "id", "string or an integer"),
    (json.dumps({"id": True, "instruction": "a", "output": "o"}), "id", "string or an integer"),
])
def test_bad_row_names_file_line_field(tmp_path, bad, field, words):
    f = write_lines(tmp_path / "bad_rows.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert "bad_rows.jsonl:2" in msg, msg
    assert words in msg, msg
    assert e.value.line == 2 and e.value.field == field
    if field is not None:
        assert f"'{field}'" in msg


def test_invalid_json_gives_parser_message(tmp_path):
    f = write_lines(tmp_path / "j.jsonl", [GOOD, '{"instruction": "a",, }'])
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON: Expecting property name"):
        load_records(f)


def test_non_utf8_on_line_3(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b'{"instruction": "caf\xe9", '
                  b'"output": "x"}\n' + GOOD.encode() + b"\n")
    with pytest.raises(DataError) as e:
        load_records(f)
    assert "latin.jsonl:3" in str(e.value) and "UTF-8" in str(e.value)
    res = load_records(f, skip_invalid=True)
    assert len(res.records) == 3 and [s.line for s in res.skipped] == [3]


def test_non_utf8_json_file(tmp_path):
    f = tmp_path / "latin.json"
    f.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin\.json:3: not valid UTF-8"):
        load_records(f)


def test_invalid_json_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n{"instruction": "a"},\n{oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_records(f)


def test_json_array_bad_element_names_index(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "1"}, {"instruction": "b"}]),
                 encoding="utf-8")
    with pytest.raises(DataError, match=r"arr\.json:2: field 'output'"):
        load_records(f)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl.*no rows"):
        load_records(f)


@pytest.mark.parametrize("content", ["", "[]", '{"data": []}'])
def test_empty_json(tmp_path, content):
    f = tmp_path / "empty.json"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json.*no rows"):
        load_records(f)


def test_empty_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(
        str(tmp_path / "e"))
    with pytest.raises(DataError, match="no rows"):
        load_records(tmp_path / "e")


def test_duplicate_ids_name_both_lines(tmp_path):
    f = write_rows(tmp_path / "dup.jsonl", [
        {"id": "a", "instruction": "x", "output": "1"},
        {"id": "b", "instruction": "x", "output": "1"},
        {"id": "a", "instruction": "y", "output": "2"},
    ])
    for skip in (False, True):  # a file-level problem: raises even with skip_invalid
        with pytest.raises(DataError) as e:
            load_records(f, skip_invalid=skip)
        msg = str(e.value)
        assert "dup.jsonl:3" in msg and "line 1" in msg and "'a'" in msg
        assert e.value.field == "id"


def test_int_and_str_id_collide(tmp_path):
    f = write_rows(tmp_path / "dup.jsonl", [{"id": 1, "instruction": "x", "output": "1"},
                                            {"id": "1", "instruction": "x", "output": "1"}])
    with pytest.raises(DataError, match="duplicate id"):
        load_records(f)


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "rows.csv"
    f.write_text("instruction,output\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported"):
        load_records(f)


# --- skip_invalid --------------------------------------------------------------------------


def test_skip_invalid_reports_count_and_ids(tmp_path, caplog):
    f = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"id": "r1", "instruction": "a", "output": "1"}),
        json.dumps({"id": "r2", "instruction": "b"}),
        "{broken",
        json.dumps({"id": "r4", "instruction": "d", "output": "4"}),
        json.dumps({"id": "r5", "instruction": 5, "output": "5"}),
    ])
    with caplog.at_level(logging.WARNING, logger="pocl.data"):
        res = load_records(f, skip_invalid=True)
    assert [r.id for r in res.records] == ["r1", "r4"]
    assert [(s.line, s.id, s.field) for s in res.skipped] == [
        (2, "r2", "output"), (3, "000002", None), (5, "r5", "instruction")]
    summary = res.summary()
    assert "skipped 3" in summary
    for token in ("r2", "000002", "r5", "line 3"):
        assert token in summary
    warnings = [r for r in caplog.records if r.name == "pocl.data"]
    assert warnings and "skipped 3" in warnings[0].getMessage()
    assert "r5" in warnings[0].getMessage()


def test_skip_invalid_with_nothing_valid_raises(tmp_path):
    f = write_lines(tmp_path / "allbad.jsonl", ["{", "[]"])
    with pytest.raises(DataError, match="no valid rows"):
        load_records(f, skip_invalid=True)


def test_summary_without_skips(tmp_path):
    f = write_rows(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "1"}])
    assert "skipped none" in load_records(f).summary()


def test_record_equality_ignores_meta():
    a = Record(id="1", instruction="i", output="o", meta={"x": 1})
    b = Record(id="1", instruction="i", output="o", meta={"x": 2})
    assert a == b and hash(a) == hash(b)


# --- fuzzing -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(["instruction", "input", "context", "output", "response",
                               "prompt", "id", "category"]) | st.text(max_size=5)
row_objects = st.dictionaries(field_names, json_values | st.text(max_size=10), max_size=6)


def _check_loader(path, **kwargs):
    try:
        load_records(path, **kwargs)
    except DataError:
        pass


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, data):
    f = tmp_path / "fuzz.jsonl"
    f.write_bytes(data)
    for skip in (False, True):
        _check_loader(f, skip_invalid=skip)
    g = tmp_path / "fuzz.json"
    g.write_bytes(data)
    _check_loader(g)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_objects | json_values, max_size=5), skip=st.booleans(),
       require_output=st.booleans())
def test_fuzz_random_json_rows(tmp_path, rows, skip, require_output):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    try:
        res = load_records(f, skip_invalid=skip, require_output=require_output)
    except DataError:
        return
    for r in res.records:  # whatever loads is well-formed
        assert isinstance(r.id, str) and isinstance(r.instruction, str)
        assert isinstance(r.input, str)
        assert r.prompt is not None or r.instruction.strip()
        if require_output:
            assert r.references and all(ref.strip() for ref in r.references)


def test_deeply_nested_json_is_a_data_error(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text("[" * 100000 + "]" * 100000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.jsonl:1: invalid JSON"):
        load_records(f)


def test_huge_integer_is_a_data_error(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_text('{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n",
                 encoding="utf-8")
    with pytest.raises(DataError, match=r"big\.jsonl:1: invalid JSON"):
        load_records(f)


def test_data_error_is_pocl_error():
    assert issubclass(DataError, PoclError)
    assert records_mod.DEFAULT_ID_KEY == "id"
