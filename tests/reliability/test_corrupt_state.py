"""Corrupt or mismatched state: damaged checkpoints and ranking files are detected by their checksums
and never loaded; a resume with changed inputs is refused with what changed (unless
--allow-config-change); an interrupted folder replacement is put back."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pocl.training import checkpoint as ckpt
from pocl.errors import CheckpointError
from tests.conftest import make_llama, save_model
from tests.reliability.conftest import STOP_STEP, pocl_argv
from tests.reliability.helpers import assert_same_weights, run_cli, snapshot


def _truncate(path, keep=0.5):
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def _edit_state(path):
    state = json.loads(path.read_text())
    state["state"]["global_step"] += 1  # what a hand edit might do: same layout, other content
    path.write_text(json.dumps(state, indent=1, default=str))


DAMAGE = {
    "model.safetensors-truncated": (lambda f: _truncate(f / "model.safetensors"),
                                    r"model.safetensors has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    "optimizer.pt-truncated": (lambda f: _truncate(f / "optimizer.pt"),
                               r"optimizer.pt has \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    "trainer_state.json-edited": (lambda f: _edit_state(f / "trainer_state.json"),
                                  r"trainer_state.json (has \d+ bytes|does not match its checksum)"),
    "manifest-deleted": (lambda f: (f / "manifest.json").unlink(), r"no manifest.json \(incomplete"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(
        damage, use_copy, reliability_bases, tiny_pair, capsys):
    root = use_copy("interrupted")
    newest = root / "run" / "checkpoints" / ckpt.step_dir_name(STOP_STEP)
    apply, message = DAMAGE[damage]
    apply(newest)
    code, _, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 0
    import re

    assert re.search(rf"skipping checkpoint at step {STOP_STEP}: .*{message}", err), err[-2000:]
    assert "resuming from run/checkpoints/step-00000004" in err
    assert_same_weights(reliability_bases["completed"] / "run" / "final", root / "run" / "final")


def test_when_no_checkpoint_is_intact_the_run_stops_and_changes_nothing(use_copy, tiny_pair, capsys):
    root = use_copy("interrupted")
    for _, folder in ckpt.list_checkpoints(root / "run" / "checkpoints"):
        _truncate(folder / "model.safetensors", keep=0.9)
    before = snapshot(root)
    code, _, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 2
    assert "has checkpoints but none is complete and intact; use --overwrite to start over" in err
    assert snapshot(root) == before


def test_a_ranking_file_cut_mid_line_is_measured_again(use_copy, reliability_bases, tiny_pair, capsys):
    root = use_copy("interrupted")
    ranking = root / "run" / "ranking.jsonl"
    original = ranking.read_bytes()
    cut = original.index(b"\n", len(original) // 2) - 7
    ranking.write_bytes(original[:cut])  # the last line stops in the middle
    code, _, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 0
    assert f"the ranking file run/ranking.jsonl is corrupt: {cut} bytes, the metadata says {len(original)}" in err
    assert ranking.read_bytes() == original  # measured again: the same ranking, so the resume goes on
    assert "resuming from run/checkpoints/step-00000005" in err
    assert_same_weights(reliability_bases["completed"] / "run" / "final", root / "run" / "final")


# ------------------------------------------------------------------------------------ changed inputs
@pytest.fixture(scope="module")
def other_models(tmp_path_factory, suite_tokenizer):
    """Another teacher and another student of the same shapes (other random weights)."""
    root = tmp_path_factory.mktemp("other_models")
    teacher = save_model(make_llama(suite_tokenizer, hidden=32, layers=2, seed=11), suite_tokenizer, root / "teacher")
    student = save_model(make_llama(suite_tokenizer, hidden=16, layers=1, seed=12), suite_tokenizer, root / "student")
    return teacher, student


def _edit_one_row(root):
    path = root / "data" / "train.jsonl"
    rows = path.read_text().splitlines()
    row = json.loads(rows[7])
    row["output"] += " 1"
    rows[7] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n")


CHANGES = {
    # name: (how to change the run, extra flags, model overrides, what the message must say)
    "data": (_edit_one_row, [], {}, [r"train_data changed \(fingerprint \w+ -> \w+\)"]),
    "teacher": (None, [], {"teacher": 0}, [r"model.teacher: '.*/tiny_pair\d*/teacher' -> '.*/other_models\d*/teacher'",
                                           r"teacher changed \(fingerprint \w+ -> \w+\)"]),
    "student": (None, [], {"student": 1}, [r"model.student: '.*/tiny_pair\d*/student' -> '.*/other_models\d*/student'",
                                           r"student_init changed \(fingerprint \w+ -> \w+\)"]),
    "divergence": (None, ["--divergence", "rkl"], {}, [r"loss.divergence: 'fkl' -> 'rkl'"]),
    "num_stages": (None, ["--num-stages", "3"], {}, [r"curriculum.num_stages: 2 -> 3"]),
}


def _changed_argv(change, tiny_pair, other_models, root, *more):
    edit, flags, models, _ = CHANGES[change]
    if edit is not None:
        edit(root)
    overrides = {k: other_models[i] for k, i in models.items()}
    return pocl_argv(tiny_pair, *flags, *more, **overrides)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_resume_with_changed_inputs_is_refused_with_what_changed(change, use_copy, tiny_pair, other_models,
                                                                   capsys):
    import re

    root = use_copy("interrupted")
    before = snapshot(root / "run")
    code, _, err = run_cli(_changed_argv(change, tiny_pair, other_models, root), capsys)
    assert code == 2
    assert f"pocl: error: cannot resume from run/checkpoints/step-0000000{STOP_STEP}: the run differs" in err
    for pattern in CHANGES[change][3]:
        assert re.search(pattern, err), (pattern, err[-1500:])
    assert "--allow-config-change to resume anyway" in err and "Traceback" not in err
    # Refused before anything ran: not even the ranking pass rewrote its file (pipeline.check_resume_before_ranking).
    assert snapshot(root / "run") == before
    assert "ranking:" not in err, "the ranking pass ran before the resume was refused"


def test_allow_config_change_resumes_anyway(use_copy, tiny_pair, other_models, capsys):
    root = use_copy("interrupted")
    code, stdout, err = run_cli(_changed_argv("divergence", tiny_pair, other_models, root, "--allow-config-change"),
                                capsys)
    assert code == 0 and "status: completed" in stdout
    assert "loss.divergence: 'fkl' -> 'rkl'" in err and "resuming anyway (--allow-config-change)" in err
    assert f"resuming from run/checkpoints/step-0000000{STOP_STEP}" in err


# ------------------------------------------------------------------------------- folder replacement
def _files(data):
    def write(tmp):
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)
    return write


def test_a_crash_between_the_two_renames_of_a_replacement_puts_the_old_folder_back(tmp_path):
    best = tmp_path / "best"
    ckpt.atomic_folder_write(best, _files({"model.safetensors": b"old weights"}))
    before = snapshot(best)
    # the state a SIGKILL between os.replace(best, trash) and os.replace(tmp, best) leaves behind
    ckpt.atomic_folder_write(tmp_path / "staging", _files({"model.safetensors": b"new weights"}))
    os.replace(best, tmp_path / ".old-best-0123abcd")
    os.replace(tmp_path / "staging", tmp_path / ".tmp-best-4567cdef")
    ckpt.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert snapshot(best) == before
    ckpt.verify_folder(best)


def test_a_finished_replacement_only_loses_its_leftovers(tmp_path):
    best = tmp_path / "best"
    ckpt.atomic_folder_write(best, _files({"w": b"new"}))
    (tmp_path / ".old-best-0123abcd").mkdir()  # killed before the old folder was removed
    (tmp_path / ".tmp-step-00000007-89abcdef").mkdir()  # killed while writing
    ckpt.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (best / "w").read_bytes() == b"new"


def test_a_failed_second_rename_restores_the_old_folder(tmp_path, monkeypatch):
    best = tmp_path / "best"
    ckpt.atomic_folder_write(best, _files({"w": b"old"}))
    before = snapshot(best)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match=r"cannot write .*best: No space left on device \(errno 28\)\. Nothing "
                                              r"on disk was changed.*best is the previous one"):
        ckpt.atomic_folder_write(best, _files({"w": b"new"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and snapshot(best) == before


def test_checkpoint_listing_ignores_temporaries(tmp_path):
    (tmp_path / ".tmp-step-00000009-0123abcd").mkdir()
    ckpt.atomic_folder_write(tmp_path / ckpt.step_dir_name(8), _files({"w": b"x"}))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [8]
    shutil.rmtree(tmp_path / ".tmp-step-00000009-0123abcd")


def test_resume_differences_lists_what_the_trainer_refuses(reliability_bases, tiny_pair):
    """The look-ahead check (for callers that want to refuse before a long ranking pass) agrees with
    the trainer: nothing for the same run, the changed setting otherwise, logging options ignored."""
    from pocl.config import DistillConfig

    folder, saved = ckpt.newest_resume_state(reliability_bases["interrupted"] / "run" / "checkpoints")
    assert folder.name == ckpt.step_dir_name(STOP_STEP)
    config = DistillConfig.from_dict(saved["config"])
    same = dict(config=config, fingerprints=saved["fingerprints"], num_processes=1)
    assert ckpt.resume_differences(saved, **same) == []
    assert ckpt.resume_differences(saved, **dict(same, config=config.replace(train={"log_every": 5}))) == []
    assert ckpt.resume_differences(saved, **dict(same, config=config.replace(loss={"divergence": "rkl"}))) == \
        ["loss.divergence: 'fkl' -> 'rkl'"]
    changed = dict(saved["fingerprints"], teacher="0123")
    assert ckpt.resume_differences(saved, **dict(same, fingerprints=changed)) == \
        [f"teacher changed (fingerprint {saved['fingerprints']['teacher']} -> 0123)"]
    assert ckpt.resume_differences(saved, **dict(same, num_processes=2)) == [
        "number of processes: 1 -> 2 (only --parallelism fsdp2 checkpoints reshard)"]
