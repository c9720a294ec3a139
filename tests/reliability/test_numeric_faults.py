"""Numeric faults: infinite gradients are skipped and counted, too many in a row stop the run before a
non-finite model reaches the disk; masked positions and -inf logits never make a NaN in any registered
divergence (values and gradients) through the loss engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pocl.losses import DIVERGENCES, chunked_kd_loss_from_logits, fused_kd_loss, make_divergence, select_response_tokens
from pocl.training import checkpoint as ckpt
from pocl.training.metrics import read_metrics
from tests.reliability.helpers import distill_argv, run_cli, weights

V, H = 40, 8
MASKED_BOTH = [3, 7, 21, 39]        # -inf for teacher and student
MASKED_TEACHER_ONLY = [5, 11]       # the teacher gives these exactly 0, the student does not
MASKED_STUDENT_ONLY = [13]          # the student gives this exactly 0, the teacher does not


def _masker(columns):
    index = torch.tensor(columns)

    def logit_fn(x):
        return x.index_fill(-1, index.to(x.device), float("-inf"))

    return logit_fn


def _case(seed: int, n_rows: int = 3, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (n_rows, length), generator=gen)
    bad = torch.tensor(MASKED_BOTH + MASKED_TEACHER_ONLY + MASKED_STUDENT_ONLY)
    while torch.isin(labels, bad).any():  # targets are never a masked entry (its CE is truly infinite)
        labels = torch.where(torch.isin(labels, bad), (labels + 1) % V, labels)
    labels[0, :4] = -100                # a prompt
    labels[1, :] = -100                 # a sample with no response token at all
    labels[2, -2:] = -100               # right padding
    s_hidden = torch.randn(n_rows, length, H, generator=gen)
    t_hidden = torch.randn(n_rows, length, H, generator=gen)
    s_weight = torch.randn(V, H, generator=gen)
    t_weight = torch.randn(V, H, generator=gen)
    return labels, s_hidden, t_hidden, s_weight, t_weight


def _divergences():
    return sorted(DIVERGENCES.names())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", _divergences())
def test_masked_positions_and_minus_inf_logits_never_make_nan(name, temperature):
    labels, s_hidden, t_hidden, s_weight, t_weight = _case(seed=len(name))
    s_hidden.requires_grad_(True)
    s_weight.requires_grad_(True)
    sel, targets = select_response_tokens(s_hidden, labels)
    t_sel, _ = select_response_tokens(t_hidden, labels)
    div = make_divergence(name)
    student_fn = _masker(MASKED_BOTH + MASKED_STUDENT_ONLY)
    teacher_fn = _masker(MASKED_BOTH + MASKED_TEACHER_ONLY)
    out = fused_kd_loss(sel, s_weight, None, t_sel, t_weight, None, targets, divergence=div,
                        temperature=temperature, alpha=0.5, normalizer=max(int(targets.numel()), 1), chunk_size=3,
                        student_logit_fn=student_fn, teacher_logit_fn=teacher_fn)
    assert out.num_tokens == int((labels[:, 1:] != -100).sum()) > 0
    assert torch.isfinite(out.loss) and torch.isfinite(out.ce_sum) and torch.isfinite(out.divergence_sum)
    out.loss.backward()
    assert torch.isfinite(s_hidden.grad).all() and torch.isfinite(s_weight.grad).all()
    # masked positions (prompt, the empty sample, padding) get exactly zero gradient
    assert torch.count_nonzero(s_hidden.grad[1]) == 0 and torch.count_nonzero(s_hidden.grad[0, :3]) == 0

    # the same from full logits: -inf columns in both logit tensors
    s_logits = student_fn(sel.detach() @ s_weight.detach().T).requires_grad_(True)
    t_logits = teacher_fn(t_sel @ t_weight.T)
    out2 = chunked_kd_loss_from_logits(s_logits, t_logits, targets, divergence=div, temperature=temperature,
                                       alpha=0.5, normalizer=max(int(targets.numel()), 1), chunk_size=4)
    out2.loss.backward()
    assert torch.isfinite(out2.loss) and torch.isfinite(s_logits.grad).all()
    torch.testing.assert_close(out2.loss, out.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", _divergences())
def test_a_window_without_response_tokens_gives_zero_not_nan(name):
    """Every position masked: nothing is selected, the loss is 0 and connected, gradients are 0."""
    labels, s_hidden, t_hidden, s_weight, t_weight = _case(seed=1)
    labels[:] = -100
    s_hidden.requires_grad_(True)
    sel, targets = select_response_tokens(s_hidden, labels)
    t_sel, _ = select_response_tokens(t_hidden, labels)
    out = fused_kd_loss(sel, s_weight, None, t_sel, t_weight, None, targets, divergence=make_divergence(name),
                        temperature=2.0, alpha=0.5, normalizer=1.0)
    assert out.num_tokens == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.count_nonzero(s_hidden.grad) == 0


# --------------------------------------------------------------------------------------- trainer
def _inject_inf_gradient(monkeypatch, from_step: int, until_step: int | None = None):
    """From global step ``from_step`` (1-based) on, and before ``until_step``, the gradient of the
    student's embedding (tied to its output layer) is +inf: a hook on the parameter, as a real
    overflow would look to the optimizer."""
    from pocl.training.trainer import DistillTrainer

    real_init = DistillTrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        param = next(self.student.parameters())

        def hook(grad):
            step = self.state.global_step + 1  # the step being computed
            if step >= from_step and (until_step is None or step < until_step):
                return torch.full_like(grad, float("inf"))
            return grad

        param.register_hook(hook)

    monkeypatch.setattr(DistillTrainer, "__init__", init)


def _all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in weights(folder).values())


def test_inf_gradients_are_skipped_then_the_run_stops_without_writing_them(tmp_path, tiny_pair, tiny_data, capsys,
                                                                           monkeypatch):
    out = tmp_path / "run"
    _inject_inf_gradient(monkeypatch, from_step=3)
    code, _, err = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "2", "--save-every", "1",
                                        "--save-total-limit", "20", "--eval-every", "1",
                                        "--max-nonfinite-steps", "3"), capsys)
    assert code == 2
    assert "pocl: error: 3 optimizer steps in a row had a non-finite loss or gradient (last at global step 5)" in err
    assert "stopping without writing the current weights" in err and "Traceback" not in err
    assert not (out / "final").exists()
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in saved] == [4, 3, 2, 1]  # step 5 (the third skip) is not saved
    for _, folder in saved:
        ckpt.verify_folder(folder)
        assert _all_finite(folder)
    assert _all_finite(out / "best")
    # skipped steps make no update: the weights after steps 3 and 4 are those after step 2
    for step in (3, 4):
        assert weights(saved[-2][1]).keys() == weights(saved[-step][1]).keys()
        for k, v in weights(saved[-2][1]).items():
            assert torch.equal(v, weights(saved[-step][1])[k]), (step, k)
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    # the step that hits the limit raises before it is logged; the skipped ones before it are visible
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 2]
    assert [r["grad_norm"] for r in train[2:]] == ["inf", "inf"]  # JSON has no inf: kept as strings


def test_a_transient_inf_gradient_is_skipped_and_the_run_completes(tmp_path, tiny_pair, tiny_data, capsys,
                                                                  monkeypatch):
    out = tmp_path / "run"
    _inject_inf_gradient(monkeypatch, from_step=2, until_step=4)  # steps 2 and 3
    code, stdout, _ = run_cli(distill_argv(tiny_pair, tiny_data, out, "--epochs", "1", "--max-nonfinite-steps", "3"),
                              capsys)
    assert code == 0 and "(2 skipped)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2 and summary["global_steps"] == 6
    assert _all_finite(out / "final") and _all_finite(out / "best")
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in train)
