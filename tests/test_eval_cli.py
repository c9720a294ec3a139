"""`pocl eval` end to end on the tiny pair: two seeds, two small sets, outputs and the Markdown table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pocl.cli import flag_name, main
from pocl.errors import ConfigError
from pocl.config.eval import EvalConfig, default_model_name, named_specs, split_named_spec
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
    # the settings handed to transformers' generate, explicitly: no top-k is top_k 0 (None would be 50)
    gen = data["generation_config"]
    assert gen["transformers_version"] == data["versions"]["transformers"]
    settings = gen["settings"]
    assert settings["top_k"] == 0 and settings["top_p"] == 1.0 and settings["temperature"] == 1.0
    assert settings["no_repeat_ngram_size"] == 6 and settings["max_new_tokens"] == 6 and settings["do_sample"] is True
    assert settings["typical_p"] == 1.0 and settings["min_p"] is None and settings["epsilon_cutoff"] == 0.0
    assert settings["repetition_penalty"] == 1.0 and settings["num_beams"] == 1
    per_model = data["models"]["student"]["generation_config"]
    assert per_model == {**settings, "eos_token_id": 0, "pad_token_id": per_model["pad_token_id"]}
    assert data["em_normalization"] == "squad"
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
    # the answer lengths in results.md: generated tokens and the share ending with EOS, from every answer
    cells = []
    for col in ("suite", "multi"):
        mine = [r for r in rows if r["model"] == "student" and r["set"] == col]
        cells.append((sum(r["generated_tokens"] for r in mine) / len(mine),
                      100 * sum(r["stopped_at_eos"] for r in mine) / len(mine)))
    cells.append((sum(c[0] for c in cells) / 2, sum(c[1] for c in cells) / 2))
    assert "## Answer length" in md
    assert "| student | " + " | ".join(f"{t:.1f} ({e:.0f} %)" for t, e in cells) + " |" in md
    assert not list(out.glob(".*"))  # temporary files replaced

    # the bar chart reads this results.json
    assert main(["report", "--eval-results", str(out / "results.json"), "--output-dir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "eval_rouge_l.png").stat().st_size > 10_000


def rank(student, data, out, *extra) -> Path:
    """`pocl rank` of ``data`` (the random measurer: the file and its sample hashes are what matter)."""
    assert main(["rank", "--student", str(student), "--train-file", str(data), "--measurer", "random", "--seed", "1",
                 "--max-length", "48", "--max-prompt-length", "32", "--output-dir", str(out), "--no-progress",
                 *extra]) == 0
    return out / "ranking.jsonl"


@pytest.fixture(scope="module")
def no_id_sets(tmp_path_factory, tiny_data):
    """Rows without ids (as DollyEval and most released sets): the test and the training file both
    number their rows 000000, 000001 ..."""
    root = tmp_path_factory.mktemp("no_id_sets")
    strip = [[{k: v for k, v in json.loads(line).items() if k != "id"} for line in path.read_text().splitlines()]
             for path in (tiny_data[0], tiny_data[2])]
    return write_jsonl(root / "train.jsonl", strip[0][:6]), write_jsonl(root / "test.jsonl", strip[1][:6])


@pytest.fixture()
def no_generation(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("generation started although the ranking is wrong")

    monkeypatch.setattr("pocl.evaluation.scoring.generate", forbidden)


def test_yaml_config_greedy_and_ranking_breakdown(tmp_path, tiny_pair, sets, capsys):
    _, student = tiny_pair
    ranking = rank(student, sets[0], tmp_path / "rank")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{student: {student}}}\n"  # other sections are ignored
                   f"eval:\n  models: [s={student}]\n  data: ['{sets[0]}']\n  greedy: true\n  seeds: [7, 8]\n"
                   f"  max_new_tokens: 4\n  max_prompt_length: 32\n  num_buckets: 2\n  progress: false\n")
    out = tmp_path / "out"
    assert main(["eval", "--config", str(cfg), "--ranking", str(ranking), "--output-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [7] and data["decoding"]["do_sample"] is False  # greedy: one pass
    bd = data["breakdown"]["s"]["suite"]
    assert bd["coverage"]["covered"] == 6 and bd["coverage"]["evaluated"] == 6
    assert [b["n"] for b in bd["buckets"]] == [3, 3]
    md = (out / "results.md").read_text()
    assert "By difficulty" in md and "covers 6 of 6" in md and "B1 (easiest)" in md
    assert "one pass, seed 7" in md


def test_matching_ranking_is_accepted_with_another_template_and_a_subset(tmp_path, tiny_pair, no_id_sets, capsys):
    """The hashes are computed with the template stamped in the ranking's metadata (here alpaca), so
    evaluating with another prompt template still recognises the ranking; evaluating the first rows
    of a ranked set is fine too."""
    _, student = tiny_pair
    ranking = rank(student, no_id_sets[1], tmp_path / "rank")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(student), "--data", str(no_id_sets[1]), "--ranking", str(ranking),
                 "--template", "plain", "--max-samples", "4", "--num-buckets", "2", "--seeds", "1",
                 "--max-new-tokens", "2", "--max-prompt-length", "32", "--output-dir", str(out), "--no-progress"]) == 0
    bd = json.loads((out / "results.json").read_text())["breakdown"]["student"]["test"]
    assert bd["coverage"]["covered"] == bd["coverage"]["evaluated"] == 4 and [b["n"] for b in bd["buckets"]] == [2, 2]


def test_training_ranking_for_a_test_set_fails_before_generation(tmp_path, tiny_pair, sets, capsys, no_generation):
    ranking = write_jsonl(tmp_path / "ranking.jsonl", [{"id": "train-000001", "rank": 1}])
    code = main(["eval", "--model", str(tiny_pair[1]), "--data", str(sets[0]), "--ranking", str(ranking),
                 "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pocl rank --student INITIAL_STUDENT --train-file" in err and "Traceback" not in err
    assert "6 of the 6 evaluated samples are not in the ranking" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_ranking_of_another_set_with_the_same_ids_is_refused(tmp_path, tiny_pair, no_id_sets, capsys, no_generation):
    """The bug: rows without ids are 000000 ... in both files, so a training ranking 'covered' the test set."""
    _, student = tiny_pair
    train, test = no_id_sets
    ranking = rank(student, train, tmp_path / "rank")
    ids = [json.loads(line)["id"] for line in ranking.read_text().splitlines()]
    assert sorted(ids) == [f"{k:06d}" for k in range(6)]  # the same ids as the test set's
    capsys.readouterr()
    code = main(["eval", "--model", str(student), "--data", str(test), "--ranking", str(ranking),
                 "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"the ranking {ranking} does not rank evaluation set 'test' ({test})" in err
    assert "6 have the same id but another sample hash" in err and "'000000'" in err
    assert f"pocl rank --student INITIAL_STUDENT --train-file {test}" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_ranking_of_a_changed_or_larger_set_is_refused(tmp_path, tiny_pair, no_id_sets, capsys, no_generation):
    _, student = tiny_pair
    test = no_id_sets[1]
    ranking = rank(student, test, tmp_path / "rank", "--max-train-samples", "3")
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    capsys.readouterr()
    # a ranking of the first 3 rows does not cover the 6 evaluated ones
    assert main(["eval", "--model", str(student), "--data", str(test), "--ranking", str(ranking),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "3 of the 6 evaluated samples are not in the ranking ('000003', '000004', '000005')" in \
        capsys.readouterr().err
    # the same rows with one reference edited: that one sample is named
    rows[1]["output"] = rows[1]["output"] + " changed"
    edited = write_jsonl(tmp_path / "edited.jsonl", rows[:3])
    assert main(["eval", "--model", str(student), "--data", str(edited), "--ranking", str(ranking),
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1 have the same id but another sample hash" in err and "('000001')" in err and str(edited) in err
    # a hand-written ranking without hashes cannot be checked
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"id": f"{k:06d}", "rank": k + 1} for k in range(3)])
    assert main(["eval", "--model", str(student), "--data", str(edited), "--ranking", str(bare),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "3 have no sample_hash in the ranking" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_ranking_without_metadata_is_hashed_with_the_evaluation_template(tmp_path, tiny_pair, no_id_sets, capsys,
                                                                          no_generation):
    _, student = tiny_pair
    test = no_id_sets[1]
    alone = tmp_path / "copied" / "ranking.jsonl"  # the .jsonl copied without its ranking.meta.json
    alone.parent.mkdir()
    alone.write_bytes(rank(student, test, tmp_path / "rank").read_bytes())
    capsys.readouterr()
    assert main(["eval", "--model", str(student), "--data", str(test), "--ranking", str(alone), "--template", "plain",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "6 have the same id but another sample hash" in err
    assert "template 'plain' (the evaluation's; the ranking has no metadata file)" in err


def test_exact_match_normalization_option(tmp_path, tiny_pair, sets, monkeypatch):
    """squad (the default) forgives case, punctuation and articles; whitespace does not."""
    from pocl.generation import Generation

    refs = [json.loads(line)["output"] for line in sets[0].read_text().splitlines()]

    def shouting(model, tokenizer, prompts, decoding, *, batch_size, seed, progress=None):
        # evaluate_records hands over the prompts in the order of the rows; the answer of each is its
        # reference in capitals, after an article and with a full stop: "THE 2 3 8."
        assert len(prompts) == len(refs)
        return [Generation([1], f"THE {r.upper()}.", True) for r in refs]

    monkeypatch.setattr("pocl.evaluation.scoring.generate", shouting)
    common = ["--model", str(tiny_pair[1]), "--data", str(sets[0]), "--seeds", "1", "--no-progress"]
    assert main(["eval", *common, "--output-dir", str(tmp_path / "squad")]) == 0
    assert main(["eval", *common, "--em-normalization", "whitespace", "--output-dir", str(tmp_path / "ws")]) == 0
    squad = json.loads((tmp_path / "squad" / "results.json").read_text())
    ws = json.loads((tmp_path / "ws" / "results.json").read_text())
    assert squad["em_normalization"] == "squad" and ws["em_normalization"] == "whitespace"
    assert squad["models"]["student"]["sets"]["suite"]["exact_match"]["mean"] == 100.0
    assert ws["models"]["student"]["sets"]["suite"]["exact_match"]["mean"] == 0.0
    assert "exact match after squad normalisation" in (tmp_path / "squad" / "results.md").read_text()
    with pytest.raises(SystemExit) as exc:  # argparse choices
        main(["eval", *common, "--em-normalization", "lower", "--output-dir", str(tmp_path / "x")])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="eval.em_normalization"):
        EvalConfig.from_dict({"em_normalization": "lower"})  # the YAML key


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
