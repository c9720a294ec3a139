"""TAID (``--method taid``): the loss against a naive implementation of the official formulas (values
and gradients), the schedule of t against a naive replay of the update rule, and runs with and without
the POCL curriculum, including a crash and resume that must continue t exactly."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pocl.config import DistillConfig
from pocl.errors import ConfigError
from pocl.losses import make_divergence
from pocl.training.metrics import read_metrics
from pocl.training.stages import Stage
from pocl.training.taid import TaidSchedule
from tests.conftest import tiny_config
from tests.training.test_trainer import _trainer, _weights, crash_at


def _naive_taid(student_logits, teacher_logits, t):
    """The official code (SakanaAI/TAID, taid.py + fkl.py) written out, per token: the cross-entropy
    -sum p_t log q with p_t = softmax((1 - t) stopgrad(s) + t u); and its KL form (minus H(p_t))."""
    p_t = torch.softmax((1 - t) * student_logits.detach() + t * teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    cross_entropy = -(p_t * log_q).sum(-1)
    return cross_entropy, cross_entropy + (p_t * torch.log(p_t)).sum(-1)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.4, 0.77, 1.0])
def test_the_loss_and_its_gradient_match_the_official_formulas(t):
    gen = torch.Generator().manual_seed(int(t * 100))
    s = (torch.randn(6, 11, generator=gen) * 3).requires_grad_()
    u = torch.randn(6, 11, generator=gen) * 3
    got = make_divergence("taid", t=t)(torch.log_softmax(s, -1), torch.log_softmax(u, -1))
    _, kl = _naive_taid(s, u, t)
    torch.testing.assert_close(got, kl, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    s2 = s.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(_naive_taid(s2, u, t)[0].sum(), s2)  # the official cross-entropy's gradient
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)


def test_invariants_zero_at_equal_distributions_fkl_at_t_1_masked_entries_stay_impossible():
    gen = torch.Generator().manual_seed(3)
    s = torch.log_softmax(torch.randn(4, 9, generator=gen), -1)
    u = torch.log_softmax(torch.randn(4, 9, generator=gen), -1)
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(make_divergence("taid", t=t)(s, s), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(make_divergence("taid", t=1.0)(s, u), make_divergence("fkl")(s, u))
    masked = u.clone()
    masked[:, -2:] = float("-inf")
    masked = torch.log_softmax(masked, -1)
    value = make_divergence("taid", t=0.5)(s.clone().requires_grad_(), masked)
    assert torch.isfinite(value).all()
    # p_t puts no mass where the teacher has none: the value equals the naive one on the first 7 entries
    p_t = torch.softmax(0.5 * s[:, :7] + 0.5 * masked[:, :7], -1)
    torch.testing.assert_close(value, (p_t * (torch.log(p_t) - s[:, :7])).sum(-1), rtol=1e-5, atol=1e-6)


def _naive_t_series(losses, *, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True):
    """The official update_t (called once per step with the step's loss, global_step = step index)."""
    t, prev, m, out = t_start, float("inf"), 0.0, []
    for step, loss in enumerate(losses):
        if prev == float("inf"):
            prev = loss
        else:
            r = (prev - loss) / (prev + 1e-15)
            m = beta * m + (1 - beta) * r
            target = t_start + (t_end - t_start) * step / total
            t = min(t_end, max(target, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t))) if adaptive else target
            prev = loss
        out.append(t)
    return out


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("alpha", [5e-4, 0.2])
def test_the_t_schedule_follows_the_official_update_rule(adaptive, alpha):
    cfg = DistillConfig.from_dict({"loss": {"method": "taid", "taid_alpha": alpha, "taid_adaptive": adaptive}}).loss
    losses = [5.0, 4.0, 3.5, 3.6, 3.0, 2.0, 2.5, 1.0, 0.9, 0.9, 0.5, 0.4]
    sched = TaidSchedule(cfg)
    got = []
    for step, loss in enumerate(losses):
        sched.update(loss, step=step, total=len(losses))
        got.append(sched.t)
    assert got == pytest.approx(_naive_t_series(losses, total=len(losses), alpha=alpha, adaptive=adaptive),
                                abs=1e-12)
    assert all(b >= a for a, b in itertools.pairwise(got)) and got[-1] <= 1.0
    if adaptive and alpha == 0.2:  # the adaptive step runs ahead of the linear schedule
        assert got[3] > 0.4 + 0.6 * 3 / len(losses)
    before = sched.state_dict()
    sched.update(float("nan"), step=12, total=12)  # a skipped step changes nothing
    assert sched.state_dict() == before


def test_stage_scope_restarts_t_and_run_scope_carries_it():
    for scope, expected_restart in (("stage", True), ("run", False)):
        sched = TaidSchedule(DistillConfig.from_dict({"loss": {"method": "taid", "taid_scope": scope}}).loss)
        sched.start_stage(first=True)
        for step, loss in enumerate([3.0, 2.0, 1.0]):
            sched.update(loss, step=step, total=3)
        t_after = sched.t
        assert t_after > 0.4
        sched.start_stage(first=False)
        assert (sched.t == 0.4) is expected_restart and (sched.t == t_after) is not expected_restart


def test_taid_settings_are_checked_and_other_methods_keep_their_hash():
    with pytest.raises(ConfigError, match="divergence.*--method taid trains TAID's own objective"):
        DistillConfig.from_dict({"loss": {"method": "taid", "divergence": "rkl"}})
    with pytest.raises(ConfigError, match="temperature.*TAID has no temperature"):
        DistillConfig.from_dict({"loss": {"method": "taid", "temperature": 2.0}})
    with pytest.raises(ConfigError, match="taid_t_end"):
        DistillConfig.from_dict({"loss": {"method": "taid", "taid_t_start": 0.6, "taid_t_end": 0.5}})
    base = DistillConfig().training_hash()
    assert DistillConfig.from_dict({"loss": {"taid_alpha": 0.1}}).training_hash() == base  # unused by kd
    taid = DistillConfig.from_dict({"loss": {"method": "taid"}})
    assert taid.training_hash() != base
    assert taid.replace(loss={"taid_alpha": 0.1}).training_hash() != taid.training_hash()


def _taid_series(run_dir):
    return [(r["step"], r["taid_t"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def test_taid_run_resumes_with_t_exactly_where_it_was(tmp_path, tiny_pair, tiny_data):
    """Plain KD with TAID (fast adaptive step so that t moves visibly): t is logged every step, rises,
    and a run crashed at step 7 and resumed from its step-6 checkpoint gives the same t series and the
    same weights, bit for bit."""
    loss = {"method": "taid", "taid_alpha": 0.05, "divergence": "fkl"}
    train = {"epochs": 2, "save_every": 2, "log_every": 1}
    ref = _trainer(tiny_config(tmp_path / "a", tiny_pair, tiny_data, loss=loss, train=train)).train()
    series = _taid_series(tmp_path / "a" / "run")
    ts = [t for _, t in series]
    assert ts[0] == 0.4 and ts[-1] > ts[1] > 0.4 and all(b >= a for a, b in itertools.pairwise(ts))

    cfg = tiny_config(tmp_path / "b", tiny_pair, tiny_data, loss=loss, train=train)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(cfg, step_callbacks=[crash_at(7)]).train()
    state = json.loads((tmp_path / "b" / "run" / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["state"]["taid"]["t"] == pytest.approx(dict(series)[6], abs=0)
    resumed = _trainer(cfg).train()
    assert _taid_series(tmp_path / "b" / "run") == series
    for k, v in _weights(ref.final_dir).items():
        torch.testing.assert_close(_weights(resumed.final_dir)[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("scope", ["run", "stage"])
def test_taid_inside_a_pocl_curriculum(tmp_path, tiny_pair, tiny_data, scope):
    """Two stages with the curriculum's rising alpha; TAID's temperature stays 1 in both; t restarts at the
    second stage only with taid_scope stage."""
    cfg = tiny_config(tmp_path, tiny_pair, tiny_data, loss={"method": "taid", "taid_alpha": 0.05,
                                                            "taid_scope": scope}, train={"log_every": 1})
    stages = [Stage("s1", epochs=1, temperature=1.0, alpha=0.7), Stage("s2", epochs=1, temperature=2.0, alpha=1.0)]
    result = _trainer(cfg, stages).train()
    assert result.status == "completed"
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert {r["temperature"] for r in recs} == {1.0}
    assert [r["alpha"] for r in recs] == [0.7] * 6 + [1.0] * 6
    first_of_stage2 = recs[6]["taid_t"]
    if scope == "stage":
        assert first_of_stage2 == 0.4 and recs[5]["taid_t"] > 0.4
    else:
        assert first_of_stage2 >= recs[5]["taid_t"] > 0.4


@pytest.mark.parametrize("curriculum", ["none", "pocl"])
def test_pocl_distill_method_taid_from_the_command_line(tmp_path, tiny_pair, tiny_data, curriculum):
    from pocl.cli import main

    teacher, student = tiny_pair
    out = tmp_path / "run"
    code = main(["distill", "--method", "taid", "--curriculum", curriculum, "--teacher", str(teacher),
                 "--student", str(student), "--train-file", str(tiny_data[0]), "--dev-file", str(tiny_data[1]),
                 "--max-length", "48", "--max-prompt-length", "32", "--batch-size", "8", "--micro-batch-size", "4",
                 "--no-progress", "--no-tensorboard", "--log-every", "1", "--output-dir", str(out),
                 "--rank-max-new-tokens", "6", "--dev-rouge-max-new-tokens", "4",
                 *(["--num-stages", "2", "--stage-epochs", "1"] if curriculum == "pocl" else ["--epochs", "1"])])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "taid"
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert recs[0]["taid_t"] == 0.4 and recs[-1]["taid_t"] > 0.4 and {r["temperature"] for r in recs} == {1.0}
    assert (out / "final" / "model.safetensors").is_file()
