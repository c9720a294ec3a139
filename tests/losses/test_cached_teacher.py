"""The loss with a cached teacher (top-k logits + one tail bucket): values and gradients against a
naive float64 reference built from explicit probabilities, k = V equal to the live loss, the bounds
documented in docs/losses.md, masked positions and masked vocabulary entries, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocl.errors import ConfigError
from pocl.losses import (DIVERGENCES, TopKTeacher, chunked_kd_loss_from_logits, dense_kd_loss, fused_kd_loss,
                         make_divergence, select_response_tokens, teacher_top_k)
from tests.losses.test_divergences import REFERENCES

DIVS = DIVERGENCES.names()



def _problem(n=9, h=5, ht=6, v=17, seed=0, extra_teacher=0):
    """Student hidden/head (leaves) and a teacher head with ``extra_teacher`` padded rows, float64."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return dict(h=rnd(n, h).requires_grad_(True), w=rnd(v, h, scale=0.9).requires_grad_(True),
                b=rnd(v, scale=0.3).requires_grad_(True), th=rnd(n, ht), tw=rnd(v + extra_teacher, ht, scale=1.5),
                targets=torch.randint(0, v, (n,), generator=g), v=v)


def _naive_bucket_loss(zs, zt, targets, k, name, temperature, alpha, normalizer):
    """Independent reference: explicit float64 probabilities, the top k by a plain sort of the teacher's
    logits, the tail mass as an explicit sum over the other tokens, the reference divergence on the
    [N, k + 1] distributions; CE from the full student logits."""
    p = torch.softmax(zt / temperature, -1)
    q = torch.softmax(zs / temperature, -1)
    top = torch.argsort(zt, dim=-1, descending=True)[:, :k]
    rest = torch.ones_like(zt, dtype=torch.bool).scatter(-1, top, False)
    buckets_p = torch.cat([p.gather(-1, top), (p * rest).sum(-1, keepdim=True)], -1)
    buckets_q = torch.cat([q.gather(-1, top), (q * rest).sum(-1, keepdim=True)], -1)
    if k == zt.shape[-1]:
        buckets_p, buckets_q = buckets_p[:, :k], buckets_q[:, :k]
    d = REFERENCES[name](buckets_p, buckets_q)
    ce = F.cross_entropy(zs, targets, reduction="sum")
    return ((1 - alpha) * ce + alpha * temperature ** 2 * d.sum()) / normalizer, d.sum()


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_bucket_loss_matches_the_naive_reference(name, temperature, k):
    pb = _problem(seed=DIVS.index(name) * 10 + k)
    zt = F.linear(pb["th"], pb["tw"])
    cached = teacher_top_k(pb["th"], pb["tw"], None, k=k, temperatures=[1.0, 2.0], chunk_size=4)
    kw = dict(divergence=name, temperature=temperature, alpha=0.7, normalizer=6.0, chunk_size=4)
    leaves = (pb["h"], pb["w"], pb["b"])

    ref_loss, ref_div = _naive_bucket_loss(F.linear(pb["h"], pb["w"], pb["b"]), zt, pb["targets"], k, name,
                                           temperature, 0.7, 6.0)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    fused = fused_kd_loss(pb["h"], pb["w"], pb["b"], None, None, None, pb["targets"], teacher_topk=cached, **kw)
    chunked = chunked_kd_loss_from_logits(F.linear(pb["h"], pb["w"], pb["b"]), None, pb["targets"],
                                          teacher_topk=cached, **kw)
    for out in (fused, chunked):
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.divergence_sum, ref_div.detach(), rtol=1e-9, atol=1e-11)
        for got, want in zip(torch.autograd.grad(out.loss, leaves), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_at_least_vocabulary_is_the_live_loss(name, temperature):
    pb = _problem(seed=50 + DIVS.index(name))
    leaves = (pb["h"], pb["w"], pb["b"])
    kw = dict(divergence=name, temperature=temperature, alpha=0.4, normalizer=3.0, chunk_size=4)
    live = fused_kd_loss(pb["h"], pb["w"], pb["b"], pb["th"], pb["tw"], None, pb["targets"], **kw)
    cached = teacher_top_k(pb["th"], pb["tw"], None, k=10 ** 6, temperatures=[temperature])
    assert cached.token_ids.shape == (9, pb["v"]) and torch.isneginf(cached.tail_lse).all()
    out = fused_kd_loss(pb["h"], pb["w"], pb["b"], None, None, None, pb["targets"], teacher_topk=cached, **kw)
    torch.testing.assert_close(out.loss, live.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.divergence_sum, live.divergence_sum, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(out.loss, leaves), torch.autograd.grad(live.loss, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_teacher_top_k_stores_the_top_logits_and_exact_tails():
    pb = _problem(seed=3, extra_teacher=4)  # the teacher has 4 padded rows beyond the shared vocabulary
    tb = torch.linspace(-1, 1, pb["v"] + 4, dtype=torch.float64)
    cap = lambda z: 2.0 * torch.tanh(z / 2.0)  # noqa: E731 - a soft-capping logit transform
    z = cap(F.linear(pb["th"], pb["tw"], tb)[:, :pb["v"]])
    out = teacher_top_k(pb["th"], pb["tw"], tb, k=6, temperatures=[2.0, 1.0], vocab_size=pb["v"], chunk_size=2,
                        teacher_logit_fn=cap)
    assert out.temperatures == (2.0, 1.0) and out.token_ids.dtype == torch.int64
    for row in range(z.shape[0]):
        want = sorted(torch.argsort(z[row], descending=True)[:6].tolist())
        assert out.token_ids[row].tolist() == want  # the top 6 of the shared vocabulary, ascending ids
        torch.testing.assert_close(out.logits[row], z[row, want], rtol=1e-12, atol=1e-12)
        rest = [j for j in range(pb["v"]) if j not in want]
        for column, t in enumerate((2.0, 1.0)):
            torch.testing.assert_close(out.tail_lse[row, column], torch.logsumexp(z[row, rest] / t, 0))
    # from logits instead of hidden states: the same table
    same = teacher_top_k(z, None, None, k=6, temperatures=[2.0, 1.0])
    assert torch.equal(same.token_ids, out.token_ids)
    torch.testing.assert_close(same.tail_lse, out.tail_lse)


def _full_divergence(name, zs, zt, temperature):
    p, q = torch.softmax(zt / temperature, -1), torch.softmax(zs / temperature, -1)
    return REFERENCES[name](p, q)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_divergences_keep_the_documented_bounds(temperature):
    """Data-processing inequality: every f-divergence on the buckets is <= on the full vocabulary;
    AKL on the buckets is <= max(FKL, RKL) on the full vocabulary."""
    pb = _problem(n=40, v=50, seed=7)
    zs, zt = F.linear(pb["h"], pb["w"], pb["b"]).detach(), F.linear(pb["th"], pb["tw"])
    for k in (1, 4, 20):
        cached = teacher_top_k(zt, None, None, k=k, temperatures=[temperature])
        kw = dict(temperature=temperature, alpha=1.0, normalizer=1.0, teacher_topk=cached)
        for name in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "gjsd"):
            bucket = dense_kd_loss(zs, None, pb["targets"], divergence=name, **kw).divergence_sum
            full = _full_divergence(name, zs, zt, temperature).sum()
            assert 0 <= bucket <= full + 1e-12, (name, k)
            assert bucket < full  # strictly: these distributions differ inside the tail
        akl = dense_kd_loss(zs, None, pb["targets"], divergence="akl", **kw).divergence_sum
        bound = torch.maximum(_full_divergence("fkl", zs, zt, temperature),
                              _full_divergence("rkl", zs, zt, temperature)).sum()
        assert akl <= bound + 1e-12


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "akl"])
def test_masked_positions_are_not_targets(name):
    """A [B, L] batch with prompt and padding positions labelled -100: the cached loss over the
    selected positions equals the reference over exactly those positions."""
    g = torch.Generator().manual_seed(11)
    b, length, h, v = 3, 7, 5, 12
    s_hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(b, length, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :3] = labels[1, :5] = labels[2, 5:] = -100  # prompts and right padding
    sel, targets = select_response_tokens(s_hidden, labels)
    t_sel, _ = select_response_tokens(t_logits, labels)
    assert sel.shape[0] == 4 + 2 + 4  # positions whose next label is a target
    cached = teacher_top_k(t_sel, None, None, k=4, temperatures=[2.0])
    out = fused_kd_loss(sel, w, None, None, None, None, targets, divergence=name, temperature=2.0, alpha=0.5,
                        normalizer=float(sel.shape[0]), teacher_topk=cached)
    ref, _ = _naive_bucket_loss(F.linear(sel, w), t_sel, targets, 4, name, 2.0, 0.5, float(sel.shape[0]))
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-12)
    got, = torch.autograd.grad(out.loss, [s_hidden], retain_graph=True)  # sel is shared with ref
    want, = torch.autograd.grad(ref, [s_hidden])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    next_is_target = torch.zeros(b, length, dtype=torch.bool)
    next_is_target[:, :-1] = labels[:, 1:] != -100
    assert got[~next_is_target].abs().max() == 0  # masked positions get no gradient


@pytest.mark.parametrize("name", DIVS)
def test_masked_vocabulary_entries_never_give_nan(name):
    """-inf logits: teacher entries inside and outside the top k, and a student whose whole tail is
    masked; values and gradients stay finite."""
    n, v = 4, 10
    g = torch.Generator().manual_seed(5)
    zt = torch.randn(n, v, generator=g)
    zt[:, 7:] = float("-inf")          # masked teacher entries (in the top k of row 0 when k > 7)
    zs = torch.randn(n, v, generator=g).requires_grad_(True)
    for k in (3, 8):
        cached = teacher_top_k(zt, None, None, k=k, temperatures=[1.0, 2.0])
        tail = torch.ones(n, v, dtype=torch.bool).scatter(-1, cached.token_ids, False)
        for temperature in (1.0, 2.0):
            s = zs.masked_fill(tail, float("-inf"))  # the student's whole tail is -inf
            out = chunked_kd_loss_from_logits(s, None, cached.token_ids[:, 0], divergence=name,
                                              temperature=temperature, alpha=0.5, normalizer=1.0,
                                              teacher_topk=cached)
            grad, = torch.autograd.grad(out.loss, [zs])
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (k, temperature)


def test_low_precision_storage_stays_close():
    pb = _problem(n=30, v=40, seed=9)
    zt = F.linear(pb["th"], pb["tw"]).float()
    zs = F.linear(pb["h"], pb["w"], pb["b"]).detach().float()
    full = teacher_top_k(zt, None, None, k=8, temperatures=[1.0])
    kw = dict(divergence="fkl", temperature=1.0, alpha=1.0, normalizer=30.0)
    ref = dense_kd_loss(zs, None, pb["targets"], teacher_topk=full, **kw).loss
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        low = TopKTeacher(full.token_ids, full.logits.to(dtype), full.tail_lse, full.temperatures)
        got = dense_kd_loss(zs, None, pb["targets"], teacher_topk=low, **kw).loss
        assert abs(float(got - ref)) <= tol * float(ref)


def test_argument_errors():
    pb = _problem(seed=1)
    cached = teacher_top_k(pb["th"], pb["tw"], None, k=3, temperatures=[1.0])
    common = dict(divergence="fkl", alpha=0.5, normalizer=1.0)
    with pytest.raises(ConfigError, match=r"temperatures \[1.0\] only.*T = 2.0"):
        fused_kd_loss(pb["h"], pb["w"], pb["b"], None, None, None, pb["targets"], teacher_topk=cached,
                      temperature=2.0, **common)
    with pytest.raises(ValueError, match="not both"):
        fused_kd_loss(pb["h"], pb["w"], pb["b"], pb["th"], pb["tw"], None, pb["targets"], teacher_topk=cached,
                      temperature=1.0, **common)
    with pytest.raises(ValueError, match="not both"):
        chunked_kd_loss_from_logits(pb["h"] @ pb["w"].T, pb["th"] @ pb["tw"].T, pb["targets"],
                                    teacher_topk=cached, temperature=1.0, **common)
    with pytest.raises(ValueError, match=r"one row per selected token"):
        fused_kd_loss(pb["h"][:5], pb["w"], pb["b"], None, None, None, pb["targets"][:5], teacher_topk=cached,
                      temperature=1.0, **common)
    wide = teacher_top_k(torch.randn(9, 30, dtype=torch.float64), None, None, k=3, temperatures=[1.0])
    with pytest.raises(ValueError, match=r"vocabulary \[0, 17\)"):
        fused_kd_loss(pb["h"], pb["w"], pb["b"], None, None, None, pb["targets"],
                      teacher_topk=TopKTeacher(wide.token_ids + 20, wide.logits, wide.tail_lse, (1.0,)),
                      temperature=1.0, **common)
    with pytest.raises(ConfigError, match="temperatures > 0"):
        teacher_top_k(pb["th"], pb["tw"], None, k=3, temperatures=[0.0])
    with pytest.raises(ConfigError, match="positive int"):
        teacher_top_k(pb["th"], pb["tw"], None, k=0, temperatures=[1.0])
    # alpha = 0: the cached teacher is not needed and not checked
    out = fused_kd_loss(pb["h"], pb["w"], pb["b"], None, None, None, pb["targets"], teacher_topk=cached,
                        divergence=make_divergence("fkl"), temperature=3.0, alpha=0.0, normalizer=1.0)
    assert float(out.divergence_sum) == 0.0
