"""Bad input through the real command line: every case gives one clear error line (``pocl: error: ...``,
no traceback) and exit code 2, and leaves the files of the existing run in the output folder
(checkpoints, final/, best/, metrics.jsonl, the ranking files, summaries) byte for byte as they were.
docs/reliability.md lists these cases; keep the two in step."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from pocl.training import checkpoint as ckpt
from tests.conftest import make_llama, save_model
from tests.reliability.conftest import STOP_STEP, pocl_argv
from tests.reliability.helpers import assert_same_weights, distill_argv, run_cli, snapshot


def _rows(root):
    return (root / "data" / "train.jsonl").read_text().splitlines()


def _set_line(n: int, text: str):
    """Replace line ``n`` (1-based) of data/train.jsonl with ``text``."""
    def edit(root):
        rows = _rows(root)
        rows[n - 1] = text
        (root / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
    return edit


def _edit_row(n: int, **changes):
    def edit(root):
        row = json.loads(_rows(root)[n - 1])
        for key, value in changes.items():
            if value is _DROP:
                row.pop(key)
            else:
                row[key] = value
        _set_line(n, json.dumps(row))(root)
    return edit


_DROP = object()


def _write(name: str, blob: bytes):
    def edit(root):
        (root / name).write_bytes(blob)
    return edit


def _latin1_row(root):
    rows = _rows(root)
    blob = "\n".join(rows[:3]).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n'
    (root / "data" / "train.jsonl").write_bytes(blob + "\n".join(rows[4:]).encode() + b"\n")


# id: (change to the copy of the run, extra flags, pattern of the error line)
CASES = {
    "malformed-json": (_set_line(3, '{"instruction": "Add.", "output": '), [],
                       r"data/train.jsonl:3: invalid JSON: Expecting value: line 1 column \d+"),
    "missing-output": (_edit_row(5, output=_DROP), [],
                       r"data/train.jsonl:5: field 'output': missing output \(spelled 'output' or 'response'\)"),
    "missing-instruction": (_edit_row(5, instruction=_DROP), [],
                            r"data/train.jsonl:5: field 'instruction': missing instruction \(and no ready-made "
                            r"'prompt'\)"),
    "empty-output": (_edit_row(6, output="  "), [],
                     r"data/train.jsonl:6: field 'output': output is empty or whitespace only"),
    "empty-instruction": (_edit_row(6, instruction=""), [], r"data/train.jsonl:6: field 'instruction': instruction "
                                                            r"is empty"),
    "wrong-type-instruction": (_edit_row(2, instruction=5), [],
                               r"data/train.jsonl:2: field 'instruction': must be a string, got number"),
    "wrong-type-output": (_edit_row(2, output={"text": "4"}), [],
                          r"data/train.jsonl:2: field 'output': must be a string or a list of strings, got object"),
    "wrong-type-row": (_set_line(4, '["not", "an", "object"]'), [],
                       r"data/train.jsonl:4: row is not a JSON object \(got list\)"),
    "both-spellings": (_edit_row(4, response="x"), [],
                       r"data/train.jsonl:4: field 'response': both 'output' and 'response' are given"),
    "prompt-too-long-error": (None, ["--truncation-side", "error", "--max-prompt-length", "8"],
                              r"data/train.jsonl:1: field 'prompt': prompt of sample 'train-000000' has \d+ tokens, "
                              r"more than max_prompt_length=8 \(truncation_side='error'\)"),
    "empty-dataset": (_write("data/train.jsonl", b""), [], r"data/train.jsonl: no rows: the source is empty"),
    "blank-dataset": (_write("data/train.jsonl", b"\n  \n\n"), [], r"data/train.jsonl: no rows: the source is empty"),
    "not-utf8": (_latin1_row, [], r"data/train.jsonl:4: not valid UTF-8 \(byte 0xe9 at column 21\): invalid "
                                  r"continuation byte"),
    "duplicate-ids": (_edit_row(9, id="train-000003"), [],
                      r"data/train.jsonl:9: field 'id': duplicate id 'train-000003' \(also on line 4\); ids must be "
                      r"unique"),
    "unknown-divergence": (None, ["--divergence", "kll"],
                           r"unknown divergence 'kll'; did you mean 'kl' or 'skl' or 'rkl'\? \(known: .*fkl"),
    "fractions-not-increasing": (_write("run.yaml", b"curriculum:\n  stages:\n    - {fraction: 0.5}\n"
                                                    b"    - {fraction: 0.3}\n"), ["--config", "run.yaml"],
                                 r"curriculum.stages: stages\[1\].fraction must be larger than the previous stage's "
                                 r"\(0.5\)"),
    "negative-temperature": (None, ["--temperature", "-1"], r"loss.temperature: must be > 0 \(got -1.0\)"),
    "negative-stage-temperature": (_write("run.yaml", b"curriculum:\n  stages:\n    - {temperature: -1}\n"),
                                   ["--config", "run.yaml"],
                                   r"curriculum.stages: stages\[0\].temperature must be a finite number > 0"),
    "t-max-below-t-start": (None, ["--t-start", "2", "--t-max", "1"],
                            r"curriculum.t_max: must be >= t_start \(2.0\) \(got 1.0\)"),
    "missing-model-path": (None, ["--teacher", "./missing/teacher"], r"model path not found: ./missing/teacher"),
    "corrupt-yaml": (_write("run.yaml", b"train: [unclosed\n"), ["--config", "run.yaml"],
                     r"run.yaml: invalid YAML: while parsing a flow sequence"),
    "yaml-not-a-mapping": (_write("run.yaml", b"- train\n- loss\n"), ["--config", "run.yaml"],
                           r"run.yaml: the top level must be a mapping of sections, got list"),
    "unknown-config-key": (_write("run.yaml", b"train:\n  epoch: 3\n"), ["--config", "run.yaml"],
                           r"unknown key 'train.epoch' \(did you mean 'epochs'\?\); valid keys: output_dir"),
    "unknown-config-section": (_write("run.yaml", b"trian:\n  epochs: 3\n"), ["--config", "run.yaml"],
                               r"unknown config section 'trian' \(did you mean 'train'\?\)"),
    "non-numeric-yaml-key": (_write("run.yaml", b"train:\n  1: 3\n"), ["--config", "run.yaml"],
                             r"unknown key 'train.1'; valid keys: output_dir"),
    "infinite-number": (_write("run.yaml", b"train:\n  epochs: .inf\n"), ["--config", "run.yaml"],
                        r"train.epochs: expected a finite number \(got inf\)"),
    "missing-config-file": (None, ["--config", "nowhere.yaml"], r"config file not found: nowhere.yaml"),
}

# rejected by argparse itself (one line: the error and a hint; exit 2)
ARGPARSE_CASES = {
    "unknown-flag": (["--epohcs", "3"], r"pocl distill: error: unrecognized argument --epohcs; did you mean --epochs\?"),
    "flag-value-not-a-number": (["--lr", "fast"], r"pocl distill: error: argument --lr: lr: could not convert "
                                                  r"string to float: 'fast'"),
    "flag-value-infinite": (["--epochs", "inf"], r"pocl distill: error: argument --epochs: epochs: expected a finite "
                                                 r"number \(got 'inf'\)"),
    "flag-value-not-a-choice": (["--truncation-side", "middle"], r"pocl distill: error: argument --truncation-side: "
                                                                 r"invalid choice: 'middle'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(case, use_copy, tiny_pair, capsys):
    root = use_copy("completed")
    before = snapshot(root / "run")
    edit, flags, pattern = CASES[case]
    if edit is not None:
        edit(root)
    code, stdout, err = run_cli(pocl_argv(tiny_pair, *flags), capsys)
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("pocl: error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err[-2000:]
    assert "Traceback" not in err
    assert snapshot(root / "run") == before


@pytest.mark.parametrize("case", list(ARGPARSE_CASES))
def test_bad_flags_are_refused_by_the_parser(case, use_copy, tiny_pair, capsys):
    root = use_copy("completed")
    before = snapshot(root / "run")
    flags, pattern = ARGPARSE_CASES[case]
    code, _, err = run_cli(pocl_argv(tiny_pair, *flags), capsys)
    assert code == 2 and re.search(pattern, err), err[-1500:]
    assert snapshot(root / "run") == before


# ------------------------------------------------------------------------------- models that do not fit
@pytest.fixture(scope="module")
def misfit_models(tmp_path_factory, suite_tokenizer):
    """A teacher with another tokenizer, and one whose output layer is smaller than the tokenizer."""
    from pocl.data import build_tokenizer

    root = tmp_path_factory.mktemp("misfits")
    other_tok = build_tokenizer(["a completely different corpus of words"] * 20, vocab_size=300)
    other = save_model(make_llama(other_tok, hidden=32, layers=2, seed=1), other_tok, root / "other_tokenizer")
    small = save_model(make_llama(suite_tokenizer, hidden=32, layers=2, seed=1, vocab_rows=100), suite_tokenizer,
                       root / "small_head")
    return {"other_tokenizer": other, "small_head": small}


@pytest.mark.parametrize("which,pattern", [
    ("other_tokenizer", r"the teacher and student tokenizers differ \(\d+ vs \d+ tokens; only in the teacher's: .*"
                        r"both models must share one tokenizer"),
    ("small_head", r"vocabulary mismatch: teacher output layer 100 rows, student \d+, tokenizer \d+ tokens"),
])
def test_teacher_and_student_vocabularies_must_match(which, pattern, use_copy, tiny_pair, misfit_models, capsys):
    root = use_copy("completed")
    before = snapshot(root / "run")
    code, _, err = run_cli(pocl_argv(tiny_pair, teacher=misfit_models[which]), capsys)
    assert code == 2 and re.search(r"pocl: error: " + pattern, err), err[-1500:]
    assert snapshot(root / "run") == before


# ------------------------------------------------------------------------------- inputs that are accepted
def test_a_long_prompt_is_cut_on_the_left_and_counted(tmp_path, tiny_pair, tiny_data, capsys):
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--max-prompt-length", "8",
                                        "--max-steps", "1"), capsys)
    assert code == 0
    found = re.search(r"training data: 48 samples from .*train.jsonl \((\d+) prompts and 0 responses truncated\)", err)
    assert found and int(found.group(1)) > 0


def test_skip_invalid_rows_reports_what_it_skipped(tmp_path, tiny_pair, tiny_data, capsys):
    rows = tiny_data[0].read_text().splitlines()
    rows[2] = '{"instruction": "Add.", "output": '
    rows[6] = json.dumps({"id": "bad-7", "instruction": 7, "output": "x"})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--skip-invalid-rows",
                                        "--max-steps", "1", train=train), capsys)
    assert code == 0
    assert "loaded 46 rows, skipped 2 invalid rows: 000002 (line 3), bad-7 (line 7)" in err
    assert "training data: 46 samples" in err


# ------------------------------------------------------------------------------- a full disk
def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_while_writing_a_checkpoint(use_copy, reliability_bases, tiny_pair, capsys):
    """The resumed run cannot write its next checkpoint: torch.save fails with ENOSPC after the model
    files of the checkpoint are already in its temporary folder."""
    root = use_copy("interrupted")
    run = root / "run"
    before = snapshot(run, exclude=["metrics.jsonl", "best"])
    metrics_before = (run / "metrics.jsonl").read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", _no_space)
        code, _, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 2 and "Traceback" not in err
    step = STOP_STEP + 1
    assert (f"pocl: error: cannot write run/checkpoints/step-0000000{step}: No space left on device (errno 28). "
            f"Nothing on disk was changed: the partial write was removed, step-0000000{step} was not created and "
            "the other checkpoints are as they were. Free some space") in err
    assert snapshot(run, exclude=["metrics.jsonl", "best"]) == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    # best/ may have improved at the evaluation before the checkpoint: it is complete either way
    ckpt.verify_folder(run / "best")
    # the metrics of the steps after the last checkpoint were appended; a resume drops them again
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics_before)
    code, _, err = run_cli(pocl_argv(tiny_pair), capsys)  # space freed: the same command resumes
    assert code == 0 and f"resuming from run/checkpoints/step-0000000{STOP_STEP}" in err
    assert_same_weights(reliability_bases["completed"] / "run" / "final", run / "final")
    from pocl.training.metrics import read_metrics

    def steps(path):
        return [(r["split"], r["step"]) for r in read_metrics(path)]

    assert steps(run / "metrics.jsonl") == steps(reliability_bases["completed"] / "run" / "metrics.jsonl")


def test_a_full_disk_while_replacing_final(use_copy, tiny_pair, capsys, monkeypatch):
    """A run that stopped after writing final/ but before its summary is finished by running it again,
    which rewrites final/ (a completed run is left alone); with the disk full the old final/ stays."""
    from transformers import PreTrainedModel

    root = use_copy("completed")
    (root / "run" / "summary.json").unlink()
    before = snapshot(root / "run")

    def half_written(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"\0" * 100)  # part of the file, then the disk is full
        _no_space()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    code, _, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 2
    assert ("pocl: error: cannot write run/final: No space left on device (errno 28). Nothing on disk was changed: "
            "the partial write was removed, final is the previous one") in err
    assert snapshot(root / "run") == before


def test_a_full_disk_while_logging_or_writing_ranking_files(tmp_path, monkeypatch):
    """The other writers report ENOSPC the same way (CheckpointError: exit 2) and keep what was on disk."""
    import pocl.curriculum.ranking_journal as journal_mod
    from pocl.curriculum import RankedSample, write_ranking
    from pocl.errors import CheckpointError
    from pocl.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"step": 1, "loss": 1.0})

    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    logger._fh = FullDisk()
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics.jsonl: No space left on device \(errno 28\); "
                                              r"the run stops here, the last checkpoint is intact"):
        logger.log({"step": 2, "loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'

    path = tmp_path / "ranking.jsonl"
    ranking = [RankedSample(id="a", rank=1, score=None, rouge_l=None, loss=None, rouge_rank=None, loss_rank=None)]
    write_ranking(path, ranking, {"signals_hash": "x"})
    before = snapshot(tmp_path)
    monkeypatch.setattr(journal_mod.os, "fsync", _no_space)
    with pytest.raises(CheckpointError, match=r"cannot write .*ranking.jsonl: No space left on device \(errno 28\); "
                                              r"the previous file, if any, is unchanged"):
        write_ranking(path, ranking + [dataclasses.replace(ranking[0], id="b", rank=2)], {"signals_hash": "x"})
    assert snapshot(tmp_path) == before  # and no temporary file left

    journal = journal_mod.PartialMeasurement.__new__(journal_mod.PartialMeasurement)
    journal.path = tmp_path / "ranking.partial.jsonl"
    journal._fh = open(journal.path, "ab")
    with pytest.raises(CheckpointError, match=r"cannot append to .*ranking.partial.jsonl: No space left on device "
                                              r"\(errno 28\); the batches measured so far are kept there"):
        journal._append({"signal": "loss", "batch": 0, "ids": ["a"], "loss": [1.0]})
    journal.close()
