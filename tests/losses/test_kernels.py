"""The divergence kernels (pocl.losses.kernels) against the registry's reference functions, and the
engine that uses them against the dense autograd reference."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pocl.losses import DIVERGENCES, dense_kd_loss, fused_kd_loss, make_divergence
from pocl.losses import kernels as K
from pocl.losses.engine import chunked_kd_loss_from_logits
from pocl.losses.kernels import divergence_kernel, has_kernel, run_kernel

# Every kernelised divergence, with parameters inside their range and at the ends that reduce.
CASES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"lam": 0.9}), ("jsd", {"lam": 0.5}), ("jsd", {"lam": 1.0}),
         ("gjsd", {"beta": 0.5}), ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 1.0}), ("skl", {"skew": 0.1}),
         ("skl", {"skew": 0.0}), ("srkl", {"skew": 0.1}), ("srkl", {"skew": 1.0}),
         ("taid", {"t": 0.4}), ("taid", {"t": 0.0}), ("taid", {"t": 1.0})]
IDS = [f"{n}{''.join(f'-{k}{v}' for k, v in p.items())}" for n, p in CASES]
# (rtol, atol) of the kernel against the float64 reference on the same inputs; the math is float32.
TOL = {torch.float32: (1e-4, 2e-6), torch.bfloat16: (1e-4, 2e-6)}



def logits(n, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def reference(div, s, t, temperature):
    """Value and autograd gradient of the registry function, float64, on the same (upcast) inputs."""
    leaf = s.detach().double().requires_grad_(True)
    with torch.enable_grad():
        d = div(torch.log_softmax(leaf / temperature, -1), torch.log_softmax(t.double() / temperature, -1))
        (grad,) = torch.autograd.grad(d.sum(), [leaf])
    return d.detach(), grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_kernel_matches_reference(name, params, temperature, dtype, compiled):
    div = make_divergence(name, **params)
    assert has_kernel(div)
    s, t = logits(37, 1000, dtype, 0), logits(37, 1000, dtype, 1)
    value, grad = divergence_kernel(div, s, t, temperature, compiled=compiled)
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    assert value.shape == (37,) and grad.shape == (37, 1000)
    ref_value, ref_grad = reference(div, s, t, temperature)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=atol * 100)
    if name == "tvd":
        # |p − q| is not differentiable at p = q: where float32 cannot tell the sign of p − q, the two
        # gradients legitimately differ in that row (the entry, and Σ sign·q); compare the other rows.
        p = torch.softmax(t.double() / temperature, -1)
        q = torch.softmax(s.double() / temperature, -1)
        sure = ((p - q).abs() > 1e-4 * (p + q)).all(-1)
        assert sure.sum() >= len(sure) // 2
        grad, ref_grad = grad.double()[sure], ref_grad[sure]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_compiled_equals_eager(name, params):
    div = make_divergence(name, **params)
    for n in (64, 29):  # a second, smaller chunk (the last chunk of a loss call) reuses the graph
        s, t = logits(n, 1000, torch.float32, 2), logits(n, 1000, torch.float32, 3)
        eager = divergence_kernel(div, s, t, 2.0, compiled=False)
        comp = divergence_kernel(div, s, t, 2.0, compiled=True)
        for a, b in zip(eager, comp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_divergence_of_a_distribution_with_itself_is_zero(name, params, compiled):
    div = make_divergence(name, **params)
    s = logits(16, 1000, torch.float32, 4)
    for temperature in (1.0, 2.0):
        value, grad = divergence_kernel(div, s, s.clone(), temperature, compiled=compiled)
        torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


def test_no_teacher_is_zero():
    value, grad = divergence_kernel(make_divergence("fkl"), logits(3, 11, torch.float32, 0), None, 1.0)
    assert not value.any() and not grad.any()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_masked_entries_match_reference_without_nan(name, params, compiled):
    div = make_divergence(name, **params)
    s, t = logits(8, 50, torch.float32, 5), logits(8, 50, torch.float32, 6)
    s[:, :5] = float("-inf")       # masked in both
    t[:, :5] = float("-inf")
    t[:2, 10:13] = float("-inf")   # only the teacher
    s[2:4, 20:23] = float("-inf")  # only the student (KL(p||q) is large and finite via the floor)
    value, grad = divergence_kernel(div, s, t, 1.0, compiled=compiled)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    ref_value, ref_grad = reference(div, s, t, 1.0)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def test_large_vocabulary_chunk():
    div = make_divergence("jsd", lam=0.9)
    s, t = logits(64, 32000, torch.float32, 7), logits(64, 32000, torch.float32, 8)
    value, grad = divergence_kernel(div, s, t, 2.0, compiled=True)
    ref_value, ref_grad = reference(div, s, t, 2.0)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_shape_mismatch_is_an_error_not_a_compile_failure():
    with pytest.raises(ValueError, match="one \\[n, V\\] shape"):
        run_kernel("fkl", torch.zeros(2, 3), torch.zeros(2, 4), 1.0, compiled=True)
    assert K._compile_failure is None


def test_divergences_without_a_kernel():
    assert not has_kernel(make_divergence("akl"))
    assert not has_kernel(None)
    assert has_kernel(make_divergence("forward_kl"))  # aliases are the same function
    with pytest.raises(ValueError, match="no kernel"):
        divergence_kernel(make_divergence("akl"), torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
    # AKL keeps the autograd path (its head/tail weights depend on a sorted split of the vocabulary)
    assert {name for name in DIVERGENCES.names() if not has_kernel(make_divergence(name))} == {"akl"}


# ------------------------------------------------------------------------------------------
# Settings and the compile fallback
# ------------------------------------------------------------------------------------------

def test_compile_mode_setting(monkeypatch):
    for raw, mode in (("", "auto"), ("auto", "auto"), ("1", "compiled"), ("0", "eager"), ("eager", "eager")):
        monkeypatch.setenv(K.COMPILE_ENV, raw)
        assert K.compile_mode() == mode
    monkeypatch.setenv(K.COMPILE_ENV, "0")
    assert not K._use_compiled(torch.device("cpu"), torch.float32)
    monkeypatch.setenv(K.COMPILE_ENV, "auto")
    assert K._use_compiled(torch.device("cpu"), torch.float32) == (K._compile_failure is None)
    assert not K._use_compiled(torch.device("cpu"), torch.float64)
    monkeypatch.setenv(K.COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match=K.COMPILE_ENV):
        K.compile_mode()


def test_cache_dir_respects_the_user(monkeypatch, tmp_path):
    # The user's TORCHINDUCTOR_CACHE_DIR as it was when pocl was imported (torch sets the variable itself
    # to its /tmp default once anything compiles, so a later value is not the user's).
    monkeypatch.setattr(K, "_USER_CACHE_DIR", str(tmp_path))
    assert K.kernel_cache_dir() == tmp_path
    monkeypatch.setattr(K, "_USER_CACHE_DIR", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_someone")  # torch's own default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert K.kernel_cache_dir() == tmp_path / "xdg" / "pocl" / "inductor"


def test_compiled_kernels_are_cached_under_pocls_folder(tmp_path):
    """In a fresh process (the user set no TORCHINDUCTOR_CACHE_DIR) the compiled code lands in
    $XDG_CACHE_HOME/pocl/inductor, so the next process reuses it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), POCL_COMPILE_KERNELS="1")
    code = ("import torch; from pocl.losses.kernels import run_kernel; "
            "run_kernel('rkl', torch.randn(4, 50), torch.randn(4, 50), 1.0)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert any((tmp_path / "pocl" / "inductor").rglob("*.py"))


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(K, "_compiled", {})
    monkeypatch.setattr(K, "_compile_failure", None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    s, t = logits(4, 20, torch.float32, 0), logits(4, 20, torch.float32, 1)
    eager = run_kernel("fkl", s, t, 1.0, compiled=False)
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        for _ in range(3):
            out = run_kernel("fkl", s, t, 1.0, compiled=True)
            torch.testing.assert_close(out, eager)
    warnings = [r for r in caplog.records if r.name == K.__name__]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert K._compile_failure is not None and not K._use_compiled(torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------
# The engine with kernels == the dense autograd reference, for every divergence
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 1.0), (2.0, 0.3)])
@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_fused_and_chunked_equal_dense(name, temperature, alpha):
    g = torch.Generator().manual_seed(11)
    n, h, v = 23, 16, 1000
    hidden = torch.randn(n, h, generator=g).requires_grad_(True)
    weight = (torch.randn(v + 3, h, generator=g) * 0.5).requires_grad_(True)  # 3 padded rows
    bias = (torch.randn(v + 3, generator=g) * 0.1).requires_grad_(True)
    t_hidden, t_weight = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g) * 0.5
    t_bias = torch.randn(v, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)
    opts = {"divergence": make_divergence(name), "temperature": temperature, "alpha": alpha, "normalizer": 31.0,
            "vocab_size": v}
    leaves = (hidden, weight, bias)
    dense = dense_kd_loss(F.linear(hidden, weight, bias), F.linear(t_hidden, t_weight, t_bias), targets, **opts)
    ref_grads = torch.autograd.grad(dense.loss, leaves)
    for chunk in (5, 8, 23, 64):  # 5 and 8 do not divide 23
        fused = fused_kd_loss(hidden, weight, bias, t_hidden, t_weight, t_bias, targets, chunk_size=chunk, **opts)
        torch.testing.assert_close(fused.loss, dense.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.ce_sum, dense.ce_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.divergence_sum, dense.divergence_sum, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(fused.loss, leaves), ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    s_logits = F.linear(hidden, weight, bias).detach().requires_grad_(True)
    chunked = chunked_kd_loss_from_logits(s_logits, F.linear(t_hidden, t_weight, t_bias), targets, chunk_size=7,
                                          **opts)
    dense_l = dense_kd_loss(s_logits, F.linear(t_hidden, t_weight, t_bias), targets, **opts)
    torch.testing.assert_close(chunked.loss, dense_l.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(chunked.loss, [s_logits])[0],
                               torch.autograd.grad(dense_l.loss, [s_logits])[0], rtol=1e-4, atol=1e-7)


def test_fused_bf16_head_uses_the_kernel_and_stays_close():
    g = torch.Generator().manual_seed(12)
    n, h, v = 19, 16, 1000
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    t_hidden, t_weight = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    opts = {"divergence": make_divergence("jsd"), "temperature": 2.0, "alpha": 0.7, "normalizer": float(n)}
    fused = fused_kd_loss(hidden, weight, None, t_hidden, t_weight, None, targets, chunk_size=8, **opts)
    dense = dense_kd_loss(F.linear(hidden, weight), F.linear(t_hidden, t_weight), targets, **opts)
    torch.testing.assert_close(fused.loss.float(), dense.loss.float(), rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(fused.loss, [hidden, weight])
    want = torch.autograd.grad(dense.loss, [hidden, weight])
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("temperature,ce_weight,div_weight",
                         [(1.0, 0.3, 0.7), (1.0, 0.0, 1.0), (2.0, 0.0, 1.0), (2.0, 0.5, 0.0)])
@pytest.mark.parametrize("name,params", [("fkl", {}), ("jsd", {"lam": 0.9}), ("srkl", {"skew": 0.1}), (None, {})],
                         ids=["fkl", "jsd", "srkl", "ce-only"])
def test_chunk_terms_match_autograd_of_ce_plus_divergence(name, params, temperature, ce_weight, div_weight, compiled):
    """The whole per-chunk kernel (CE at T = 1, D at T and the weighted gradient) against autograd of
    ce_weight * sum(CE) + div_weight * sum(D) in float64."""
    div = None if name is None else make_divergence(name, **params)
    s, t = logits(9, 257, torch.float32, 5), logits(9, 257, torch.float32, 6)
    targets = torch.randint(0, 257, (9,), generator=torch.Generator().manual_seed(7))
    ce, d, grad = K.chunk_terms(div, s, t, temperature, targets, ce_weight, div_weight, compiled=compiled)
    s64 = s.double().requires_grad_(True)
    ref_ce = F.cross_entropy(s64, targets, reduction="none")
    total = ce_weight * ref_ce.sum()
    if div is not None:
        ref_d = div(torch.log_softmax(s64 / temperature, -1), torch.log_softmax(t.double() / temperature, -1))
        total = total + div_weight * ref_d.sum()
        torch.testing.assert_close(d.double(), ref_d.detach(), rtol=1e-4, atol=2e-6)
    else:
        assert d is None
    (ref_grad,) = torch.autograd.grad(total, s64)
    torch.testing.assert_close(ce.double(), ref_ce.detach(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16-params", "bf16-autocast"])
def test_written_out_linear_backward_equals_autograd(precision):
    """The kernel path with a plain head writes the head's backward out (addmm into the weight gradient);
    an identity logit transform sends the same chunk through autograd instead. Both must agree, in fp32,
    with bf16 parameters and under CPU bf16 autocast (fp32 parameters, bf16 matrix products)."""
    g = torch.Generator().manual_seed(21)
    n, h, v = 37, 16, 700
    dtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.1).to(dtype)
    t_hidden, t_weight = torch.randn(n, 12, generator=g), torch.randn(v, 12, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    opts = {"divergence": make_divergence("srkl"), "temperature": 2.0, "alpha": 0.7, "normalizer": float(n),
            "chunk_size": 16}

    def run(logit_fn):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            out = fused_kd_loss(*leaves, t_hidden, t_weight, None, targets, student_logit_fn=logit_fn, **opts)
        return out.loss, torch.autograd.grad(out.loss, leaves)

    loss, grads = run(None)
    ref_loss, ref_grads = run(lambda x: x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == dtype
        # bf16: the same products in the same dtypes, so bit-equal; fp32: addmm_ may round differently.
        tol = {"rtol": 1e-5, "atol": 1e-7} if precision == "fp32" else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got, want, **tol)


def test_compiled_terms_run_in_row_blocks_without_recompiling(monkeypatch):
    """On CPU the compiled terms kernel runs over row blocks written into one gradient tensor: the values
    equal the one-call eager kernel's, a trailing 1-row block joins the previous one, and chunks of other
    sizes reuse the compiled graph (no recompilation during training)."""
    from torch._dynamo.utils import counters

    v = 257
    monkeypatch.setattr(K, "CPU_BLOCK_BYTES", 3 * 4 * v)  # 3 rows per block
    assert K._row_blocks(10, v) == [(0, 3), (3, 6), (6, 10)]
    assert K._row_blocks(2, v) == [(0, 2)]
    div = make_divergence("jsd", lam=0.9)
    s, t = logits(23, v, torch.float32, 8), logits(23, v, torch.float32, 9)
    targets = torch.randint(0, v, (23,), generator=torch.Generator().manual_seed(10))
    for n, temperature, ce_weight in [(23, 1.0, 0.0), (10, 1.0, 0.0), (7, 1.0, 0.0), (11, 2.0, 0.4)]:
        got = K.chunk_terms(div, s[:n], t[:n], temperature, targets[:n], ce_weight, 0.6, compiled=True)
        want = K.chunk_terms(div, s[:n], t[:n], temperature, targets[:n], ce_weight, 0.6, compiled=False)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if n == 23:
            graphs = counters["stats"]["unique_graphs"]
        elif n == 7:
            # 10 and 7 rows (blocks of 3 and 4 rows, views of other bases) reused the graph compiled for 23.
            assert counters["stats"]["unique_graphs"] == graphs
