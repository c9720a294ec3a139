"""The model card (README.md) of final/ and best/: written with the folder (in its manifest), HF
metadata that parses, the run's real models, data hash, stages and dev score; the same after a resume;
`pocl card` adds `pocl eval` scores atomically and refuses folders pocl did not write."""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import ModelCard

from pocl.errors import CheckpointError
from pocl.pipeline import distill
from pocl.reporting.model_card import CARD_FILE, refresh_cards
from pocl.training import output_dirs
from pocl.training.checkpoint import verify_folder
from tests.conftest import tiny_config

#: dev ROUGE-L on a few short generations: cheap, and a dev score to put on the card.
DEV = {"dev_rouge_samples": 4, "dev_rouge_max_new_tokens": 8}


def _stage_rows(body: str) -> list[list[str]]:
    """The rows of the card's curriculum table (cells stripped)."""
    section = body.split("## Curriculum", 1)[1].split("## Budget", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| stage |")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def _without_timings(text: str) -> str:
    return re.sub(r"- wall time: .*", "- wall time: ...", text)


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, tiny_pair, tiny_data):
    tmp = tmp_path_factory.mktemp("card_kd")
    result = distill(tiny_config(tmp, tiny_pair, tiny_data, train=dict(DEV, epochs=1)))
    assert result.status == "completed"
    return result


def test_final_card_has_the_runs_models_data_stages_and_dev_score(kd_run, tiny_pair, tiny_data):
    final = kd_run.final_dir
    summary = json.loads((kd_run.output_dir / "summary.json").read_text())
    manifest = verify_folder(final)  # README.md is one of the files the manifest vouches for
    assert CARD_FILE in manifest["files"]
    card = ModelCard.load(final / CARD_FILE)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"knowledge-distillation", "pocl", "kd"} <= set(data.tags)
    assert data.base_model is None  # a local student folder is not a Hub id (the body names it)
    teacher, student = tiny_pair
    assert f"`{teacher}`" in card.text and f"`{student}`" in card.text
    assert f"`{tiny_data[0]}`" in card.text and f"`{tiny_data[1]}`" in card.text
    assert summary["fingerprints"]["train_data"] in card.text and summary["fingerprints"]["dev_data"] in card.text
    rows = _stage_rows(card.text)
    assert [(r[0], int(r[1]), int(r[3])) for r in rows] == [(s["name"], s["num_samples"], s["steps"])
                                                             for s in summary["stages"]]
    # the dev score: the last dev evaluation (metrics.jsonl), in the body and in the model-index
    dev = [json.loads(line) for line in (kd_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in dev if r.get("split") == "dev"][-1]
    scores = {r.metric_type: r.metric_value for r in data.eval_results}
    assert scores["rougeL"] == pytest.approx(last["dev_rouge_l"]) and scores["loss"] == pytest.approx(last["dev_ce"])
    assert f"dev set at step {last['step']}" in card.text and "dev_rouge_l" in card.text
    assert f"optimizer steps: {summary['global_steps']}" in card.text
    assert "## How it was made" in card.text and "pocl 0.1.0" in card.text
    # best/ has its own card, in its manifest too; neither makes the run folder foreign
    best = kd_run.best_dir
    assert CARD_FILE in verify_folder(best)["files"]
    best_card = ModelCard.load(best / CARD_FILE)
    assert "This folder is `best/`" in best_card.text and f"at step {summary['best_step']}" in best_card.text
    output_dirs.check_output_dir(kd_run.output_dir, inputs=[("teacher", str(teacher))], kind="run")


def test_pocl_curriculum_card_shows_its_four_stages(tmp_path, tiny_pair, tiny_data):
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, curriculum={
        "curriculum": "pocl", "num_stages": 4, "stage_epochs": 1, "rank_max_new_tokens": 4, "rank_batch_size": 16},
        data={"dev_file": None})
    result = distill(cfg)
    summary = json.loads((result.output_dir / "summary.json").read_text())
    card = ModelCard.load(result.final_dir / CARD_FILE)
    rows = _stage_rows(card.text)
    assert len(rows) == len(summary["stages"]) == 4
    for row, stage in zip(rows, summary["stages"]):
        assert row[0] == stage["name"] and int(row[1]) == stage["num_samples"] and int(row[3]) == stage["steps"]
        assert float(row[4]) == pytest.approx(stage["temperature"], rel=1e-2)
        assert float(row[5]) == pytest.approx(stage["alpha"], rel=1e-2)
    assert "curriculum-learning" in card.data.tags and "curriculum: **pocl**" in card.text
    assert card.data.eval_results is None and "no dev evaluation (no dev set)" in card.text
    verify_folder(result.final_dir)


def test_a_resumed_run_writes_the_same_card(tmp_path, tiny_pair, tiny_data, monkeypatch):
    import pocl.pipeline
    from tests.training.test_trainer import crash_at

    train = dict(DEV, epochs=2, save_every=2)
    ref = distill(tiny_config(tmp_path / "a", tiny_pair, tiny_data, train=train))
    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, train=train)
    make_trainer = pocl.pipeline.make_trainer

    def crashing(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.step_callbacks.append(crash_at(7))
        return trainer

    monkeypatch.setattr(pocl.pipeline, "make_trainer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(cfg)
    assert not (tmp_path / "b" / "run" / "final").exists()
    monkeypatch.setattr(pocl.pipeline, "make_trainer", make_trainer)
    resumed = distill(cfg)  # resumes from the checkpoint at step 6
    assert resumed.status == "completed"
    verify_folder(resumed.final_dir)
    for name in ("final", "best"):
        a = (ref.output_dir / name / CARD_FILE).read_text().replace(str(tmp_path / "a"), "TMP")
        b = (resumed.output_dir / name / CARD_FILE).read_text().replace(str(tmp_path / "b"), "TMP")
        assert _without_timings(a) == _without_timings(b), name


def _results(models: dict[str, str], tmp_path, name="results.json"):
    """A pocl eval results.json (the fields the card reads) for ``models`` (name -> path)."""
    data = {"sets": {"test": {"path": "test.jsonl", "n": 16}},
            "models": {n: {"path": p, "sets": {"test": {"n": 16, "rouge_l": {"mean": 12.5, "std": 0.5},
                                                         "exact_match": {"mean": 3.0, "std": 0.0}}}}
                       for n, p in models.items()}}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_pocl_card_adds_eval_scores_atomically(kd_run, tmp_path):
    run = kd_run.output_dir
    before = verify_folder(kd_run.final_dir)["files"]
    best_before = (kd_run.best_dir / CARD_FILE).read_text()
    results = _results({"final": str(kd_run.final_dir), "other": "/elsewhere/model"}, tmp_path)
    written = refresh_cards(run, [results])
    assert written == [run / "final" / CARD_FILE, run / "best" / CARD_FILE]
    after = verify_folder(kd_run.final_dir)  # a new manifest that matches the files
    assert {k: v for k, v in after["files"].items() if k != CARD_FILE} == \
        {k: v for k, v in before.items() if k != CARD_FILE}  # the model's files are unchanged
    card = ModelCard.load(kd_run.final_dir / CARD_FILE)
    assert "| test | 12.5 ± 0.5 | 3 ± 0 | 16 |" in card.text and str(results) in card.text
    test_scores = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_name == "test"}
    assert test_scores == {"rougeL": 12.5, "exact_match": 3.0}
    assert "dev_rouge_l" in card.text  # still the dev score
    best = ModelCard.load(kd_run.best_dir / CARD_FILE)
    assert "12.5" not in best.text  # best/ was not evaluated: its card is rebuilt as it was written
    assert _without_timings((kd_run.best_dir / CARD_FILE).read_text()) == _without_timings(best_before)
    verify_folder(kd_run.best_dir)
    assert not [p for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    output_dirs.check_output_dir(run, kind="run")


def test_pocl_card_refuses_a_folder_pocl_did_not_write(kd_run, tmp_path):
    final = kd_run.final_dir
    extra = final / "notes.txt"
    extra.write_text("mine")
    card_before = (final / CARD_FILE).read_text()
    try:
        with pytest.raises(CheckpointError, match="pocl did not write"):
            refresh_cards(kd_run.output_dir, [_results({"final": str(final)}, tmp_path)])
        assert (final / CARD_FILE).read_text() == card_before and extra.read_text() == "mine"
    finally:
        extra.unlink()
    (final / CARD_FILE).write_text(card_before + "tampered\n")
    try:
        with pytest.raises(CheckpointError, match="README.md"):
            refresh_cards(kd_run.output_dir)
    finally:
        (final / CARD_FILE).write_text(card_before)
    verify_folder(final)


def test_pocl_card_command(kd_run, tmp_path, capsys):
    from pocl.cli import main

    results = _results({"final": str(kd_run.final_dir)}, tmp_path)
    assert main(["card", str(kd_run.output_dir), "--eval", str(results.parent)]) == 0
    assert str(kd_run.final_dir / CARD_FILE) in capsys.readouterr().out
    assert "12.5 ± 0.5" in (kd_run.final_dir / CARD_FILE).read_text()
    verify_folder(kd_run.final_dir)


def test_card_metadata_from_hub_ids_a_students_license_and_stage_teachers(tmp_path):
    from pocl.reporting.model_card import render_card

    student = tmp_path / "student"
    student.mkdir()
    (student / CARD_FILE).write_text("---\nlicense: apache-2.0\n---\n\n# a student\n")
    summary = {"output_dir": str(tmp_path / "run"), "method": "sft", "curriculum": "none", "global_steps": 4,
               "skipped_steps": 0, "train_seconds": 1.5, "best_metric": None,
               "fingerprints": {"student_init": "s1", "train_data": "d1", "stage_teachers": {"org/mid": "m1"}},
               "stages": [{"name": "a", "num_samples": 8, "epochs": 1, "steps": 2, "temperature": 1.0,
                           "alpha": 0.0, "teacher": "org/mid"},
                          {"name": "b", "num_samples": 8, "epochs": 1, "steps": 2, "temperature": 2.0, "alpha": 0.5}]}
    config = {"model": {"teacher": None, "student": str(student)},
              "data": {"train_file": "org/data", "dev_file": None}, "train": {"batch_size": 4}}
    text = render_card(summary, config, dev={"step": 4, "dev_rouge_l": float("nan"), "dev_ce": 2.5})
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.datasets == ["org/data"]
    assert card.data.base_model is None and "sft" in card.data.tags
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", 2.5)]  # NaN left out
    assert "| teacher | none (method sft) | – |" in text and "| stage teacher | `org/mid` | `m1` |" in text
    assert [row[-1] for row in _stage_rows(text)] == ["`org/mid`", "–"]
    assert "samples trained: 16 (" in text  # 8 x 1 + 8 x 1
    hub = render_card(summary, dict(config, model={"teacher": "org/big", "student": "org/small"}))
    assert ModelCard(hub).data.base_model == "org/small" and ModelCard(hub).data.eval_results is None
