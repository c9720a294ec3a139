"""Bad command lines and unwritable output folders, through the real CLI: abbreviated and misspelled flags,
bad flag values (one line and a hint, not the usage block), incomplete model/data arguments (refused
before any work, not the built-in default), and output folders that cannot be created (one line naming
the folder and the operation, exit 2, no traceback)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.reliability.helpers import distill_argv, run_cli


def _one_error_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err[-2000:]
    assert "usage:" not in err and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("argv, flag", [
    (["distill", "--diverg", "jsd"], "--diverg"),
    (["distill", "--max-step", "1"], "--max-step"),
    (["rank", "--measur", "random"], "--measur"),
    (["eval", "--seed", "1"], "--seed"),
    (["init-student", "--teacher", "t", "--output-dir", "o", "--keep-every", "2", "--no-keep-la"], "--no-keep-la"),
])
def test_abbreviated_flags_are_refused(argv, flag, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    line = _one_error_line(err, f"pocl {argv[0]}: error: ")
    assert f"unrecognized argument {flag}" in line


@pytest.mark.parametrize("argv, pattern", [
    (["distill", "--divergnce", "jsd"],
     (r"^pocl distill: error: unrecognized argument --divergnce; did you mean --divergence\? "
      r"\(see pocl distill --help\)$")),
    (["distill", "--epohcs", "3"], r"unrecognized argument --epohcs; did you mean --epochs\?"),
    (["distill", "--max-stpes=1"], r"unrecognized argument --max-stpes; did you mean --max-steps\?"),
    (["rank", "--studnet", "s"], r"^pocl rank: error: unrecognized argument --studnet; did you mean --student\?"),
    (["eval", "--modle", "m"], r"^pocl eval: error: unrecognized argument --modle; did you mean --model\?"),
    (["distill", "--zzzzzz"], r"^pocl distill: error: unrecognized argument --zzzzzz \(see pocl distill --help\)$"),
    (["--verbos"], r"^pocl: error: unrecognized argument --verbos; did you mean --verbose\? \(see pocl --help\)$"),
])
def test_misspelled_flags_get_a_suggestion(argv, pattern, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert re.search(pattern, _one_error_line(err, "pocl")), err


@pytest.mark.parametrize("argv, expected", [
    (["distill", "--alpha", "x"], "pocl distill: error: argument --alpha: "),
    (["distill", "--truncation-side", "middle"], "pocl distill: error: argument --truncation-side: invalid choice"),
    (["init-student", "--teacher", "t", "--output-dir", "o", "--num-layers", "two"],
     "pocl init-student: error: argument --num-layers: invalid int value: 'two'"),
    (["init-student", "--teacher", "t"], "pocl init-student: error: the following arguments are required"),
])
def test_a_bad_flag_value_is_one_line_and_a_hint(argv, expected, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    line = _one_error_line(err, expected)
    assert line.endswith(f"(see pocl {argv[0]} --help)")


def test_the_alpha_example_of_the_issue(capsys):
    code, _, err = run_cli(["distill", "--alpha", "x"], capsys)
    assert code == 2
    line = _one_error_line(err, "pocl distill: error: argument --alpha: ")
    assert "'x'" in line and line.endswith("(see pocl distill --help)")


# ------------------------------------------------------------------------- incomplete model/data arguments
@pytest.fixture
def no_builtin_default(monkeypatch):
    """Fail the test if the built-in default (or any run) starts."""
    import pocl.pipeline
    import pocl.recipes.builtin_default as recipe

    monkeypatch.setattr(recipe, "run_builtin_default", lambda *a, **k: pytest.fail("the built-in default started"))
    monkeypatch.setattr(recipe, "prepare_suite", lambda *a, **k: pytest.fail("the built-in default started"))
    monkeypatch.setattr(pocl.pipeline, "distill", lambda *a, **k: pytest.fail("a run started"))


@pytest.mark.parametrize("given, missing", [
    (["--dev-file", "{dev}", "--max-steps", "1"], "--teacher, --student, --train-file"),
    (["--train-file", "{train}"], "--teacher, --student"),
    (["--teacher", "{teacher}"], "--student, --train-file"),
    (["--student", "{student}"], "--teacher, --train-file"),
    (["--teacher", "{teacher}", "--student", "{student}"], "--train-file"),
    (["--teacher", "{teacher}", "--train-file", "{train}", "--dev-file", "{dev}"], "--student"),
    (["--method", "sft", "--train-file", "{train}"], "--student"),
])
def test_incomplete_model_and_data_arguments_stop_before_any_work(given, missing, tiny_pair, tiny_data, tmp_path,
                                                                   capsys, no_builtin_default, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {"teacher": tiny_pair[0], "student": tiny_pair[1], "train": tiny_data[0], "dev": tiny_data[1]}
    argv = ["distill", *(a.format(**values) for a in given), "--output-dir", str(tmp_path / "out")]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    line = _one_error_line(err, "pocl: error: ")
    assert f"missing: {missing})" in line, line
    assert "the built-in default runs only when none of --teacher, --student, --train-file and --dev-file" in line
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, key", [("--teacher", "model.teacher"), ("--student", "model.student"),
                                       ("--train-file", "data.train_file"), ("--dev-file", "data.dev_file")])
@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_an_empty_model_or_data_path_is_refused(flag, key, where, tmp_path, capsys, no_builtin_default, monkeypatch):
    # An empty value means "not set" for optional settings, but an empty path is an unset shell variable,
    # not a request for the built-in default (which would start a 5-minute run in the current folder).
    from tests.reliability.helpers import snapshot

    monkeypatch.chdir(tmp_path)
    if where == "flag":
        argv = ["distill", flag, ""]
    else:
        section, name = key.split(".")
        (tmp_path / "run.yaml").write_text(f"{section}: {{{name}: ''}}\n")
        argv = ["distill", "--config", "run.yaml"]
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, err
    line = _one_error_line(err, f"pocl: error: {key}: ")
    assert f"{flag} was given an empty value; give a model folder or file, or leave {flag} out" in line
    assert out == "" and snapshot(tmp_path) == before


def test_incomplete_model_and_data_settings_in_the_yaml_file_are_refused_too(tmp_path, tiny_data, capsys,
                                                                             no_builtin_default):
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dev_file: {tiny_data[1]}}}\ntrain: {{output_dir: {tmp_path / 'out'}}}\n")
    code, _, err = run_cli(["distill", "--config", str(path)], capsys)
    assert code == 2
    assert "missing: --teacher, --student, --train-file)" in _one_error_line(err, "pocl: error: model.teacher: ")
    assert not (tmp_path / "out").exists()


def test_the_builtin_default_refuses_models_and_data_of_the_user(tmp_path, tiny_data):
    from pocl.errors import ConfigError
    from pocl.recipes.builtin_default import run_builtin_default

    with pytest.raises(ConfigError, match=r"data.dev_file: the built-in default makes its own models and data"):
        run_builtin_default(user_overrides={"data": {"dev_file": str(tiny_data[1])},
                                            "train": {"output_dir": str(tmp_path / "out")}})
    assert not (tmp_path / "out").exists()


def test_the_builtin_default_still_starts_with_general_flags_only(tmp_path, capsys, monkeypatch):
    import pocl.recipes.builtin_default as recipe

    seen = {}

    def fake(config):
        seen["given"] = config.given_values()
        return {"status": "completed"}

    monkeypatch.setattr(recipe, "run_builtin_default", fake)
    code, _, err = run_cli(["distill", "--divergence", "jsd", "--epochs", "2", "--output-dir",
                            str(tmp_path / "d")], capsys)
    assert code == 0, err
    assert seen["given"]["loss"]["divergence"] == "jsd" and seen["given"]["train"]["epochs"] == 2


# ------------------------------------------------------------------------------ unwritable output folders
@pytest.fixture
def blocked(tmp_path) -> Path:
    """A regular file: a folder under it cannot be created (NotADirectoryError, also as root)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def _assert_clean_os_error(code: int, err: str, folder: Path) -> None:
    """A file where a parent folder of --output-dir should be: refused by the output-folder check, before
    any model is loaded or anything written (the OSError path is test_a_permission_error_...)."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("pocl: error: ")]
    assert errors == [f"pocl: error: --output-dir {folder}: {folder.parent} is a file, not a folder, so {folder} "
                      "cannot be created; give another folder"], err[-2000:]
    assert "[pocl.models]" not in err  # refused before any model was loaded
    assert folder.parent.read_text() == "not a folder\n"


def test_distill_into_an_uncreatable_output_folder(blocked, tiny_pair, tiny_data, capsys):
    out = blocked / "run"
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out), capsys)
    _assert_clean_os_error(code, err, out)


def test_rank_into_an_uncreatable_output_folder(blocked, tiny_pair, tiny_data, capsys):
    out = blocked / "run"
    code, _, err = run_cli(["rank", "--student", str(tiny_pair[1]), "--train-file", str(tiny_data[0]),
                            "--measurer", "random", "--no-progress", "--output-dir", str(out)], capsys)
    _assert_clean_os_error(code, err, out)


def test_eval_into_an_uncreatable_output_folder(blocked, tiny_pair, tiny_data, capsys):
    out = blocked / "eval"
    code, _, err = run_cli(["eval", "--model", str(tiny_pair[1]), "--data", str(tiny_data[2]), "--seeds", "3",
                            "--max-new-tokens", "2", "--max-prompt-length", "32", "--no-progress",
                            "--output-dir", str(out)], capsys)
    _assert_clean_os_error(code, err, out)


def test_init_student_into_an_uncreatable_output_folder(blocked, tiny_pair, capsys):
    out = blocked / "student"
    code, _, err = run_cli(["init-student", "--teacher", str(tiny_pair[0]), "--num-layers", "1",
                            "--output-dir", str(out)], capsys)
    _assert_clean_os_error(code, err, out)


def test_report_into_an_uncreatable_output_folder(blocked, tiny_pair, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, run, "--max-steps", "1"), capsys)
    assert code == 0, err[-2000:]
    out = blocked / "plots"
    code, _, err = run_cli(["report", str(run), "--output-dir", str(out)], capsys)
    _assert_clean_os_error(code, err, out)


def test_a_permission_error_names_the_folder_and_the_operation(tmp_path, tiny_pair, tiny_data, capsys,
                                                               monkeypatch):
    """A read-only folder (chmod does not stop root, so the refusal is simulated in-process)."""
    out = tmp_path / "readonly" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "readonly")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out), capsys)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("pocl: error: ")]
    assert len(errors) == 1 and re.fullmatch(rf"pocl: error: cannot create the folder {re.escape(str(out))}\S*: "
                                             r"Permission denied \(errno 13\)", errors[0]), err[-2000:]


def test_other_os_errors_without_a_file_keep_their_traceback(monkeypatch, capsys):
    import pocl.commands.report as report_cmd

    def boom(args):
        raise OSError("something unexpected")

    monkeypatch.setattr(report_cmd, "run", boom)
    # the parser was built with the real function: patch what it set as func
    from pocl import cli

    real = cli.make_parser

    def make_parser():
        parser = real()
        cli._subparsers(parser)["report"].set_defaults(func=boom)
        return parser

    monkeypatch.setattr(cli, "make_parser", make_parser)
    with pytest.raises(OSError, match="something unexpected"):
        cli.main(["report", "x"])
