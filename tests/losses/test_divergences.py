"""Divergence functions and their registry.

Every registered divergence is checked against a naive float64 reference written here from
explicit probabilities (torch.softmax, mixtures of probabilities, plain logs), independently of
the log-space implementation in pocl.losses.divergences.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pocl.losses.divergences as divmod_
from pocl.errors import ConfigError, PoclError, UnknownNameError
from pocl.losses import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    Divergence,
    DivergenceSpec,
    make_divergence,
    register_divergence,
)
from pocl.registry import Registry


# ------------------------------------------------------------------------------------------
# Independent references: p = teacher, q = student, explicit probabilities, float64.
# ------------------------------------------------------------------------------------------


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def ref_fkl(p, q):
    return _kl(p, q)


def ref_rkl(p, q):
    return _kl(q, p)


def ref_jsd(p, q, lam=0.9):
    m = (1 - lam) * p + lam * q
    return lam * _kl(q, m) + (1 - lam) * _kl(p, m)


def ref_tvd(p, q):
    return 0.5 * (p - q).abs().sum(-1)


def ref_skl(p, q, skew=0.1):
    return _kl(p, skew * p + (1 - skew) * q)


def ref_srkl(p, q, skew=0.1):
    return _kl(q, (1 - skew) * p + skew * q)


def ref_gjsd(p, q, beta=0.5):
    # TRL's generalized_jsd_loss: KL(p||q) at beta = 0, KL(q||p) at beta = 1.
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def ref_akl(p, q, mu=0.5):
    # Wu et al. 2024, row by row: sort the teacher's probabilities (descending); the head is the top
    # tokens up to and including the one where the cumulative probability reaches mu; the gaps
    # sum |p - q| over head and tail are constants (no gradient).
    out = []
    for pr, qr in zip(p, q):
        pd, qd = pr.detach().tolist(), qr.detach().tolist()
        order = sorted(range(len(pd)), key=lambda v: (-pd[v], v))
        head, mass = set(), 0.0
        for v in order:
            if mass < mu:
                head.add(v)
            mass += pd[v]
        gaps = [abs(pd[v] - qd[v]) for v in range(len(pd))]
        g_head = sum(gaps[v] for v in head)
        g_tail = sum(gaps) - g_head
        w = 0.5 if g_head + g_tail == 0 else g_head / (g_head + g_tail)
        out.append(w * _kl(pr, qr) + (1 - w) * _kl(qr, pr))
    return torch.stack(out)


def ref_taid(p, q, t=0.4):
    # TAID (Shing et al. 2025): the target q^(1-t) p^t, normalised, with q detached (stopgrad), and
    # KL(target || q); p = 0 stays 0 in the target.
    target = q.detach() ** (1 - t) * p ** t
    target = target / target.sum(-1, keepdim=True)
    return _kl(target, q)


REFERENCES = {"fkl": ref_fkl, "rkl": ref_rkl, "jsd": ref_jsd, "tvd": ref_tvd,
              "skl": ref_skl, "srkl": ref_srkl, "gjsd": ref_gjsd, "akl": ref_akl, "taid": ref_taid}

# (name, params) cases: every registered divergence with its defaults, plus other parameters.
CASES = [(name, {}) for name in DIVERGENCES.names()] + [
    ("jsd", {"lam": 0.5}), ("jsd", {"lam": 0.1}),
    ("skl", {"skew": 0.5}), ("srkl", {"skew": 0.5}),
    ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 1.0}), ("gjsd", {"beta": 0.9}),
    ("akl", {"mu": 0.2}), ("akl", {"mu": 0.9}),
    ("taid", {"t": 0.0}), ("taid", {"t": 0.8}), ("taid", {"t": 1.0}),
]
CASE_IDS = [f"{n}-{p}" if p else n for n, p in CASES]


def _logits(n: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def _reference(name, zs, zt, temperature, params):
    """Reference value per row from float64 logits (differentiable w.r.t. zs)."""
    p = torch.softmax(zt.double() / temperature, dim=-1)
    q = torch.softmax(zs.double() / temperature, dim=-1)
    return REFERENCES[name](p, q, **params)


def _implementation(div, zs, zt, temperature):
    """Our divergence on float32 log-probabilities, as the engine calls it."""
    s = torch.log_softmax(zs.float() / temperature, dim=-1)
    t = torch.log_softmax(zt.float() / temperature, dim=-1)
    return div(s, t)


def test_every_registered_divergence_has_a_reference():
    # Adding a divergence to the registry requires adding its reference above.
    assert set(DIVERGENCES.names()) == set(REFERENCES)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n,v", [(1, 5), (7, 50), (33, 257)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_reference_values_and_gradients(name, params, n, v, temperature):
    div = make_divergence(name, **params)
    zs = _logits(n, v, seed=n * 1000 + v)
    zt = _logits(n, v, seed=n * 1000 + v + 1)
    row_weights = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    zs_ref = zs.clone().requires_grad_(True)
    ref = _reference(name, zs_ref, zt, temperature, {**div.spec.defaults, **params})
    (ref_grad,) = torch.autograd.grad((ref * row_weights).sum(), zs_ref)

    zs_ours = zs.float().requires_grad_(True)
    ours = _implementation(div, zs_ours, zt, temperature)
    assert ours.shape == (n,)
    assert ours.dtype == torch.float32
    (our_grad,) = torch.autograd.grad((ours * row_weights.float()).sum(), zs_ours)

    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(our_grad.double(), ref_grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_divergence_of_a_distribution_from_itself_is_zero(name, params):
    div = make_divergence(name, **params)
    z = _logits(16, 100, seed=3)
    value = _implementation(div, z, z, 1.0)
    assert value.abs().max().item() <= 1e-6


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_divergence_is_nonnegative(name, params, scale):
    div = make_divergence(name, **params)
    value = _implementation(div, _logits(64, 50, 11, scale), _logits(64, 50, 12, scale), 1.0)
    assert value.min().item() >= -1e-6
    if name == "taid" and params.get("t") == 0.0:  # at t = 0 TAID's target is the student itself: D = 0
        assert value.abs().max().item() <= 1e-6
    else:
        assert value.max().item() > 0


def test_forward_and_reverse_kl_match_torch_kl_div():
    s = torch.log_softmax(_logits(9, 40, 1).float(), -1)
    t = torch.log_softmax(_logits(9, 40, 2).float(), -1)
    fkl = make_divergence("fkl")(s, t)
    rkl = make_divergence("rkl")(s, t)
    torch.testing.assert_close(
        fkl, F.kl_div(s, t, log_target=True, reduction="none").sum(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        rkl, F.kl_div(t, s, log_target=True, reduction="none").sum(-1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(fkl, rkl)


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.9])
def test_jsd_swap_relation_and_entropy_bound(lam):
    s = torch.log_softmax(_logits(12, 30, 4).float(), -1)
    t = torch.log_softmax(_logits(12, 30, 5).float(), -1)
    jsd = make_divergence("jsd", lam=lam)(s, t)
    swapped = make_divergence("jsd", lam=1 - lam)(t, s)
    # JSD_lam(p, q) = JSD_{1-lam}(q, p): the mixture and both weighted terms coincide.
    torch.testing.assert_close(jsd, swapped, rtol=1e-5, atol=1e-7)
    # A lam-weighted JSD is at most the binary entropy H(lam) (in nats).
    bound = -lam * math.log(lam) - (1 - lam) * math.log(1 - lam)
    assert jsd.max().item() <= bound + 1e-6
    if lam == 0.5:
        torch.testing.assert_close(jsd, make_divergence("jsd", lam=0.5)(t, s))


def test_mathematical_limits():
    s = torch.log_softmax(_logits(10, 20, 6).float(), -1)
    t = torch.log_softmax(_logits(10, 20, 7).float(), -1)
    fkl = make_divergence("fkl")(s, t)
    rkl = make_divergence("rkl")(s, t)
    torch.testing.assert_close(make_divergence("skl", skew=0.0)(s, t), fkl)
    torch.testing.assert_close(make_divergence("srkl", skew=0.0)(s, t), rkl)
    for name, key in (("skl", "skew"), ("srkl", "skew")):
        assert make_divergence(name, **{key: 1.0})(s, t).abs().max() <= 1e-6
    for lam in (0.0, 1.0):
        assert make_divergence("jsd", lam=lam)(s, t).abs().max() <= 1e-6
    # Skewing towards the reference distribution can only shrink the KL.
    assert (make_divergence("skl", skew=0.3)(s, t) <= fkl + 1e-6).all()
    tvd = make_divergence("tvd")(s, t)
    assert ((tvd >= 0) & (tvd <= 1 + 1e-6)).all()
    torch.testing.assert_close(tvd, make_divergence("tvd")(t, s))


def test_gjsd_end_points_are_trl_s_kl_limits():
    s = torch.log_softmax(_logits(10, 20, 8).float(), -1)
    t = torch.log_softmax(_logits(10, 20, 9).float(), -1)
    fkl, rkl = make_divergence("fkl")(s, t), make_divergence("rkl")(s, t)
    # Exactly the KLs at the end points, as TRL's generalized_jsd_loss.
    assert torch.equal(make_divergence("gjsd", beta=0.0)(s, t), fkl)
    assert torch.equal(make_divergence("gjsd", beta=1.0)(s, t), rkl)
    # Inside, gjsd(beta) is jsd(lam = 1 - beta) (two conventions of one divergence).
    for beta in (0.1, 0.5, 0.9):
        torch.testing.assert_close(make_divergence("gjsd", beta=beta)(s, t),
                                   make_divergence("jsd", lam=1 - beta)(s, t), rtol=1e-5, atol=1e-7)


def test_gjsd_tends_to_the_kls_when_scaled_by_beta_one_minus_beta():
    """JSD_b -> 0 at both ends, but JSD_b / (b (1 - b)) -> KL(p||q) as b -> 0 and KL(q||p) as b -> 1
    (docs/losses.md derives it: JSD_b = b KL(p||q) + O(b^2)); checked in float64 on the formula."""
    zs, zt = _logits(6, 12, 10, scale=1.0), _logits(6, 12, 11, scale=1.0)
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    fkl, rkl = make_divergence("fkl")(s, t), make_divergence("rkl")(s, t)
    errors_0, errors_1 = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        for beta, limit, errors in ((eps, fkl, errors_0), (1 - eps, rkl, errors_1)):
            jsd = make_divergence("gjsd", beta=beta)(s, t)
            assert jsd.abs().max() < 2 * eps * limit.max()  # the unscaled divergence vanishes
            errors.append(((jsd / (beta * (1 - beta)) - limit).abs() / limit).max().item())
    for errors in (errors_0, errors_1):
        assert errors[-1] < 2e-3  # close to the limit ...
        assert errors[0] > errors[1] > errors[2]  # ... and getting closer, about linearly in eps
        assert errors[0] / errors[2] > 30


def test_akl_weights_by_head_and_tail_gap():
    # Teacher 0.6 / 0.3 / 0.1, mu = 0.5: the head is the first token only (0.6 >= 0.5).
    p = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.3, 0.3]], dtype=torch.float64)
    s, t = q.log(), p.log()
    g_head, g_tail = 0.2, 0.2
    fkl, rkl = ref_fkl(p, q), ref_rkl(p, q)
    expected = g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl
    torch.testing.assert_close(make_divergence("akl")(s, t), expected)
    # mu = 0.7: the first two tokens (0.6 < 0.7, then 0.9 >= 0.7); the gap of the second is 0.
    torch.testing.assert_close(make_divergence("akl", mu=0.7)(s, t), 0.5 * fkl + 0.5 * rkl)
    # mu = 0.95: head = all three: pure forward KL; mu = 0: no head: pure reverse KL.
    torch.testing.assert_close(make_divergence("akl", mu=0.95)(s, t), fkl)
    torch.testing.assert_close(make_divergence("akl", mu=0.0)(s, t), rkl)


def test_akl_weights_carry_no_gradient():
    zs = _logits(5, 9, 12).requires_grad_(True)
    zt = _logits(5, 9, 13)
    s, t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    value = make_divergence("akl")(s, t)
    (grad,) = torch.autograd.grad(value.sum(), zs)
    # Same gradient as the weighted sum with the weights frozen at their values.
    s = torch.log_softmax(zs, -1)
    fkl, rkl = make_divergence("fkl")(s, t), make_divergence("rkl")(s, t)
    with torch.no_grad():
        w = (value - rkl) / (fkl - rkl)
    (expected,) = torch.autograd.grad((w * fkl + (1 - w) * rkl).sum(), zs)
    torch.testing.assert_close(grad, expected)


# ------------------------------------------------------------------------------------------
# Numerics: -inf entries and the floor
# ------------------------------------------------------------------------------------------

def _masked_case(kind: str):
    """Student and teacher logits (float32, 6 x 12) with -inf entries of the given kind."""
    zs = _logits(6, 12, 20).float()
    zt = _logits(6, 12, 21).float()
    if kind in ("both", "teacher"):
        zt[:, 3:6] = float("-inf")
    if kind in ("both", "student"):
        zs[:, 3:6] = float("-inf")
    if kind == "ragged":  # different masked entries per row and per model
        zt[0, 0] = zt[1, 5] = zt[2, :11] = float("-inf")
        zs[1, 5] = zs[3, 7] = zs[2, 11] = float("-inf")
    return zs, zt


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", ["both", "teacher", "student", "ragged"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_minus_inf_entries_give_finite_values_and_gradients(name, params, kind, temperature):
    div = make_divergence(name, **params)
    zs, zt = _masked_case(kind)
    zs = zs.requires_grad_(True)
    value = _implementation(div, zs, zt, temperature)
    (grad,) = torch.autograd.grad(value.sum(), zs)
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(grad).all(), grad
    assert value.min().item() >= -1e-6
    if kind == "both":
        # Entries masked in both contribute exactly nothing: the value equals the divergence
        # over the unmasked sub-vocabulary, and the masked logits get zero gradient.
        keep = torch.ones(12, dtype=torch.bool)
        keep[3:6] = False
        sub = _reference(name, zs.detach()[:, keep], zt[:, keep], temperature,
                         {**div.spec.defaults, **params})
        torch.testing.assert_close(value.detach().double(), sub, rtol=1e-4, atol=2e-6)
        assert (grad[:, 3:6] == 0).all()


def test_student_minus_inf_where_teacher_has_mass_uses_the_floor():
    # KL(p||q) is infinite here; we document the clamp of log q at LOG_PROB_FLOOR.
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    s = torch.tensor([[0.0, float("-inf")]])
    value = make_divergence("fkl")(s, t)
    expected = 0.5 * (math.log(0.5) - 0.0) + 0.5 * (math.log(0.5) - LOG_PROB_FLOOR)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert LOG_PROB_FLOOR == -1e4


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_extreme_logits_stay_finite(name):
    zs = (_logits(8, 64, 30) * 1e4).float().requires_grad_(True)
    zt = (_logits(8, 64, 31) * 1e4).float()
    value = _implementation(make_divergence(name), zs, zt, 1.0)
    (grad,) = torch.autograd.grad(value.sum(), zs)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


_finite_or_masked = st.one_of(st.floats(-50, 50, allow_nan=False), st.just(float("-inf")))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_finite_or_masked, _finite_or_masked), min_size=2, max_size=16),
       st.sampled_from(DIVERGENCES.names()))
def test_property_finite_and_nonnegative(pairs, name):
    zs = torch.tensor([[a for a, _ in pairs]], dtype=torch.float32)
    zt = torch.tensor([[b for _, b in pairs]], dtype=torch.float32)
    # Each distribution needs at least one finite logit to be a distribution at all.
    zs[0, 0] = 0.0 if torch.isinf(zs).all() else zs[0, 0]
    zt[0, 0] = 0.0 if torch.isinf(zt).all() else zt[0, 0]
    zs.requires_grad_(True)
    value = _implementation(make_divergence(name), zs, zt, 1.0)
    (grad,) = torch.autograd.grad(value.sum(), zs)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert value.item() >= -1e-5


# ------------------------------------------------------------------------------------------
# Registry and parameters
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias,canonical", [
    ("fkl", "fkl"), ("forward_kl", "fkl"), ("kl", "fkl"), ("KL", "fkl"),
    ("rkl", "rkl"), ("reverse_kl", "rkl"), ("jsd", "jsd"), ("tvd", "tvd"),
    ("skl", "skl"), ("sfkl", "skl"), ("skew_kl", "skl"),
    ("srkl", "srkl"), ("skew_reverse_kl", "srkl"),
    ("gjsd", "gjsd"), ("generalized_jsd", "gjsd"), ("akl", "akl"), ("adaptive_kl", "akl"),
])
def test_exact_and_alias_lookup(alias, canonical):
    assert DIVERGENCES.get(alias).name == canonical
    assert make_divergence(alias).name == canonical


def test_no_substring_matching():
    # "kl" is an alias of fkl, never a substring match of "skl"/"srkl"; "sk" matches nothing.
    assert make_divergence("kl").name == "fkl"
    assert make_divergence("skl").name == "skl"
    for name in ("sk", "k", "kld", "js"):
        with pytest.raises(UnknownNameError):
            make_divergence(name)


def test_typo_suggests_the_nearest_name():
    with pytest.raises(UnknownNameError) as info:
        make_divergence("jds")
    assert "did you mean 'jsd'" in str(info.value)
    assert isinstance(info.value, PoclError)


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'beta'.*valid parameters: lam"):
        make_divergence("jsd", beta=0.5)
    with pytest.raises(ConfigError, match=r"'skew'.*valid parameters: none"):
        make_divergence("fkl", skew=0.1)
    with pytest.raises(ConfigError, match="did you mean 'skew'"):
        make_divergence("skl", skw=0.1)


@pytest.mark.parametrize("name,key,value", [
    ("jsd", "lam", 1.5), ("jsd", "lam", -0.01), ("skl", "skew", 1.01), ("srkl", "skew", -1.0),
    ("jsd", "lam", float("nan")), ("jsd", "lam", "0.5"), ("skl", "skew", True),
])
def test_invalid_parameter_values(name, key, value):
    with pytest.raises(ConfigError, match=key):
        make_divergence(name, **{key: value})


def test_bound_parameters_repr_and_equality():
    div = make_divergence("jsd", lam=0.5)
    assert isinstance(div, Divergence)
    assert div.params == {"lam": 0.5}
    assert repr(div) == "Divergence('jsd', lam=0.5)"
    assert repr(make_divergence("fkl")) == "Divergence('fkl')"
    assert make_divergence("jsd").params == {"lam": 0.9}
    assert make_divergence("skl").params == {"skew": 0.1}
    assert make_divergence("sfkl", skew=0.2) == make_divergence("skl", skew=0.2)
    assert make_divergence("jsd", lam=0.5) != make_divergence("jsd", lam=0.4)
    with pytest.raises(TypeError):
        div.spec.defaults["lam"] = 0.1  # specs are shared: read-only


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_registered_specs_are_complete(name):
    spec = DIVERGENCES.get(name)
    assert spec.name == name and spec.description and spec.formula
    for key, (low, high) in spec.bounds.items():
        assert low <= spec.defaults[key] <= high
    make_divergence(name, **spec.defaults)  # the defaults validate


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError):
        register_divergence(DivergenceSpec(name="fkl", fn=lambda s, t: s.sum(-1)))
    with pytest.raises(ValueError):
        register_divergence(DivergenceSpec(name="new_one", fn=lambda s, t: s.sum(-1),
                                           aliases=("kl",)))
    assert "new_one" not in DIVERGENCES.names()


def test_a_new_divergence_can_be_added(monkeypatch):
    # The extension path documented in docs/losses.md, on a private registry.
    monkeypatch.setattr(divmod_, "DIVERGENCES", Registry("divergence"))

    def scaled_fkl(student_logp, teacher_logp, *, weight=1.0):
        return weight * divmod_.forward_kl(student_logp, teacher_logp)

    register_divergence(DivergenceSpec(
        name="scaled_fkl", fn=scaled_fkl, defaults={"weight": 1.0},
        bounds={"weight": (0.0, 10.0)}, description="test", formula="w KL(p||q)"))
    s = torch.log_softmax(_logits(3, 8, 40).float(), -1)
    t = torch.log_softmax(_logits(3, 8, 41).float(), -1)
    div = make_divergence("scaled_fkl", weight=2.0)
    torch.testing.assert_close(div(s, t), 2 * divmod_.forward_kl(s, t))
    with pytest.raises(ConfigError):
        make_divergence("scaled_fkl", weight=11.0)
    with pytest.raises(ValueError):
        DivergenceSpec(name="bad", fn=scaled_fkl, bounds={"nope": (0.0, 1.0)})
