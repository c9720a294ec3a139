"""`pocl eval` end to end on the tiny pair: two seeds, two small sets, outputs and the Markdown table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pocl.cli import flag_name, main
from pocl.errors import ConfigError
from pocl.evaluation.config import EvalConfig, default_model_name, named_specs, split_named_spec
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tiny_data):
    """Two small evaluation sets: 6 rows of the suite's test split, and 4 rows with reference lists."""
    root = tmp_path_factory.mktemp("eval_sets")
    rows = [json.loads(line) for line in tiny_data[2].read_text().splitlines()]
    a = write_jsonl(root / "suite.jsonl", rows[:6])
    b = write_jsonl(root / "multi.jsonl", [{"id": f"m{i}", "instruction": r["instruction"], "input": r["input"],
                                            "references": [r["output"], "other"]} for i, r in enumerate(rows[6:10])])
    return a, b


def test_eval_smoke(tmp_path, tiny_pair, sets, capsys):
    teacher, student = tiny_pair
    out = tmp_path / "eval"
    code = main(["eval", "--model", f"teacher={teacher}", "--model", str(student), "--data", str(sets[0]),
                 "--data", f"multi={sets[1]}", "--seeds", "3", "4", "--max-new-tokens", "6", "--batch-size", "4",
                 "--max-prompt-length", "32", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | suite | multi | Avg |" in printed and "| teacher | " in printed and "| student | " in printed
    md = (out / "results.md").read_text()
    assert "| model | suite | multi | Avg |" in md and " ± " in md and "## Exact match" in md

    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "pocl.eval/1" and data["seeds"] == [3, 4] and data["std"] == "sample"
    assert data["decoding"] == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                "no_repeat_ngram_size": 6, "max_new_tokens": 6, "repetition_penalty": 1.0}
    assert list(data["models"]) == ["teacher", "student"] and list(data["sets"]) == ["suite", "multi"]
    assert data["sets"]["multi"]["references_per_sample"] == 2 and data["sets"]["suite"]["n"] == 6
    entry = data["models"]["student"]["sets"]["multi"]
    assert entry["n"] == 4 and len(entry["rouge_l"]["per_seed"]) == 2 and entry["seconds"]["total"] > 0
    assert set(data["versions"]) >= {"pocl", "torch", "transformers", "rouge_score"}
    assert data["models"]["teacher"]["avg"]["rouge_l"]["sets"] == ["suite", "multi"]

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (6 + 4) * 2  # models x samples x seeds
    row = next(r for r in rows if r["set"] == "multi")
    assert set(row) >= {"model", "set", "id", "prompt", "reference", "generation", "seed", "rouge_l", "exact_match"}
    assert isinstance(row["reference"], list) and row["prompt"].endswith("### Response:\n")
    # the per-seed score in results.json is the mean of the rows of that seed
    seed3 = [r["rouge_l"] for r in rows if r["model"] == "student" and r["set"] == "multi" and r["seed"] == 3]
    assert entry["rouge_l"]["per_seed"][0] == pytest.approx(sum(seed3) / len(seed3))
    assert not list(out.glob(".*"))  # temporary files replaced

    # the bar chart reads this results.json
    assert main(["report", "--eval-results", str(out / "results.json"), "--output-dir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "eval_rouge_l.png").stat().st_size > 10_000


def test_yaml_config_greedy_and_ranking_breakdown(tmp_path, tiny_pair, sets, capsys):
    _, student = tiny_pair
    ranking = write_jsonl(tmp_path / "ranking.jsonl", [{"id": f"test-{k:06d}", "rank": k + 1} for k in range(4)])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{student: {student}}}\n"  # other sections are ignored
                   f"eval:\n  models: [s={student}]\n  data: ['{sets[0]}']\n  greedy: true\n  seeds: [7, 8]\n"
                   f"  max_new_tokens: 4\n  max_prompt_length: 32\n  num_buckets: 2\n  progress: false\n")
    out = tmp_path / "out"
    assert main(["eval", "--config", str(cfg), "--ranking", str(ranking), "--output-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [7] and data["decoding"]["do_sample"] is False  # greedy: one pass
    bd = data["breakdown"]["s"]["suite"]
    assert bd["coverage"]["covered"] == 4 and bd["coverage"]["evaluated"] == 6
    assert [b["n"] for b in bd["buckets"]] == [2, 2]
    md = (out / "results.md").read_text()
    assert "By difficulty" in md and "covers 4 of 6" in md and "B1 (easiest)" in md
    assert "one pass, seed 7" in md


def test_training_ranking_for_a_test_set_fails_before_generation(tmp_path, tiny_pair, sets, capsys):
    ranking = write_jsonl(tmp_path / "ranking.jsonl", [{"id": "train-000001", "rank": 1}])
    code = main(["eval", "--model", str(tiny_pair[1]), "--data", str(sets[0]), "--ranking", str(ranking),
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pocl rank --student INITIAL_STUDENT --train-file" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(EvalConfig):
        if f.metadata.get("cli", True):
            assert flag_name(f) in out, f.name
    for flag in ("--model", "--data", "--seeds", "--ranking", "--config"):
        assert flag in out


def test_config_validation_and_names(tmp_path):
    with pytest.raises(ConfigError, match="eval.top_p"):
        EvalConfig(top_p=0)
    with pytest.raises(ConfigError, match="eval.seeds"):
        EvalConfig(seeds=[1, 1])
    with pytest.raises(ConfigError, match="eval.std"):
        EvalConfig.from_dict({"std": "unbiased"})
    with pytest.raises(ConfigError, match="unknown key 'eval.seed'"):
        EvalConfig.from_dict({"seed": 3})
    assert EvalConfig().eval_seeds == [10, 20, 30, 40, 50] and EvalConfig(greedy=True).eval_seeds == [10]
    dec = EvalConfig().decoding()
    assert dec.do_sample and dec.temperature == 1.0 and dec.top_k == 0 and dec.no_repeat_ngram_size == 6
    assert dec.max_new_tokens == 256
    assert split_named_spec("a=b/c.jsonl", kind="data") == ("a", "b/c.jsonl")
    assert split_named_spec("dir/x=y.jsonl", kind="data") == (None, "dir/x=y.jsonl")
    assert default_model_name("runs/fkl-pocl/final") == "fkl-pocl/final"
    assert default_model_name("runs/x/checkpoints/step-100") == "x/step-100"
    assert default_model_name("models/SmolLM2.Q4.gguf") == "SmolLM2.Q4"
    with pytest.raises(ConfigError, match="both named 'final'"):
        named_specs(["a/final", "final"], kind="model", default_name=lambda p: "final")
    assert main(["eval", "--data", "x.jsonl"]) == 2  # no model: ConfigError, exit 2
    (tmp_path / "c.yaml").write_text("model: {student: x}\n")
    assert main(["eval", "--config", str(tmp_path / "c.yaml")]) == 2  # no eval: section
