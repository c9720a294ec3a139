"""The KD loss engine: selection, T² rule, normalisation, chunked == dense, memory."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pocl.errors import ConfigError, UnknownNameError
from pocl.losses import (
    DIVERGENCES,
    KDLossOutput,
    auto_chunk_size,
    chunked_kd_loss_from_logits,
    count_target_tokens,
    dense_kd_loss,
    fused_kd_loss,
    make_divergence,
    select_response_tokens,
    temperature_scale,
)

DIVS = DIVERGENCES.names()



# ------------------------------------------------------------------------------------------
# A small problem: student/teacher hidden states and LM heads
# ------------------------------------------------------------------------------------------

@dataclass
class Problem:
    h: torch.Tensor        # [N, H] student hidden (leaf, requires grad)
    w: torch.Tensor        # [Vs, H] student head (leaf, requires grad)
    b: torch.Tensor        # [Vs] student bias (leaf, requires grad)
    th: torch.Tensor       # [N, Ht] teacher hidden
    tw: torch.Tensor       # [Vt, Ht] teacher head
    tb: torch.Tensor       # [Vt] teacher bias
    targets: torch.Tensor  # [N]
    vocab: int | None      # vocab_size argument

    def leaves(self):
        return (self.h, self.w, self.b)

    def student_logits(self):
        return F.linear(self.h, self.w, self.b)

    def teacher_logits(self):
        return F.linear(self.th, self.tw, self.tb)


def make_problem(n=7, h=5, ht=6, v=13, extra_student=0, extra_teacher=0,
                 dtype=torch.float64, seed=0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    vs, vt = v + extra_student, v + extra_teacher
    return Problem(
        h=rnd(n, h).requires_grad_(True), w=rnd(vs, h, scale=0.8).requires_grad_(True),
        b=rnd(vs, scale=0.3).requires_grad_(True), th=rnd(n, ht), tw=rnd(vt, ht, scale=0.8),
        tb=rnd(vt, scale=0.3), targets=torch.randint(0, v, (n,), generator=g),
        vocab=v if (extra_student or extra_teacher) else None)


def grads_of(loss: torch.Tensor, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=False)


def run_fused(pb: Problem, **kw) -> KDLossOutput:
    return fused_kd_loss(pb.h, pb.w, pb.b, pb.th, pb.tw, pb.tb, pb.targets,
                         vocab_size=pb.vocab, **kw)


def run_chunked(pb: Problem, **kw) -> KDLossOutput:
    return chunked_kd_loss_from_logits(pb.student_logits(), pb.teacher_logits(), pb.targets,
                                       vocab_size=pb.vocab, **kw)


def run_dense(pb: Problem, **kw) -> KDLossOutput:
    kw.pop("chunk_size", None)
    return dense_kd_loss(pb.student_logits(), pb.teacher_logits(), pb.targets,
                         vocab_size=pb.vocab, **kw)


def assert_same(a: KDLossOutput, b: KDLossOutput, ga, gb, rtol, atol):
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.ce_sum, b.ce_sum, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.divergence_sum, b.divergence_sum, rtol=rtol, atol=atol)
    assert a.num_tokens == b.num_tokens
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------
# Independent reference of the whole loss (float64, explicit probabilities)
# ------------------------------------------------------------------------------------------

def reference_loss(zs, zt, targets, name, params, temperature, alpha, normalizer, t2=True):
    zs, zt = zs.double(), zt.double()
    ce = F.cross_entropy(zs, targets, reduction="sum")
    p = torch.softmax(zt / temperature, -1)
    q = torch.softmax(zs / temperature, -1)

    def kl(a, c):
        return (a * (a.log() - c.log())).sum(-1)

    if name == "fkl":
        d = kl(p, q)
    elif name == "rkl":
        d = kl(q, p)
    elif name == "jsd":
        lam = params.get("lam", 0.9)
        m = (1 - lam) * p + lam * q
        d = lam * kl(q, m) + (1 - lam) * kl(p, m)
    elif name == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    elif name == "skl":
        a = params.get("skew", 0.1)
        d = kl(p, a * p + (1 - a) * q)
    elif name == "srkl":
        a = params.get("skew", 0.1)
        d = kl(q, (1 - a) * p + a * q)
    elif name == "gjsd":
        beta = params.get("beta", 0.5)
        if beta == 0:
            d = kl(p, q)
        elif beta == 1:
            d = kl(q, p)
        else:
            m = beta * p + (1 - beta) * q
            d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif name == "akl":
        mu = params.get("mu", 0.5)
        with torch.no_grad():  # head: top teacher tokens up to cumulative mass mu; weights are constants
            ps, order = torch.sort(p, dim=-1, descending=True, stable=True)
            head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, (ps.cumsum(-1) - ps) < mu)
            gap = (p - q).abs()
            g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
            w = torch.where(g_head + g_tail > 0, g_head / (g_head + g_tail), torch.full_like(g_head, 0.5))
        d = w * kl(p, q) + (1 - w) * kl(q, p)
    elif name == "taid":
        t = params.get("t", 0.4)
        target = q.detach() ** (1 - t) * p ** t  # softmax((1 - t) stopgrad(log q) + t log p)
        d = kl(target / target.sum(-1, keepdim=True), q)
    else:  # pragma: no cover - a new divergence needs a reference here
        raise AssertionError(name)
    scale = temperature ** 2 if t2 else 1.0
    return ((1 - alpha) * ce + alpha * scale * d.sum()) / normalizer, ce, d.sum()


# ------------------------------------------------------------------------------------------
# fused == chunked-from-logits == dense (== independent reference)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("trim", [False, True], ids=["same-vocab", "trimmed"])
def test_all_paths_agree(name, temperature, alpha, trim):
    pb = make_problem(extra_student=2 if trim else 0, extra_teacher=5 if trim else 0,
                      seed=DIVS.index(name) * 100 + int(10 * temperature + 2 * alpha) + trim)
    n = pb.h.shape[0]
    opts = dict(divergence=make_divergence(name), temperature=temperature, alpha=alpha,
                normalizer=11.0)
    dense = run_dense(pb, **opts)
    g_dense = grads_of(dense.loss, pb.leaves())

    # The dense path itself against the independent float64 reference.
    v = pb.vocab or pb.w.shape[0]
    ref, ref_ce, ref_div = reference_loss(
        pb.student_logits()[:, :v], pb.teacher_logits()[:, :v], pb.targets, name, {},
        temperature, alpha, 11.0)
    g_ref = grads_of(ref, pb.leaves())
    torch.testing.assert_close(dense.loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dense.ce_sum, ref_ce.detach(), rtol=1e-9, atol=1e-12)
    if alpha > 0:
        torch.testing.assert_close(dense.divergence_sum, ref_div.detach(), rtol=1e-9, atol=1e-12)
    else:
        assert dense.divergence_sum.item() == 0.0
    for x, y in zip(g_dense, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)

    for chunk in (1, 3, n, n + 5):
        fused = run_fused(pb, chunk_size=chunk, **opts)
        assert_same(fused, dense, grads_of(fused.loss, pb.leaves()), g_dense, 1e-10, 1e-12)
        chunked = run_chunked(pb, chunk_size=chunk, **opts)
        assert_same(chunked, dense, grads_of(chunked.loss, pb.leaves()), g_dense, 1e-10, 1e-12)

    if trim:
        # Padded student rows (beyond vocab_size) never receive gradient.
        fused = run_fused(pb, chunk_size=3, **opts)
        gh, gw, gb = grads_of(fused.loss, pb.leaves())
        assert (gw[v:] == 0).all() and (gb[v:] == 0).all()


@pytest.mark.parametrize("name", DIVS)
def test_float32_paths_agree(name):
    pb = make_problem(n=40, h=16, ht=24, v=300, extra_teacher=3, dtype=torch.float32, seed=5)
    opts = dict(divergence=make_divergence(name), temperature=2.0, alpha=0.5, normalizer=40.0)
    dense = run_dense(pb, **opts)
    g_dense = grads_of(dense.loss, pb.leaves())
    for chunk in (1, 16, 64):
        fused = run_fused(pb, chunk_size=chunk, **opts)
        assert fused.loss.dtype == torch.float32
        assert_same(fused, dense, grads_of(fused.loss, pb.leaves()), g_dense, 1e-4, 1e-6)
        chunked = run_chunked(pb, chunk_size=chunk, **opts)
        assert_same(chunked, dense, grads_of(chunked.loss, pb.leaves()), g_dense, 1e-4, 1e-6)


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    pb32 = make_problem(n=24, h=16, ht=16, v=100, dtype=torch.float32, seed=9)
    pb16 = Problem(*(x.detach().to(torch.bfloat16).requires_grad_(x.requires_grad)
                     if x.is_floating_point() else x
                     for x in (pb32.h, pb32.w, pb32.b, pb32.th, pb32.tw, pb32.tb, pb32.targets)),
                   vocab=None)
    opts = dict(divergence=make_divergence("fkl"), temperature=2.0, alpha=0.5, normalizer=24.0,
                chunk_size=8)
    out32, out16 = run_fused(pb32, **opts), run_fused(pb16, **opts)
    assert out16.loss.dtype == torch.float32  # math in float32 even for bf16 inputs
    g16 = grads_of(out16.loss, pb16.leaves())
    g32 = grads_of(out32.loss, pb32.leaves())
    assert [g.dtype for g in g16] == [torch.bfloat16] * 3
    torch.testing.assert_close(out16.loss, out32.loss, rtol=2e-2, atol=1e-2)
    for a, b in zip(g16, g32):
        assert torch.isfinite(a.float()).all()
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "srkl"])
def test_gradcheck_fused(name):
    pb = make_problem(n=5, h=3, ht=4, v=6, extra_teacher=2, seed=1)
    div = make_divergence(name)

    def f(h, w, b):
        return fused_kd_loss(h, w, b, pb.th, pb.tw, pb.tb, pb.targets, divergence=div,
                             temperature=2.0, alpha=0.7, normalizer=5.0, vocab_size=6,
                             chunk_size=2).loss

    assert torch.autograd.gradcheck(f, pb.leaves(), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_chunked_from_logits():
    pb = make_problem(n=5, h=3, ht=4, v=6, seed=2)
    zs = pb.student_logits().detach().requires_grad_(True)
    zt = pb.teacher_logits().detach()

    def f(z):
        return chunked_kd_loss_from_logits(z, zt, pb.targets, divergence="jsd", temperature=1.5,
                                           alpha=0.6, normalizer=3.0, chunk_size=2).loss

    assert torch.autograd.gradcheck(f, (zs,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_upstream_gradient_is_applied():
    pb = make_problem(seed=3)
    opts = dict(divergence=make_divergence("jsd"), temperature=2.0, alpha=0.5, normalizer=7.0,
                chunk_size=3)
    g1 = grads_of(run_fused(pb, **opts).loss, pb.leaves())
    g2 = grads_of(2.5 * run_fused(pb, **opts).loss, pb.leaves())
    for a, b in zip(g1, g2):
        torch.testing.assert_close(2.5 * a, b)
    z = pb.student_logits()
    c1 = grads_of(chunked_kd_loss_from_logits(z, pb.teacher_logits(), pb.targets, **opts).loss,
                  pb.leaves())
    c2 = grads_of(-3 * chunked_kd_loss_from_logits(pb.student_logits(), pb.teacher_logits(),
                                                   pb.targets, **opts).loss, pb.leaves())
    for a, b in zip(c1, c2):
        torch.testing.assert_close(-3 * a, b)


def test_backward_accumulates_into_parameters_and_tied_embeddings():
    torch.manual_seed(0)
    v, h, n = 20, 8, 9
    emb = torch.nn.Embedding(v, h).double()
    ids = torch.randint(0, v, (n,))
    targets = torch.randint(0, v, (n,))
    teacher_logits = torch.randn(n, v, dtype=torch.float64)
    opts = dict(divergence=make_divergence("fkl"), temperature=2.0, alpha=0.5, normalizer=9.0)

    def hidden():  # the same Parameter is input embedding and (tied) LM head
        return torch.tanh(emb(ids))

    out = fused_kd_loss(hidden(), emb.weight, None, teacher_logits, torch.eye(v).double(), None,
                        targets, chunk_size=4, **opts)
    out.loss.backward()
    fused_grad = emb.weight.grad.clone()
    emb.weight.grad = None
    dense_kd_loss(hidden() @ emb.weight.T, teacher_logits, targets, **opts).loss.backward()
    torch.testing.assert_close(fused_grad, emb.weight.grad)
    assert fused_grad.abs().sum() > 0


def test_frozen_head_only_hidden_gets_gradient():
    pb = make_problem(seed=4)
    w = pb.w.detach()  # e.g. a frozen LM head with adapters below it
    out = fused_kd_loss(pb.h, w, None, pb.th, pb.tw, None, pb.targets, divergence="rkl",
                        temperature=1.0, alpha=0.5, normalizer=7.0, chunk_size=2)
    (gh,) = torch.autograd.grad(out.loss, [pb.h])
    dense = dense_kd_loss(F.linear(pb.h, w), F.linear(pb.th, pb.tw), pb.targets,
                          divergence="rkl", temperature=1.0, alpha=0.5, normalizer=7.0)
    torch.testing.assert_close(gh, torch.autograd.grad(dense.loss, [pb.h])[0])


def test_logit_fn_soft_capping():
    pb = make_problem(seed=6)

    def cap(z):
        return 2.0 * torch.tanh(z / 2.0)

    opts = dict(divergence=make_divergence("skl"), temperature=2.0, alpha=0.5, normalizer=7.0)
    fused = run_fused(pb, chunk_size=3, student_logit_fn=cap, teacher_logit_fn=cap, **opts)
    dense = dense_kd_loss(cap(pb.student_logits()), cap(pb.teacher_logits()), pb.targets, **opts)
    assert_same(fused, dense, grads_of(fused.loss, pb.leaves()),
                grads_of(dense.loss, pb.leaves()), 1e-10, 1e-12)
    uncapped = run_fused(pb, chunk_size=3, **opts)
    assert not torch.allclose(uncapped.loss, fused.loss)


def test_values_without_gradients_match():
    pb = make_problem(seed=8)
    opts = dict(divergence=make_divergence("jsd"), temperature=2.0, alpha=0.5, normalizer=7.0,
                chunk_size=3)
    with_grad = run_fused(pb, **opts)
    with torch.no_grad():
        for out in (run_fused(pb, **opts), run_chunked(pb, **opts)):
            assert not out.loss.requires_grad
            torch.testing.assert_close(out.loss, with_grad.loss.detach())
            torch.testing.assert_close(out.divergence_sum, with_grad.divergence_sum)
            torch.testing.assert_close(out.ce_sum, with_grad.ce_sum)
    assert with_grad.loss.requires_grad
    assert not with_grad.ce_sum.requires_grad and not with_grad.divergence_sum.requires_grad


# ------------------------------------------------------------------------------------------
# Temperature and the T² rule; what is logged
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIVS)
def test_t2_rule_applies_to_every_divergence(name):
    pb = make_problem(seed=10)
    base = dict(divergence=make_divergence(name), normalizer=7.0, chunk_size=3)
    raw = run_fused(pb, temperature=2.0, alpha=1.0, temperature_scaling="none", **base)
    t2 = run_fused(pb, temperature=2.0, alpha=1.0, **base)  # "t2" is the default
    # The logged divergence is the same raw value; only the loss is multiplied by T² = 4.
    torch.testing.assert_close(raw.divergence_sum, t2.divergence_sum)
    torch.testing.assert_close(raw.loss, raw.divergence_sum / 7.0)
    torch.testing.assert_close(t2.loss, 4.0 * t2.divergence_sum / 7.0)
    g_raw = grads_of(raw.loss, pb.leaves())
    g_t2 = grads_of(t2.loss, pb.leaves())
    for a, b in zip(g_raw, g_t2):
        torch.testing.assert_close(4.0 * a, b)
    mixed = run_fused(pb, temperature=2.0, alpha=0.5, **base)
    torch.testing.assert_close(
        mixed.loss, (0.5 * mixed.ce_sum + 0.5 * 4.0 * mixed.divergence_sum) / 7.0)
    # At T = 1 the rule is a no-op.
    one = run_fused(pb, temperature=1.0, alpha=1.0, **base)
    one_raw = run_fused(pb, temperature=1.0, alpha=1.0, temperature_scaling="none", **base)
    torch.testing.assert_close(one.loss, one_raw.loss)


def test_temperature_scale():
    assert temperature_scale(2.0) == 4.0
    assert temperature_scale(1.5, "t2") == 2.25
    assert temperature_scale(2.0, "none") == 1.0
    with pytest.raises(ConfigError, match="temperature_scaling"):
        temperature_scale(2.0, "T^2")


def test_ce_is_at_temperature_one_and_logged_divergence_is_true_kl():
    pb = make_problem(seed=11)
    z = pb.student_logits().detach()
    out = dense_kd_loss(z, z.clone(), pb.targets, divergence="fkl", temperature=2.0, alpha=0.5,
                        normalizer=7.0)
    # Identical models: the true KL is 0 (the teacher cross-entropy -Σp log q would not be).
    assert abs(out.divergence_sum.item()) < 1e-12
    torch.testing.assert_close(out.ce_sum, F.cross_entropy(z, pb.targets, reduction="sum"))
    fused = run_fused(pb, divergence="fkl", temperature=3.0, alpha=0.5, normalizer=7.0)
    p = torch.softmax(pb.teacher_logits() / 3.0, -1)
    logq = torch.log_softmax(pb.student_logits() / 3.0, -1)
    true_kl = (p * (p.log() - logq)).sum()
    torch.testing.assert_close(fused.divergence_sum, true_kl.detach())
    torch.testing.assert_close(
        fused.ce_sum, F.cross_entropy(pb.student_logits(), pb.targets, reduction="sum").detach())


def test_alpha_zero_is_pure_ce_without_teacher():
    pb = make_problem(seed=12)
    out = fused_kd_loss(pb.h, pb.w, pb.b, None, None, None, pb.targets, divergence=None,
                        temperature=2.0, alpha=0.0, normalizer=5.0, chunk_size=2)
    ce = F.cross_entropy(pb.student_logits(), pb.targets, reduction="sum")
    torch.testing.assert_close(out.loss, ce / 5.0)
    assert out.divergence_sum.item() == 0.0
    for a, b in zip(grads_of(out.loss, pb.leaves()), grads_of(ce / 5.0, pb.leaves())):
        torch.testing.assert_close(a, b)
    logits_out = chunked_kd_loss_from_logits(pb.student_logits(), None, pb.targets,
                                             divergence=None, temperature=1.0, alpha=0.0,
                                             normalizer=5.0)
    torch.testing.assert_close(logits_out.loss, ce / 5.0)
    dense = dense_kd_loss(pb.student_logits(), None, pb.targets, divergence=None,
                          temperature=1.0, alpha=0.0, normalizer=5.0)
    torch.testing.assert_close(dense.loss, ce / 5.0)


def test_divergence_by_name():
    pb = make_problem(seed=13)
    a = run_fused(pb, divergence="jsd", temperature=1.0, alpha=0.5, normalizer=7.0)
    b = run_fused(pb, divergence=make_divergence("jsd", lam=0.9), temperature=1.0, alpha=0.5,
                  normalizer=7.0)
    torch.testing.assert_close(a.loss, b.loss)
    with pytest.raises(UnknownNameError):
        run_fused(pb, divergence="jds", temperature=1.0, alpha=0.5, normalizer=7.0)


# ------------------------------------------------------------------------------------------
# Normalisation over the accumulation window
# ------------------------------------------------------------------------------------------

def _sequence_batch():
    # 4 sequences, length 9, different numbers of response tokens, right padding.
    labels = torch.full((4, 9), -100, dtype=torch.long)
    labels[0, 2:8] = torch.tensor([3, 4, 5, 6, 7, 1])      # 6 targets
    labels[1, 6:8] = torch.tensor([8, 1])                  # 2 targets
    labels[2, 1:9] = torch.tensor([2, 3, 9, 9, 4, 5, 6, 1])  # 8 targets
    labels[3, 5:6] = torch.tensor([1])                     # 1 target
    return labels


@pytest.mark.parametrize("path", ["fused", "chunked", "dense"])
def test_micro_batches_sum_to_the_full_batch(path):
    g = torch.Generator().manual_seed(14)
    v, hdim = 12, 6
    labels = _sequence_batch()
    hidden = torch.randn(4, 9, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(4, 9, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(v, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    tw = torch.randn(v, hdim, generator=g, dtype=torch.float64)
    leaves = (hidden, w, b)
    opts = dict(divergence=make_divergence("jsd"), temperature=2.0, alpha=0.5)

    def loss(rows, normalizer):
        sh, tg = select_response_tokens(hidden[rows], labels[rows])
        th, _ = select_response_tokens(t_hidden[rows], labels[rows])
        if path == "fused":
            return fused_kd_loss(sh, w, b, th, tw, None, tg, normalizer=normalizer,
                                 chunk_size=4, **opts).loss
        fn = chunked_kd_loss_from_logits if path == "chunked" else dense_kd_loss
        return fn(F.linear(sh, w, b), F.linear(th, tw), tg, normalizer=normalizer, **opts).loss

    total = count_target_tokens(labels)
    assert total == 17
    full = loss(slice(0, 4), total)
    full.backward()
    full_grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None

    micro = [slice(0, 1), slice(1, 3), slice(3, 4)]
    acc = 0.0
    for rows in micro:  # gradient accumulation, one backward per micro-batch
        part = loss(rows, total)
        part.backward()
        acc = acc + part.detach()
    torch.testing.assert_close(acc, full.detach())
    for x, gfull in zip(leaves, full_grads):
        torch.testing.assert_close(x.grad, gfull)

    # Negative control (TRL #4719): normalising each micro-batch by its own token count and
    # averaging does not give the full-batch loss when micro-batches differ in size.
    per_micro = [loss(rows, count_target_tokens(labels[rows])).detach() for rows in micro]
    assert not torch.allclose(sum(per_micro) / len(micro), full.detach())


# ------------------------------------------------------------------------------------------
# Token selection
# ------------------------------------------------------------------------------------------

EOS = 1


def test_select_response_tokens_hand_written():
    labels = torch.tensor([
        [-100, -100, 5, 6, EOS, -100],     # prompt of 2, response 5 6, EOS, right padding
        [-100, 7, EOS, -100, -100, -100],  # prompt of 1, response 7, EOS, padding
    ])
    # hidden[b, i] = 100 b + i, so the selected rows reveal their positions.
    hidden = (100 * torch.arange(2)[:, None] + torch.arange(6)[None, :]).float()[..., None]
    sel, targets = select_response_tokens(hidden, labels)
    assert sel.squeeze(-1).tolist() == [1.0, 2.0, 3.0, 100.0, 101.0]
    assert targets.tolist() == [5, 6, EOS, 7, EOS]
    assert count_target_tokens(labels) == 5
    # The position predicting EOS is selected; a position whose next label is prompt or
    # padding never is; the last position (predicts nothing) never is.
    assert 4.0 not in sel and 0.0 not in sel and 5.0 not in sel and 102.0 not in sel


def test_select_response_tokens_logits_grad_and_custom_ignore_index():
    labels = torch.tensor([[0, 0, 4, 2], [0, 3, 0, 0]])
    logits = torch.randn(2, 4, 11, requires_grad=True)
    sel, targets = select_response_tokens(logits, labels, ignore_index=0)
    assert sel.shape == (3, 11) and targets.tolist() == [4, 2, 3]
    torch.testing.assert_close(sel, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))
    assert count_target_tokens(labels, ignore_index=0) == 3
    sel.sum().backward()
    expected = torch.zeros(2, 4)
    expected[0, 1] = expected[0, 2] = expected[1, 0] = 1
    torch.testing.assert_close(logits.grad.sum(-1) / 11, expected)
    assert count_target_tokens(labels, ignore_index=-100) == 6


def test_select_response_tokens_rejects_bad_shapes():
    with pytest.raises(ValueError):
        select_response_tokens(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        select_response_tokens(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        count_target_tokens(torch.zeros(5, dtype=torch.long))


def test_no_response_tokens_gives_a_connected_zero_loss():
    labels = torch.full((2, 5), -100)
    pb = make_problem(seed=15)
    hidden = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    sel, targets = select_response_tokens(hidden, labels)
    assert sel.shape == (0, 5) and targets.shape == (0,)
    th = torch.zeros(0, 6, dtype=torch.float64)
    opts = dict(divergence="fkl", temperature=2.0, alpha=0.5, normalizer=3.0)
    out = fused_kd_loss(sel, pb.w, pb.b, th, pb.tw, pb.tb, targets, **opts)
    assert out.loss.item() == 0.0 and out.num_tokens == 0 and out.loss.requires_grad
    out.loss.backward()
    assert hidden.grad.eq(0).all() and pb.w.grad.eq(0).all() and pb.b.grad.eq(0).all()
    for fn in (chunked_kd_loss_from_logits, dense_kd_loss):
        sel, targets = select_response_tokens(hidden, labels)  # fresh graph for each backward
        zs = F.linear(sel, pb.w, pb.b)
        out = fn(zs, torch.zeros(0, 13, dtype=torch.float64), targets, **opts)
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        out.loss.backward()
        assert torch.isfinite(hidden.grad).all()


# ------------------------------------------------------------------------------------------
# Masked (-inf) logits through the whole engine
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("kind", ["both", "teacher", "student"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_logits_never_give_nan(name, kind, temperature):
    pb = make_problem(n=6, v=10, seed=16)
    pb.targets = torch.tensor([0, 1, 2, 0, 1, 2])  # targets are never masked
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[4, 7, 9]] = True

    def masked(z):
        return z.masked_fill(mask, float("-inf"))

    s_fn = masked if kind in ("both", "student") else None
    t_fn = masked if kind in ("both", "teacher") else None
    opts = dict(divergence=make_divergence(name), temperature=temperature, alpha=0.5,
                normalizer=6.0, student_logit_fn=s_fn, teacher_logit_fn=t_fn)
    outs = [run_fused(pb, chunk_size=4, **opts), run_chunked(pb, chunk_size=4, **opts),
            run_dense(pb, **opts)]
    grads = [grads_of(o.loss, pb.leaves()) for o in outs]
    for out, gs in zip(outs, grads):
        assert torch.isfinite(out.loss) and torch.isfinite(out.divergence_sum)
        assert all(torch.isfinite(g).all() for g in gs)
        if kind == "both":  # masked vocabulary rows of the head get no gradient at all
            assert gs[1][mask].eq(0).all() and gs[2][mask].eq(0).all()
    for out, gs in zip(outs[:2], grads[:2]):
        assert_same(out, outs[2], gs, grads[2], 1e-9, 1e-12)


# ------------------------------------------------------------------------------------------
# Argument validation
# ------------------------------------------------------------------------------------------

GOOD = dict(divergence="fkl", temperature=1.0, alpha=0.5, normalizer=7.0)


@pytest.mark.parametrize("change,error,match", [
    (dict(temperature=0.0), ConfigError, "temperature"),
    (dict(temperature=-1.0), ConfigError, "temperature"),
    (dict(temperature=float("inf")), ConfigError, "temperature"),
    (dict(alpha=1.5), ConfigError, "alpha"),
    (dict(alpha=-0.1), ConfigError, "alpha"),
    (dict(normalizer=0), ConfigError, "normalizer"),
    (dict(normalizer=-3.0), ConfigError, "normalizer"),
    (dict(temperature_scaling="T2"), ConfigError, "temperature_scaling"),
    (dict(chunk_size=0), ConfigError, "chunk_size"),
    (dict(divergence=None), ConfigError, "divergence"),
    (dict(divergence=len), ConfigError, "divergence"),
    (dict(vocab_size=20), ValueError, "vocab_size"),
])
def test_invalid_options(change, error, match):
    pb = make_problem(seed=17)
    kwargs = {**GOOD, **change}
    pb.vocab = kwargs.pop("vocab_size", None)
    # dense_kd_loss has no chunk_size
    for run in (run_fused, run_chunked) + (() if "chunk_size" in change else (run_dense,)):
        with pytest.raises(error, match=match):
            run(pb, **kwargs)


def test_shape_errors():
    pb = make_problem(seed=18)
    with pytest.raises(ValueError, match="vocab_size"):  # different vocabularies, no vocab_size
        fused_kd_loss(pb.h, pb.w, pb.b, pb.th, pb.tw[:-1], None, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="hidden size"):
        fused_kd_loss(pb.h, pb.w[:, :-1], pb.b, pb.th, pb.tw, pb.tb, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_kd_loss(pb.h, pb.w, pb.b, pb.th, pb.tw[:, :-1], pb.tb, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="tokens"):
        fused_kd_loss(pb.h, pb.w, pb.b, pb.th[:-1], pb.tw, pb.tb, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="student_bias"):
        fused_kd_loss(pb.h, pb.w, pb.b[:-1], pb.th, pb.tw, pb.tb, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="targets"):
        fused_kd_loss(pb.h, pb.w, pb.b, pb.th, pb.tw, pb.tb, pb.targets[:-1], **GOOD)
    with pytest.raises(ValueError, match="teacher"):
        fused_kd_loss(pb.h, pb.w, pb.b, None, None, None, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="teacher_logits"):
        dense_kd_loss(pb.student_logits(), None, pb.targets, **GOOD)
    with pytest.raises(ValueError, match="teacher_logits"):
        chunked_kd_loss_from_logits(pb.student_logits(), pb.teacher_logits()[:-1], pb.targets,
                                    **GOOD)
    with pytest.raises(ValueError, match="student_logits"):
        dense_kd_loss(pb.student_logits()[None], pb.teacher_logits(), pb.targets, **GOOD)


# ------------------------------------------------------------------------------------------
# Memory: the fused path's peak grows with chunk_size × V, the dense path's with N × V
# ------------------------------------------------------------------------------------------

def _peak_cpu_bytes(fn) -> int:
    """Exact peak of CPU bytes allocated (and not yet freed) while ``fn`` runs.

    Reads every allocation/free event the profiler records from the CPU allocator
    (``profile_memory=True``) and replays them in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private API moved
        pytest.skip("torch profiler event tree not available in this torch version")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    assert events, "the profiler recorded no allocations"
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def test_fused_peak_memory_is_bounded_by_the_chunk():
    n, v, hdim, chunk = 1024, 32000, 64, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g).requires_grad_(True)
    w = (torch.randn(v, hdim, generator=g) * 0.1).requires_grad_(True)
    b = torch.zeros(v, requires_grad=True)
    th = torch.randn(n, hdim, generator=g)
    tw = torch.randn(v, hdim, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)
    opts = dict(temperature=2.0, alpha=0.5, normalizer=float(n))

    def fused(tokens, name="jsd"):  # jsd: the divergence with the most temporaries
        def run():
            h.grad = w.grad = b.grad = None  # every measurement allocates its own gradients
            out = fused_kd_loss(h[:tokens], w, b, th[:tokens], tw, None, targets[:tokens],
                                divergence=name, chunk_size=chunk, **opts)
            out.loss.backward()
        return run

    def dense():  # fkl: the dense divergence with the fewest temporaries
        h.grad = w.grad = b.grad = None
        out = dense_kd_loss(F.linear(h, w, b), F.linear(th, tw), targets, divergence="fkl",
                            **opts)
        out.loss.backward()

    unit = chunk * v * 4                             # one float32 [chunk, V] tensor
    grad_buffers = 4 * v * (hdim + 1) * 4 + 2 * n * hdim * 4  # weight/bias/hidden gradients
    bound = 24 * unit + grad_buffers
    peak_full = _peak_cpu_bytes(fused(n))
    peak_half = _peak_cpu_bytes(fused(n // 2))
    peak_dense = _peak_cpu_bytes(dense)
    assert peak_full < bound, (peak_full / unit, bound / unit)
    assert peak_dense > bound, (peak_dense / unit, bound / unit)
    assert peak_dense > 5 * peak_full
    # Doubling the tokens adds [N, H]-sized buffers and noise of about one chunk tensor, not
    # the (N/2) x V = 8 chunk tensors per [N, V] temporary that the dense path adds.
    assert peak_full - peak_half < 2 * unit + 4 * (n // 2) * hdim * 4


@pytest.mark.parametrize("name,temperature,alpha", [("jsd", 1.0, 1.0), ("srkl", 2.0, 0.5), ("tvd", 2.0, 0.7)])
def test_kernel_path_chunk_temporaries_fit_the_auto_chunk_rule(name, temperature, alpha):
    """With a divergence kernel a chunk holds at most ``_KERNEL_CHUNK_TEMPORARIES`` float32 [chunk, V]
    tensors at its peak (the rule that lets auto_chunk_size choose larger chunks on that path)."""
    from pocl.losses.chunking import _KERNEL_CHUNK_TEMPORARIES

    n, v, hdim, chunk = 512, 32000, 64, 64
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, hdim, generator=g).requires_grad_(True)
    w = (torch.randn(v, hdim, generator=g) * 0.1).requires_grad_(True)
    th, tw = torch.randn(n, hdim, generator=g), torch.randn(v, hdim, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)

    def run():
        h.grad = w.grad = None
        out = fused_kd_loss(h, w, None, th, tw, None, targets, divergence=name, chunk_size=chunk,
                            temperature=temperature, alpha=alpha, normalizer=float(n))
        out.loss.backward()

    run()  # compile first: the compiler's own allocations are not the chunk's
    unit = chunk * v * 4
    grad_buffers = (v * hdim + n * hdim) * 4  # the weight and hidden gradients filled in forward
    chunk_tensors = (_peak_cpu_bytes(run) - grad_buffers) / unit
    # At least both models' logits of a chunk are alive at once.
    assert 2.0 <= chunk_tensors < _KERNEL_CHUNK_TEMPORARIES, chunk_tensors


def test_auto_chunk_size_is_larger_on_the_kernel_path():
    assert auto_chunk_size(0, 32000) == 512 and auto_chunk_size(0, 32000, kernel=True) == 512
    assert auto_chunk_size(0, 128000) == 128 and auto_chunk_size(0, 128000, kernel=True) == 256
    assert auto_chunk_size(96, 128000, kernel=True) == 96
