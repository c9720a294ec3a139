"""Per-difficulty breakdown: ranking file parsing, quartiles, coverage, the no-overlap error."""

from __future__ import annotations

import json
import statistics

import pytest

from pocl.errors import ConfigError, DataError
from pocl.evaluation.breakdown import (assign_buckets, breakdown, bucket_names, check_coverage, load_ranking,
                                       ranking_specs)
from pocl.evaluation.runner import SampleResult, SeedResult, SetResult
from tests.conftest import write_jsonl


def ranking_file(tmp_path, ranks: dict[str, int], header: bool = True):
    rows = ([{"stamp": "abc", "measurer": "rrf"}] if header else []) + [
        {"id": i, "rank": r, "score": 1.0 / r} for i, r in ranks.items()]
    return write_jsonl(tmp_path / "ranking.jsonl", rows)


def fake_result(scores: dict[str, list[float]], name="test") -> SetResult:
    """A SetResult with given per-seed ROUGE-L of each sample (EM = 100 when ROUGE-L is 100)."""
    seeds = [10, 20]
    samples = [SampleResult(id=i, prompt="p", references=["r"], generations=["g", "g"], rouge_l=list(v),
                            exact_match=[100.0 * (x == 100) for x in v], generated_tokens=[1, 1],
                            stopped_at_eos=[True, True], prompt_tokens=3, prompt_truncated=False)
               for i, v in scores.items()]
    per_seed = [SeedResult(seed=s, rouge_l=statistics.fmean(v[k] for v in scores.values()),
                           exact_match=0.0, seconds=1.0, generated_tokens=1, stopped_at_eos=1)
                for k, s in enumerate(seeds)]
    return SetResult(name=name, seeds=seeds, per_seed=per_seed, samples=samples, decoding={})


def test_quartiles_by_rank_among_the_evaluated_ids(tmp_path):
    # ids e0..e7 evaluated; the ranking also has training ids that must not count
    ranks = {f"e{i}": r for i, r in enumerate([8, 1, 7, 2, 6, 3, 5, 4])}
    ranks.update({"train-1": 9, "train-2": 10})
    ranking = load_ranking(ranking_file(tmp_path, ranks))
    assert len(ranking) == 10
    b = assign_buckets(ranking, [f"e{i}" for i in range(8)], 4)
    assert b == {"e1": 0, "e3": 0, "e5": 1, "e7": 1, "e6": 2, "e4": 2, "e2": 3, "e0": 3}
    # uneven sizes differ by at most one; ties broken by id
    b5 = assign_buckets(ranking, ["e1", "e3", "e5", "e7", "e6"], 4)
    assert sorted(b5.values()) == [0, 0, 1, 2, 3]
    assert bucket_names(4) == ["Q1 (easiest)", "Q2", "Q3", "Q4 (hardest)"] and bucket_names(2)[1] == "B2 (hardest)"


def test_bucket_scores_and_partial_coverage(tmp_path):
    ranking = load_ranking(ranking_file(tmp_path, {"a": 1, "b": 2, "c": 3, "d": 4}))
    result = fake_result({"a": [100, 80], "b": [60, 40], "c": [20, 0], "d": [0, 0], "x": [50, 50], "y": [10, 10]})
    bd = breakdown(result, ranking, num_buckets=2)
    assert bd.coverage == {"evaluated": 6, "covered": 4, "fraction": 4 / 6, "missing_ids": ["x", "y"], "missing": 2}
    easy, hard = bd.buckets
    assert (easy.n, easy.rank_min, easy.rank_max, hard.n) == (2, 1, 2, 2)
    assert easy.rouge_l["per_seed"] == [80, 60] and easy.rouge_l["mean"] == 70
    assert easy.rouge_l["std"] == pytest.approx(statistics.stdev([80, 60]))
    assert hard.rouge_l["per_seed"] == [10, 0] and easy.exact_match["per_seed"] == [50, 0]
    d = bd.to_dict()
    assert d["buckets"][0]["name"] == "B1 (easiest)" and json.dumps(d)
    # more buckets than ranked samples: empty buckets are reported, not dropped
    bd6 = breakdown(result, ranking, num_buckets=6)
    assert [b.n for b in bd6.buckets] == [1, 0, 1, 1, 0, 1] and bd6.buckets[1].rouge_l is None


def test_no_overlap_explains_how_to_rank_the_evaluation_set(tmp_path):
    ranking = load_ranking(ranking_file(tmp_path, {"train-0": 1, "train-1": 2}))
    with pytest.raises(DataError) as e:
        check_coverage(ranking, ["000000", "000001"], set_name="dolly", set_path="eval/dolly.jsonl")
    msg = str(e.value)
    assert "none of the 2 evaluated ids" in msg and "set 'dolly'" in msg
    assert "pocl rank --student INITIAL_STUDENT --train-file eval/dolly.jsonl" in msg
    assert str(tmp_path / "ranking.jsonl") in msg


@pytest.mark.parametrize("line,field,fragment", [
    ({"id": "a"}, "rank", "missing rank"),
    ({"rank": 3}, "id", "missing sample id"),
    ({"id": "a", "rank": 0}, "rank", "integer >= 1"),
    ({"id": "a", "rank": 1.5}, "rank", "integer >= 1"),
    ({"id": "a", "rank": "1"}, "rank", "integer >= 1"),
    ({"id": ["a"], "rank": 1}, "id", "string or an integer"),
    ({"id": "z", "rank": 5}, "id", "duplicate id 'z'"),
])
def test_malformed_ranking_lines(tmp_path, line, field, fragment):
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "z", "rank": 1}, line])
    with pytest.raises(DataError) as e:
        load_ranking(path)
    assert e.value.line == 2 and e.value.field == field and fragment in str(e.value)


def test_ranking_files_and_specs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_ranking(tmp_path / "absent.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "rank": 1}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: invalid JSON"):
        load_ranking(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "header.jsonl", [{"stamp": "x"}])
    with pytest.raises(DataError, match="no ranked samples"):
        load_ranking(tmp_path / "header.jsonl")
    assert load_ranking(write_jsonl(tmp_path / "int.jsonl", [{"id": 7, "rank": 1.0}])).ranks == {"7": 1}
    assert ranking_specs(["r.jsonl"], ["dolly"]) == {"dolly": "r.jsonl"}
    assert ranking_specs(["sinst=r.jsonl"], ["dolly", "sinst"]) == {"sinst": "r.jsonl"}
    with pytest.raises(ConfigError, match="say which set"):
        ranking_specs(["r.jsonl"], ["dolly", "sinst"])
    with pytest.raises(ConfigError, match="no evaluation set named 'vicuna'"):
        ranking_specs(["vicuna=r.jsonl"], ["dolly"])
