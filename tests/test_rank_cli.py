"""`pocl rank` on the tiny student and data: writes the ranking, reuses it, re-ranks without generating."""

from __future__ import annotations

import json

import pytest

import pocl.curriculum.measurement as measurement
from pocl.cli import main


def _args(tiny_pair, tiny_data, out, *extra):
    _, student = tiny_pair
    return ["rank", "--student", str(student), "--train-file", str(tiny_data[0]), "--max-length", "48",
            "--max-prompt-length", "32", "--rank-max-new-tokens", "6", "--output-dir", str(out), "--no-progress",
            *extra]


def test_rank_writes_reuses_and_reranks(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(tiny_pair, tiny_data, out)) == 0
    text = capsys.readouterr().out
    path = out / "ranking.jsonl"
    assert f"ranking: {path}" in text and "48 samples ranked by rrf (computed: no ranking file" in text
    assert "Q1" in text and "Q4" in text and "ROUGE-L" in text
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 48 and [x["rank"] for x in lines] == list(range(1, 49))
    meta = json.loads((out / "ranking.meta.json").read_text())
    assert meta["counts"]["samples"] == 48 and meta["order_inputs"]["measurer"] == "rrf"
    first = [x["id"] for x in lines]

    def forbidden(*a, **k):
        raise AssertionError("generate called")

    monkeypatch.setattr(measurement, "generate", forbidden)
    assert main(_args(tiny_pair, tiny_data, out)) == 0
    assert "(reused: reusing" in capsys.readouterr().out
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == first

    assert main(_args(tiny_pair, tiny_data, out, "--measurer", "loss")) == 0
    text = capsys.readouterr().out
    assert "ranked by loss (reranked:" in text and "measurer rrf -> loss" in text
    by_loss = [json.loads(x) for x in path.read_text().splitlines()]
    losses = [x["loss"] for x in by_loss]
    assert losses == sorted(losses) and [x["id"] for x in by_loss] != first


def test_rank_to_a_chosen_file_and_missing_arguments(tmp_path, tiny_pair, tiny_data, capsys):
    target = tmp_path / "elsewhere" / "dev-ranking.jsonl"
    assert main(_args(tiny_pair, tiny_data, tmp_path / "run", "--ranking-file", str(target),
                      "--measurer", "random", "--seed", "4")) == 0
    assert target.exists() and (tmp_path / "elsewhere" / "dev-ranking.meta.json").exists()
    assert "ranked by random" in capsys.readouterr().out
    assert main(["rank", "--train-file", str(tiny_data[0])]) == 2
    assert "--student" in capsys.readouterr().err
    _, student = tiny_pair
    assert main(["rank", "--student", str(student)]) == 2
    assert "--train-file" in capsys.readouterr().err


def test_rank_help_lists_the_curriculum_flags(capsys):
    with pytest.raises(SystemExit):
        main(["rank", "--help"])
    out = capsys.readouterr().out
    for flag in ("--measurer", "--rrf-k", "--ranking-file", "--rank-temperature", "--output-dir", "--student"):
        assert flag in out
    assert "--divergence" not in out and "--batch-size" not in out


def test_rank_with_the_teacher_measurers(tmp_path, tiny_pair, tiny_data, capsys):
    teacher, _ = tiny_pair
    out = tmp_path / "run"
    assert main(_args(tiny_pair, tiny_data, out, "--measurer", "teacher_kl")) == 2
    err = capsys.readouterr().err
    assert "--teacher" in err and "teacher_kl" in err and not out.exists()
    assert main(_args(tiny_pair, tiny_data, out, "--measurer", "teacher_kl", "--teacher", str(teacher))) == 0
    text = capsys.readouterr().out
    assert "48 samples ranked by teacher_kl (computed:" in text and "teacher batches: 2 measured now" in text
    assert "teacher_kl" in text.split("quartile")[1] and "(measurement: teacher " in text
    rows = [json.loads(x) for x in (out / "ranking.jsonl").read_text().splitlines()]
    assert all(r["teacher_kl"] > 0 and r["teacher_entropy"] > 0 for r in rows)
    assert [r["teacher_kl"] for r in rows] == sorted(r["teacher_kl"] for r in rows)
    assert [r["teacher_kl_rank"] for r in rows] == list(range(1, 49)) and all(r["loss"] is None for r in rows)
    meta = json.loads((out / "ranking.meta.json").read_text())
    assert set(meta["teacher_inputs"]) == {"teacher"}
    assert main(_args(tiny_pair, tiny_data, out, "--measurer", "teacher_entropy", "--teacher", str(teacher))) == 0
    assert "ranked by teacher_entropy (reranked:" in capsys.readouterr().out
