"""No command deletes or replaces a folder it did not create, and none writes into its own input model.

Every test builds the situation on disk (a user's folder with a thesis, a folder holding two runs,
the teacher's own folder, ...), runs the real command line (``pocl.cli.main`` in this process) and
checks the exit code, the one-line error, and that nothing under the test's folder changed: every
path (folders included) and every file's bytes are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pocl.errors import CheckpointError, ConfigError
from pocl.training import checkpoint as ckpt
from pocl.training import output_dirs
from tests.reliability.helpers import TINY_FLAGS, run_cli



# ----------------------------------------------------------------------------------------------- helpers
def tree_hash(root: Path) -> dict[str, str]:
    """Every path under ``root`` (folders and links included) -> what it is: the sha256 of a file's
    bytes, ``dir`` or ``link -> target``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys, root: Path, pattern: str) -> str:
    """Run ``argv``; assert exit code 2, one line ``pocl: error: <pattern>`` on stderr, nothing under
    ``root`` changed. Returns the error line."""
    before = tree_hash(root)
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("pocl: error:")]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert tree_hash(root) == before, "files changed on disk"
    return lines[0]


def user_folder(path: Path) -> Path:
    """A user's folder: a thesis, a figure, a subfolder."""
    (path / "figures").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}\n% four years of work\n")
    (path / "figures" / "fig1.pdf").write_bytes(b"%PDF-1.4 not really")
    return path


def fake_run(path: Path) -> Path:
    """A pocl run folder as distill leaves it (final/ with its manifest, metrics, config)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("train: {output_dir: x}\n")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    ckpt.atomic_folder_write(path / "final", lambda tmp: (tmp / "model.safetensors").write_bytes(b"weights"))
    return path


@pytest.fixture
def teacher(tmp_path, tiny_pair) -> Path:
    """A private copy of the tiny teacher (2 layers) under tmp_path/models/teacher."""
    return Path(shutil.copytree(tiny_pair[0], tmp_path / "models" / "teacher"))


def init_argv(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["init-student", "--teacher", str(teacher), "--num-layers", "1", "--output-dir", str(out), *extra]


OVERWRITE = pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["plain", "overwrite"])


# ----------------------------------------------------------------------------------------------- init-student
@OVERWRITE
def test_init_student_refuses_a_users_folder(tmp_path, teacher, capsys, extra):
    out = user_folder(tmp_path / "thesis")
    refused(init_argv(teacher, out, *extra), capsys, tmp_path,
            rf"--output-dir {re.escape(str(out))} is not empty and is not a pocl model folder \(no pocl "
            r"manifest.json; found figures/, thesis.tex\); pocl never writes into or replaces a folder it did not "
            r"create \(not even with --overwrite\)")


@OVERWRITE
def test_init_student_refuses_a_folder_holding_two_runs(tmp_path, teacher, capsys, extra):
    runs = tmp_path / "runs"
    fake_run(runs / "kd")
    fake_run(runs / "pocl")
    refused(init_argv(teacher, runs, *extra), capsys, tmp_path,
            r"is not empty and is not a pocl model folder \(no pocl manifest.json; found kd/, pocl/\)")


@OVERWRITE
@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_init_student_never_writes_into_its_teacher(tmp_path, teacher, capsys, extra, where):
    out = {"same": teacher, "inside": teacher / "student", "containing": teacher.parent}[where]
    rel = {"same": "is", "inside": "is inside", "containing": "contains"}[where]
    refused(init_argv(teacher, out, *extra), capsys, tmp_path,
            rf"--output-dir {re.escape(str(out))} {rel} the teacher folder \({re.escape(str(teacher))}\); pocl never "
            r"writes into its own input model")


def test_init_student_refuses_its_own_output_with_a_users_file_added(tmp_path, teacher, capsys):
    out = tmp_path / "student"
    code, _, err = run_cli(init_argv(teacher, out), capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("my notes on this student\n")
    refused(init_argv(teacher, out, "--overwrite"), capsys, tmp_path,
            r"holds files pocl did not write \(notes.txt\); pocl never writes into or replaces a folder it did not "
            r"create")


def test_init_student_replaces_its_own_output_only_with_overwrite(tmp_path, teacher, capsys):
    out = tmp_path / "student"
    code, _, err = run_cli(init_argv(teacher, out), capsys)
    assert code == 0, err
    assert json.loads((out / "init_student.json").read_text())["kept_layers"] == [0]
    refused(init_argv(teacher, out), capsys, tmp_path,
            rf"--output-dir {re.escape(str(out))} already holds a pocl model; use --overwrite to replace it")
    code, _, err = run_cli(["init-student", "--teacher", str(teacher), "--keep-layers", "0,1",
                                  "--output-dir", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "init_student.json").read_text())["kept_layers"] == [0, 1]
    ckpt.verify_folder(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "student"]  # no temporary left


def test_init_student_refuses_a_file(tmp_path, teacher, capsys):
    out = tmp_path / "thesis.tex"
    out.write_text("not a folder\n")
    refused(init_argv(teacher, out, "--overwrite"), capsys, tmp_path,
            r"thesis.tex is a file, not a folder; pocl does not replace it")


def test_init_student_into_an_empty_folder(tmp_path, teacher, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(init_argv(teacher, tmp_path / "empty"), capsys)
    assert code == 0, err
    ckpt.verify_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- rank
def rank_argv(tiny_pair, tiny_data, *extra: str, student=None) -> list[str]:
    return ["rank", "--student", str(student or tiny_pair[1]), "--train-file", str(tiny_data[0]), *TINY_FLAGS[:4],
            "--measurer", "loss", "--no-progress", *extra]


def test_rank_refuses_a_users_folder(tmp_path, tiny_pair, tiny_data, capsys):
    out = user_folder(tmp_path / "thesis")
    refused(rank_argv(tiny_pair, tiny_data, "--output-dir", str(out)), capsys, tmp_path,
            r"--output-dir .*thesis is not empty and is not a pocl run folder \(found figures/, thesis.tex\)")


def test_rank_never_writes_into_its_student(tmp_path, tiny_pair, tiny_data, capsys):
    student = Path(shutil.copytree(tiny_pair[1], tmp_path / "student"))
    refused(rank_argv(tiny_pair, tiny_data, "--output-dir", str(student), student=student), capsys, tmp_path,
            r"--output-dir .*student is the student folder .*; pocl never writes into its own input model")


@pytest.mark.parametrize("target", ["thesis", "train-file"])
def test_rank_refuses_a_ranking_file_it_did_not_write(tmp_path, tiny_pair, tiny_data, capsys, target):
    train = Path(shutil.copy(tiny_data[0], tmp_path / "train.jsonl"))
    path = train if target == "train-file" else user_folder(tmp_path / "thesis") / "thesis.tex"
    refused(rank_argv(tiny_pair, tiny_data, "--train-file", str(train), "--ranking-file", str(path)), capsys,
            tmp_path, r"--ranking-file .*(is the data file|exists and is not a pocl ranking file)")


# ----------------------------------------------------------------------------------------------- eval
def eval_argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--seeds", "1", "--max-new-tokens", "2",
            "--output-dir", str(out), "--no-progress"]


def test_eval_refuses_a_users_folder(tmp_path, tiny_pair, tiny_data, capsys):
    out = user_folder(tmp_path / "thesis")
    refused(eval_argv(tiny_pair[1], tiny_data[2], out), capsys, tmp_path,
            r"--output-dir .*thesis is not empty and is not a pocl evaluation folder \(found figures/, thesis.tex\)")


@pytest.mark.parametrize("where", ["same", "containing"])
def test_eval_never_writes_into_a_model_it_evaluates(tmp_path, tiny_pair, tiny_data, capsys, where):
    model = Path(shutil.copytree(tiny_pair[1], tmp_path / "models" / "student"))
    out = model if where == "same" else model.parent
    rel = "is" if where == "same" else "contains"
    refused(eval_argv(model, tiny_data[2], out), capsys, tmp_path,
            rf"--output-dir .* {rel} the model 'student' folder .*; pocl never writes into its own input model")


def test_eval_refuses_a_run_folder(tmp_path, tiny_pair, tiny_data, capsys):
    run = fake_run(tmp_path / "runs" / "kd")
    refused(eval_argv(tiny_pair[1], tiny_data[2], run), capsys, tmp_path,
            r"is not empty and is not a pocl evaluation folder \(found config.yaml, final/, metrics.jsonl\)")


# ----------------------------------------------------------------------------------------------- report
def report_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "train/loss": 2.0 / i}) + "\n"
                                                for i in range(1, 4)))
    return path


def test_report_refuses_a_users_folder(tmp_path, capsys):
    run = report_run(tmp_path / "run")
    out = user_folder(tmp_path / "thesis")
    (out / "run_training_curves.png").write_bytes(b"my own figure")
    refused(["report", str(run), "--output-dir", str(out)], capsys, tmp_path,
            r"--output-dir .*thesis is not empty and is not a pocl plots folder \(found figures/, thesis.tex\)")


@pytest.mark.parametrize("where", ["run", "containing"])
def test_report_never_writes_into_its_inputs(tmp_path, capsys, where):
    run = report_run(tmp_path / "runs" / "kd")
    out = run if where == "run" else run.parent
    rel = "is" if where == "run" else "contains"
    refused(["report", str(run), "--output-dir", str(out)], capsys, tmp_path,
            rf"--output-dir .* {rel} the run folder .*; pocl report never writes into its inputs")


# ----------------------------------------------------------------------------------------------- distill
def distill_argv(tiny_pair, tiny_data, out: Path, *extra: str, teacher=None, student=None) -> list[str]:
    return ["distill", "--teacher", str(teacher or tiny_pair[0]), "--student", str(student or tiny_pair[1]),
            "--train-file", str(tiny_data[0]), *TINY_FLAGS, "--max-steps", "1", "--output-dir", str(out), *extra]


@OVERWRITE
def test_distill_refuses_a_users_folder(tmp_path, tiny_pair, tiny_data, capsys, extra):
    out = user_folder(tmp_path / "thesis")
    refused(distill_argv(tiny_pair, tiny_data, out, *extra), capsys, tmp_path,
            r"--output-dir .*thesis is not empty and is not a pocl run folder \(found figures/, thesis.tex\)")


def test_distill_overwrite_refuses_a_run_with_a_users_file_in_final(tmp_path, tiny_pair, tiny_data, capsys):
    run = fake_run(tmp_path / "run")
    (run / "final" / "README.md").write_text("the model I sent to my supervisor\n")
    refused(distill_argv(tiny_pair, tiny_data, run, "--overwrite"), capsys, tmp_path,
            r"is not empty and is not a pocl run folder \(found final/\)")


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_distill_never_writes_into_its_models(tmp_path, tiny_pair, tiny_data, capsys, which):
    models = {k: Path(shutil.copytree(p, tmp_path / k)) for k, p in zip(("teacher", "student"), tiny_pair)}
    refused(distill_argv(tiny_pair, tiny_data, models[which], "--overwrite", **models), capsys, tmp_path,
            rf"--output-dir .*{which} is the {which} folder .*; pocl never writes into its own input model")


def test_the_teacher_cache_refuses_a_users_folder(tmp_path, tiny_pair, tiny_data, capsys):
    cache = user_folder(tmp_path / "thesis")
    refused(distill_argv(tiny_pair, tiny_data, tmp_path / "run", "--teacher-cache-dir", str(cache)), capsys,
            tmp_path, r"--teacher-cache-dir .*thesis is not empty and is not a pocl teacher cache")


# ----------------------------------------------------------------------------------------------- the writer itself
def _files(data):
    def write(tmp):
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)
    return write


def test_atomic_folder_write_never_replaces_a_folder_pocl_did_not_write(tmp_path):
    target = user_folder(tmp_path / "final")
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to replace .*final: it is not a folder pocl wrote \(no "
                                              r"pocl manifest.json; found figures/, thesis.tex\)"):
        ckpt.atomic_folder_write(target, _files({"w": b"new"}))
    assert tree_hash(tmp_path) == before


def test_atomic_folder_write_never_replaces_user_additions_or_a_file(tmp_path):
    own = tmp_path / "best"
    ckpt.atomic_folder_write(own, _files({"w": b"old"}))
    (own / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds files pocl did not write \(notes.txt\)"):
        ckpt.atomic_folder_write(own, _files({"w": b"new"}))
    with pytest.raises(CheckpointError, match="it is a file, not a folder"):
        ckpt.atomic_folder_write(tmp_path / "file", _files({"w": b"new"}))
    assert tree_hash(tmp_path) == before


def test_atomic_folder_write_still_replaces_its_own_folders(tmp_path):
    own = tmp_path / "best"
    ckpt.atomic_folder_write(own, _files({"w": b"old"}))
    ckpt.atomic_folder_write(own, _files({"w": b"new"}))
    assert (own / "w").read_bytes() == b"new"
    step = tmp_path / "checkpoints" / ckpt.step_dir_name(5)  # a checkpoint whose manifest was lost
    ckpt.atomic_folder_write(step, _files({"trainer_state.json": b"{}"}))
    (step / ckpt.MANIFEST).unlink()
    ckpt.atomic_folder_write(step, _files({"trainer_state.json": b"{\"step\": 5}"}))
    ckpt.verify_folder(step)
    (tmp_path / "empty").mkdir()
    ckpt.atomic_folder_write(tmp_path / "empty", _files({"w": b"x"}))
    ckpt.verify_folder(tmp_path / "empty")


def test_check_output_dir_kinds(tmp_path):
    run = fake_run(tmp_path / "run")
    for name in ("ranking.jsonl", "ranking.meta.json", "summary.json", ".summary.json.tmp"):
        (run / name).write_text("{}")
    assert output_dirs.check_output_dir(run, kind="run") == run
    assert output_dirs.check_output_dir(tmp_path / "missing", kind="eval") == tmp_path / "missing"
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "kd_training_curves.png").write_bytes(b"png")
    output_dirs.check_output_dir(tmp_path / "plots", kind="plots")
    cache = tmp_path / "cache" / "train" / "shard-00000"
    cache.mkdir(parents=True)
    output_dirs.check_output_dir(tmp_path / "cache", kind="teacher-cache", flag="--teacher-cache-dir")
    # A stage teacher's caches (teacher-HASH/train, /dev) in a shared cache root are pocl's own too.
    (tmp_path / "cache" / "teacher-0123456789ab" / "dev" / "shard-00000").mkdir(parents=True)
    output_dirs.check_output_dir(tmp_path / "cache", kind="teacher-cache", flag="--teacher-cache-dir")
    (tmp_path / "cache" / "teacher-0123456789ab" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"cache is not empty and is not a pocl teacher cache \(found "
                                          r"teacher-0123456789ab/\)"):
        output_dirs.check_output_dir(tmp_path / "cache", kind="teacher-cache", flag="--teacher-cache-dir")
    (tmp_path / "cache" / "teacher-0123456789ab" / "notes.txt").unlink()
    (tmp_path / "cache" / "teacher-mine").mkdir()  # not a name pocl gives
    with pytest.raises(ConfigError, match=r"not a pocl teacher cache \(found teacher-mine/\)"):
        output_dirs.check_output_dir(tmp_path / "cache", kind="teacher-cache", flag="--teacher-cache-dir")
    (tmp_path / "cache" / "teacher-mine").rmdir()
    (tmp_path / "cache" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"--teacher-cache-dir .*cache is not empty and is not a pocl teacher "
                                          r"cache \(found notes.txt\)"):
        output_dirs.check_output_dir(tmp_path / "cache", kind="teacher-cache", flag="--teacher-cache-dir")
    with pytest.raises(ConfigError, match=r"already holds a pocl model"):
        output_dirs.check_output_dir(run / "final", kind="model", overwrite=False)
    output_dirs.check_output_dir(run / "final", kind="model", overwrite=True)
    many = user_folder(tmp_path / "many")
    for i in range(5):
        (many / f"chapter{i}.tex").write_text("x")
    with pytest.raises(ConfigError, match=r"found chapter0.tex, chapter1.tex, chapter2.tex, chapter3.tex and 3 "
                                          r"more\)"):
        output_dirs.check_output_dir(many, kind="run")


def test_a_gguf_teacher_file_and_its_folder_are_protected(tmp_path, capsys):
    gguf = tmp_path / "models" / "teacher.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    for out, rel in ((gguf, "is"), (gguf.parent, "contains")):
        refused(["init-student", "--teacher", str(gguf), "--keep-every", "1", "--output-dir", str(out)], capsys,
                tmp_path, rf"--output-dir .* {rel} the teacher file \({re.escape(str(gguf))}\); pocl never writes "
                          r"into its own input model")
    output_dirs.check_output_dir(tmp_path / "student", inputs=[("teacher", str(gguf)), ("student", "HuggingFaceTB/x")])
