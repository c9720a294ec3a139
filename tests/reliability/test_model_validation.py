"""Models in, models out: every model pocl loads (distill, eval, rank, init-student) is validated on load
(the path, config.json, the safetensors files, pocl's own manifest, finite weights) with a one-line error
naming the model and the file, and no run reports `completed` or writes final/ with non-finite weights."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from pocl.training import checkpoint as ckpt
from tests.reliability.helpers import distill_argv, run_cli


# ------------------------------------------------------------------------------------------- helpers
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def _poison(folder: Path, nbytes: int = 64) -> str:
    """Set ``nbytes`` bytes of the last tensor of model.safetensors to 0xFF (NaN in float32); returns
    the tensor's name. The header and the file size stay valid."""
    path = folder / "model.safetensors"
    n, header = _header(path)
    name, info = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    begin, end = info["data_offsets"]
    assert end - begin >= nbytes
    data = bytearray(path.read_bytes())
    start = 8 + n + begin
    data[start:start + nbytes] = b"\xff" * nbytes
    path.write_bytes(bytes(data))
    return name


def _truncate(folder: Path, keep: float = 0.5) -> Path:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("pocl: error: ")]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return errors[0]


def _eval_argv(model: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--seeds", "3", "--max-new-tokens", "4",
            "--batch-size", "4", "--max-prompt-length", "32", "--max-samples", "4", "--output-dir", str(out),
            "--no-progress", *extra]


# ------------------------------------------------------------------------------------- NaN weights in
def test_nan_bytes_in_the_student_are_refused_at_load(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    tensor = _poison(student)
    out = tmp_path / "run"
    code, stdout, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", student=student), capsys)
    assert code == 2
    line = _one_error(err)
    assert f"the student '{student}' has non-finite weights: tensor '{tensor}' holds 16 NaN and 0 infinite" in line
    assert str(student / "model.safetensors") in line
    assert "completed" not in stdout
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_eval_marks_a_model_with_non_finite_weights(tmp_path, tiny_pair, tiny_data, capsys):
    """Marked in the log, results.json, results.md and the printed table, and not evaluated (sampling from NaN
    probabilities fails); the other models are evaluated as usual."""
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    tensor = _poison(student)
    out = tmp_path / "eval"
    code, stdout, err = run_cli(_eval_argv(student, tiny_data[2], out, "--model", f"teacher={tiny_pair[0]}"), capsys)
    assert code == 0, err[-3000:]
    assert re.search(r"model student .* has NON-FINITE WEIGHTS: tensor '" + re.escape(tensor) + "' holds 16 NaN", err)
    data = json.loads((out / "results.json").read_text())
    flag = data["models"]["student"]["nonfinite_weights"]
    assert flag == {"tensor": tensor, "nan": 16, "inf": 0, "numel": flag["numel"]}
    assert data["models"]["student"]["sets"] == {} and data["models"]["student"]["avg"] == {}
    assert data["models"]["teacher"]["nonfinite_weights"] is None and data["models"]["teacher"]["sets"]
    md = (out / "results.md").read_text()
    assert f"| student ⚠ non-finite weights ({tensor}) | – |" in md
    assert f"**Warning: model student has non-finite weights**: tensor `{tensor}` holds 16 NaN" in md
    assert f"student ⚠ non-finite weights ({tensor})" in stdout
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert rows and {r["model"] for r in rows} == {"teacher"}


def test_eval_flags_finite_models_as_finite(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(_eval_argv(tiny_pair[1], tiny_data[2], out), capsys)
    assert code == 0, err[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["models"]["student"]["nonfinite_weights"] is None
    assert "non-finite" not in (out / "results.md").read_text() and "NON-FINITE" not in err
    assert "| student | " in stdout


# ----------------------------------------------------------------------------------- damaged files
def test_truncated_student_in_distill(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    weights = _truncate(student)
    out = tmp_path / "run"
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out, student=student), capsys)
    assert code == 2
    line = _one_error(err)
    assert f"cannot load the student '{student}': {weights} is truncated or corrupt:" in line
    assert "(truncated" in line
    assert not out.exists() or not any(out.iterdir())


def test_truncated_teacher_in_distill(tmp_path, tiny_pair, tiny_data, capsys):
    teacher = _copy_model(tiny_pair[0], tmp_path / "teacher")
    weights = _truncate(teacher, keep=0.9)
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", teacher=teacher), capsys)
    assert code == 2
    assert f"cannot load the teacher '{teacher}': {weights} is truncated or corrupt:" in _one_error(err)


def test_truncated_model_in_eval(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    weights = _truncate(student)
    code, _, err = run_cli(_eval_argv(student, tiny_data[2], tmp_path / "eval"), capsys)
    assert code == 2
    assert f"cannot load the model '{student}': {weights} is truncated or corrupt:" in _one_error(err)


def test_truncated_teacher_in_init_student(tmp_path, tiny_pair, capsys):
    teacher = _copy_model(tiny_pair[0], tmp_path / "teacher")
    weights = _truncate(teacher)
    out = tmp_path / "new-student"
    code, _, err = run_cli(["init-student", "--teacher", str(teacher), "--num-layers", "1", "--output-dir", str(out)],
                           capsys)
    assert code == 2
    assert f"cannot load the model '{teacher}': {weights} is truncated or corrupt:" in _one_error(err)
    assert not out.exists()


def test_nan_student_in_rank(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    tensor = _poison(student)
    out = tmp_path / "rank"
    code, _, err = run_cli(["rank", "--student", str(student), "--train-file", str(tiny_data[0]), "--output-dir",
                            str(out)], capsys)
    assert code == 2
    assert f"the student '{student}' has non-finite weights: tensor '{tensor}'" in _one_error(err)
    assert not out.exists() or not any(out.iterdir())


def test_a_header_that_is_not_safetensors(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    (student / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", student=student), capsys)
    assert code == 2
    assert re.search(r"cannot load the student '.*': .*model.safetensors is truncated or corrupt: its header is not "
                     r"valid JSON", _one_error(err))


def test_invalid_config_json(tmp_path, tiny_pair, tiny_data, capsys):
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    (student / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", student=student), capsys)
    assert code == 2
    line = _one_error(err)
    assert str(student / "config.json") in line and "not valid JSON" in line and "student" in line


def test_a_pocl_folder_whose_checksum_fails(tmp_path, tiny_pair, tiny_data, capsys):
    """A folder pocl wrote (final/, best/, init-student) carries a manifest: a changed byte is caught
    even where the file still parses and its values are finite."""
    src = tiny_pair[1]
    final = tmp_path / "prev" / "final"
    ckpt.atomic_folder_write(final, lambda tmp: [shutil.copy(p, tmp / p.name) for p in src.iterdir()])
    path = final / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a low bit of the last float: still finite, same size
    path.write_bytes(bytes(data))
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, tmp_path / "run", student=final), capsys)
    assert code == 2
    line = _one_error(err)
    assert f"cannot load the student '{final}': " in line and "model.safetensors does not match its checksum" in line


# ------------------------------------------------------------------------------------- wrong paths
@pytest.fixture
def model_tree(tmp_path, tiny_pair, monkeypatch):
    """tmp_path as the working directory with student/ (a model), models/student/ (a model), RUN/ (a
    run folder: final/ and best/ are models, plus checkpoints/), half/ (a model without config.json),
    empty/."""
    student = _copy_model(tiny_pair[1], tmp_path / "student")
    _copy_model(student, tmp_path / "models" / "student")
    _copy_model(student, tmp_path / "RUN" / "final")
    _copy_model(student, tmp_path / "RUN" / "best")
    (tmp_path / "RUN" / "checkpoints").mkdir()
    (tmp_path / "RUN" / "summary.json").write_text("{}", encoding="utf-8")
    half = _copy_model(student, tmp_path / "half")
    (half / "config.json").unlink()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _distill_with_student(tiny_pair, tiny_data, spec: str, capsys) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, Path("out"), student=spec), capsys)
    return code, err, time.perf_counter() - t0


@pytest.mark.parametrize("spec,guess", [
    ("studnet", "student"),
    ("./studnet", "./student"),
    ("models/studnet", "models/student"),
    ("RUN/fnial", "RUN/final"),
    ("RUN/final/../bset", "RUN/final/../best"),
])
def test_a_mistyped_path_is_refused_at_once_with_the_closest_folder(spec, guess, model_tree, tiny_pair, tiny_data,
                                                                    capsys, monkeypatch):
    """Refused by pocl before transformers is asked to load anything (so nothing can reach the hub)."""
    import transformers

    def no_lookup(*args, **kwargs):
        raise AssertionError(f"transformers was asked to load {args}: the path should have been refused")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", no_lookup)
    code, err, seconds = _distill_with_student(tiny_pair, tiny_data, spec, capsys)
    assert code == 2
    line = _one_error(err)
    assert f"model path not found: {spec} (the student): no local file or folder of that name; did you mean " \
           f"'{guess}'?" in line
    assert seconds < 5
    assert not (model_tree / "out").exists()


def test_a_missing_path_with_nothing_close_names_the_closest_existing_folder(model_tree, tiny_pair, tiny_data,
                                                                             capsys):
    code, err, seconds = _distill_with_student(tiny_pair, tiny_data, "models/zzzz/model", capsys)
    assert code == 2 and seconds < 5
    assert ("model path not found: models/zzzz/model (the student): no local file or folder of that name; the "
            "closest existing folder is 'models', which has nothing named like 'zzzz'") in _one_error(err)


@pytest.mark.parametrize("spec", ["RUN", "./RUN/"])
def test_a_run_folder_instead_of_its_final_model(spec, model_tree, tiny_pair, tiny_data, capsys):
    code, err, _ = _distill_with_student(tiny_pair, tiny_data, spec, capsys)
    assert code == 2
    line = _one_error(err)
    assert re.search(r"cannot load the student '\.?/?RUN/?': no config\.json in RUN: it is a pocl run folder; did you "
                     r"mean 'RUN/final' \(or 'RUN/best', the best model on the dev set\)\?", line), line
    assert "sentencepiece" not in err and "tiktoken" not in err


def test_a_run_folder_in_eval(model_tree, tiny_data, capsys):
    code, _, err = run_cli(_eval_argv("RUN", tiny_data[2], Path("eval")), capsys)
    assert code == 2
    assert "no config.json in RUN" in _one_error(err) and "did you mean 'RUN/final'" in err


def test_a_folder_without_config_json(model_tree, tiny_pair, tiny_data, capsys):
    code, err, _ = _distill_with_student(tiny_pair, tiny_data, "half", capsys)
    assert code == 2
    line = _one_error(err)
    assert "cannot load the student 'half': no config.json in half: not a Hugging Face model folder" in line
    assert "no local folder of that name" not in line


def test_an_empty_folder(model_tree, tiny_pair, tiny_data, capsys):
    code, err, _ = _distill_with_student(tiny_pair, tiny_data, "empty", capsys)
    assert code == 2
    line = _one_error(err)
    assert "no config.json in empty" in line and "the folder is empty" in line
    assert "sentencepiece" not in err and "tiktoken" not in err


def test_init_student_from_a_run_folder(model_tree, capsys):
    code, _, err = run_cli(["init-student", "--teacher", "RUN", "--num-layers", "1", "--output-dir", "new"], capsys)
    assert code == 2
    assert "no config.json in RUN" in _one_error(err) and "did you mean 'RUN/final'" in err
    assert not Path("new").exists()


# ------------------------------------------------------------------------------------ models out
def _nan_loss(monkeypatch):
    """Every loss the trainer computes is NaN (the gradients too)."""
    from pocl.training import trainer as trainer_mod

    real = trainer_mod.StudentLoss.forward

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer_mod.StudentLoss, "forward", forward)


def test_a_run_without_one_finite_step_does_not_complete(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    """6 steps, all NaN, fewer than --max-nonfinite-steps: the run used to report `completed`."""
    _nan_loss(monkeypatch)
    out = tmp_path / "run"
    code, stdout, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", "--max-nonfinite-steps", "10"),
                                capsys)
    assert code == 2
    line = _one_error(err)
    assert ("all 6 optimizer steps of the run had a non-finite loss or gradient, so the student was never updated; "
            f"not writing {out / 'final'}") in line
    assert "completed" not in stdout
    assert not (out / "final").exists()
    assert not (out / "summary.json").exists() or json.loads((out / "summary.json").read_text())["status"] != \
        "completed"


def test_the_first_steps_all_non_finite_stop_at_the_limit(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    _nan_loss(monkeypatch)
    out = tmp_path / "run"
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", "--max-nonfinite-steps", "2"),
                           capsys)
    assert code == 2
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in _one_error(err)
    assert not (out / "final").exists()


def test_non_finite_weights_are_never_written_to_final(tmp_path, tiny_pair, tiny_data, capsys, monkeypatch):
    """Weights that turn NaN at the last step (whatever the cause): final/ is refused, naming the tensor.
    Selection by dev CE (NaN: never a new best, and no generation from NaN weights)."""
    metric, folder = "dev_ce", "final"
    from pocl.training.trainer import DistillTrainer

    real_init = DistillTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def poison(trainer):
            if trainer.state.global_step == 6:
                with torch.no_grad():
                    trainer.student.get_decoder().norm.weight.fill_(float("nan"))

        self.step_callbacks.append(poison)

    monkeypatch.setattr(DistillTrainer, "__init__", init)
    out = tmp_path / "run"
    code, stdout, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", "--selection-metric", metric),
                                capsys)
    assert code == 2
    line = _one_error(err)
    assert ("the student's weights are not finite at global step 6: tensor 'model.norm.weight' holds 16 NaN and 0 "
            f"infinite values (of 16); not writing {out / folder} (nothing was written)") in line
    assert not (out / "final").exists() and not (out / "best").exists() and "completed" not in stdout
    assert not list(out.glob(".tmp-*"))


def test_best_is_not_written_with_non_finite_weights(tmp_path, tiny_pair, tiny_data):
    """The check sits in the writer of final/ and best/: a best/ write of NaN weights is refused and the
    previous best/ stays as it was."""
    from pocl.pipeline import kd_stages, make_trainer, prepare_run
    from pocl.training.trainer import NonFiniteLossError
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    inputs = prepare_run(cfg)
    trainer = make_trainer(cfg, inputs, kd_stages(cfg))
    best = tmp_path / "run" / "best"
    ckpt.atomic_folder_write(best, trainer._save_model_folder)
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    with torch.no_grad():
        trainer.student.get_decoder().norm.weight[3] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"tensor 'model.norm.weight' holds 0 NaN and 1 infinite values "
                                                 r"\(of 16\); not writing .*best \(nothing was written\)"):
        ckpt.atomic_folder_write(best, trainer._save_model_folder)
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    assert not list(best.parent.glob(".tmp-*"))
