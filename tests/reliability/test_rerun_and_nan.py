"""A rerun of a completed run does nothing and changes nothing on disk; weights that go non-finite in the
middle of a run skip the dev ROUGE-L generation (NaN, never a new best) and are never checkpointed, so the
run ends through the non-finite guard with its message and a resume starts from finite weights."""

from __future__ import annotations

import json
import re
import shutil

import torch

from pocl.training import checkpoint as ckpt
from pocl.training.metrics import read_metrics
from tests.reliability.conftest import pocl_argv
from tests.reliability.helpers import distill_argv, run_cli, snapshot, weights

COMPLETED = re.compile(r"^\[pocl\.train\] run in (\S+) already completed at step (\d+) \((\S+) exists\); nothing to "
                       r"do: nothing was trained or written\. To train again, give a new --output-dir, or "
                       r"--overwrite to start this run over", re.MULTILINE)


# ------------------------------------------------------------------------------- a rerun of a completed run
def test_a_rerun_of_a_completed_run_says_so_and_changes_nothing(use_copy, tiny_pair, capsys):
    """The shared POCL run (ranking, teacher cache, 2 stages, best/, final/): the same command again."""
    root = use_copy("completed")
    before = snapshot(root)
    code, out, err = run_cli(pocl_argv(tiny_pair), capsys)
    assert code == 0, err[-2000:]
    found = COMPLETED.findall(err)
    assert found == [("run", "9", "run/final")], err[-2000:]
    assert "resuming" not in err and "stage 1/2" not in err and "Traceback" not in err
    assert "status: already completed (9 optimizer steps); nothing was trained or written" in out
    assert "final model: run/final" in out
    assert snapshot(root) == before  # every byte of data/ and run/, summary.json and config.yaml included


def test_a_completed_run_is_trained_again_only_with_overwrite(tmp_path, tiny_pair, tiny_data, capsys):
    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out, "--max-steps", "2", "--selection-metric", "dev_ce")
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and not COMPLETED.search(err)
    before = snapshot(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and COMPLETED.findall(err) == [(str(out), "2", str(out / "final"))]
    assert snapshot(tmp_path) == before
    code, _, err = run_cli(argv + ["--overwrite"], capsys)  # what the message proposes
    assert code == 0 and not COMPLETED.search(err) and "stage 1/1 'kd'" in err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_a_run_that_stopped_before_writing_final_finishes_it(tmp_path, tiny_pair, tiny_data, capsys):
    """All stages checkpointed but final/ missing (the process died while writing it): not completed;
    the rerun writes final/ and the summary."""
    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out, "--max-steps", "2", "--selection-metric", "dev_ce")
    assert run_cli(argv, capsys)[0] == 0
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and not COMPLETED.search(err) and "resuming from" in err
    ckpt.verify_folder(out / "final")
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------------------- weights that go NaN
def _poison_weights_after(monkeypatch, step: int) -> None:
    """After global step ``step``, the student's embedding (tied to its output layer) becomes NaN: weights
    that went bad inside an optimizer step, as a finite but overflowing update would leave them."""
    from pocl.training.trainer import DistillTrainer

    real_init = DistillTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def poison(trainer):
            if trainer.state.global_step == step:
                with torch.no_grad():
                    trainer.student.get_input_embeddings().weight.fill_(float("nan"))

        self.step_callbacks.append(poison)

    monkeypatch.setattr(DistillTrainer, "__init__", init)


def test_nan_weights_mid_run_skip_dev_rouge_and_checkpoints_then_stop_cleanly(tmp_path, tiny_pair, tiny_data,
                                                                              capsys, monkeypatch):
    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out, "--epochs", "2", "--eval-every", "1", "--save-every", "1",
                        "--save-total-limit", "20", "--max-nonfinite-steps", "3", "--dev-rouge-samples", "2",
                        "--dev-rouge-max-new-tokens", "6")
    with monkeypatch.context() as mp:
        _poison_weights_after(mp, step=2)
        code, _, err = run_cli(argv, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "probability tensor" not in err
    assert ("pocl: error: 3 optimizer steps in a row had a non-finite loss or gradient (last at global step 5); "
            "stopping without writing the current weights") in err
    # the evaluations of steps 2, 3 and 4 generated nothing: NaN, never a new best
    skipped = re.findall(r"step (\d+): dev ROUGE-L not computed: dev_loss is nan; recorded as NaN \(never a new "
                         r"best\)", err)
    assert skipped == ["2", "3", "4"]
    dev = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "dev"}
    assert sorted(dev) == [1, 2, 3, 4]
    assert isinstance(dev[1]["dev_rouge_l"], float) and [dev[s]["dev_rouge_l"] for s in (2, 3, 4)] == ["nan"] * 3
    assert json.loads((out / "best" / "manifest.json").read_text())["step"] == 1
    assert len(re.findall(r"not a new best \(best dev_rouge_l \S+ at step 1\)", err)) == 3
    # no checkpoint of the NaN weights: step 1 is the last one, and it is finite
    refused = re.findall(r"step (\d+): the student's weights are not finite \(tensor 'model\.embed_tokens\.weight' "
                         r"holds \d+ NaN and 0 infinite values \(of \d+\)\); not saving checkpoint \S+step-0+\1\. The "
                         r"last checkpoint, \S+step-00000001, is kept: a resume starts from it\.", err)
    assert refused == ["2", "3", "4"]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints" / "step-00000001").values())
    assert not (out / "final").exists()

    # the same command again (the fault gone): resumes from the finite step 1 and completes
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err[-3000:]
    assert "resuming from " + str(out / "checkpoints" / "step-00000001") in err
    assert all(torch.isfinite(t).all() for t in weights(out / "final").values())


def test_nan_weights_before_an_on_policy_step_skip_it_instead_of_sampling(tmp_path, tiny_pair, tiny_data, capsys,
                                                                        monkeypatch):
    """The student cannot sample from NaN probabilities: the on-policy step is a non-finite step."""
    out = tmp_path / "run"
    argv = distill_argv(tiny_pair, tiny_data, out, "--epochs", "2", "--on-policy-fraction", "1",
                        "--on-policy-max-new-tokens", "6", "--max-nonfinite-steps", "2", "--selection-metric",
                        "dev_ce", "--eval-every", "0")
    _poison_weights_after(monkeypatch, step=1)
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "probability tensor" not in err
    steps = re.findall(r"step (\d+): the student's weights are not finite \(tensor 'model\.embed_tokens\.weight' "
                       r"holds \d+ NaN and 0 infinite values \(of \d+\)\); no on-policy samples generated; step "
                       r"skipped \((\d) in a row\)", err)
    assert steps == [("2", "1"), ("3", "2")]
    assert "pocl: error: 2 optimizer steps in a row had a non-finite loss or gradient (last at global step 3)" in err


def test_dev_rouge_is_skipped_for_non_finite_weights_even_with_a_finite_dev_loss(tmp_path, tiny_pair, tiny_data):
    """A NaN the dev loss does not see (a buffer here) still stops the generation: the weights are checked."""
    from pocl.pipeline import kd_stages, make_trainer, prepare_run
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, train={"dev_rouge_samples": 2})
    inputs = prepare_run(cfg)
    trainer = make_trainer(cfg, inputs, kd_stages(cfg))
    finite = {"dev_loss": 1.0, "dev_ce": 2.0}
    assert trainer._rouge_skip_reason(finite) is None
    trainer.student.register_buffer("probe", torch.tensor([1.0, float("inf")]))
    assert trainer._rouge_skip_reason(finite) == ("the student's weights are not finite (tensor 'probe' holds 0 NaN "
                                                  "and 1 infinite values (of 2))")
    assert trainer._rouge_skip_reason({"dev_loss": float("nan"), "dev_ce": 2.0}) == "dev_loss is nan"


def test_save_checkpoint_refuses_non_finite_weights_and_writes_nothing(tmp_path, tiny_pair, tiny_data, caplog):
    from pocl.pipeline import kd_stages, make_trainer, prepare_run
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, tiny_pair, tiny_data)
    trainer = make_trainer(cfg, prepare_run(cfg), kd_stages(cfg))
    (tmp_path / "run").mkdir()
    with torch.no_grad():
        trainer.student.get_input_embeddings().weight[3, 0] = float("nan")
    with caplog.at_level("WARNING", logger="pocl.train"):
        assert trainer.save_checkpoint() is None
    assert list((tmp_path / "run").iterdir()) == []
    assert ("the student's weights are not finite (tensor 'model.embed_tokens.weight' holds 1 NaN and 0 infinite "
            "values" in caplog.text and "There is no earlier checkpoint: a resume starts over." in caplog.text)
