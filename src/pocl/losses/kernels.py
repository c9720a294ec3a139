"""Single-pass divergence kernels: the value AND the analytical gradient w.r.t. the student's logits.

The registry's functions in :mod:`pocl.losses.divergences` are the *definition* of every divergence;
the loss engine used to differentiate them with autograd on each ``[chunk, V]`` block, which
materialises many ``[n, V]`` temporaries (two log-softmaxes, exps, mixtures, the divergence) and then
autograd's backward through all of them. A kernel here computes, for one chunk,

    (student_logits [n, V], teacher_logits [n, V], temperature) -> (D [n], dD/d student_logits [n, V])

in one go with a closed-form gradient (no autograd graph), in float32 whatever the input dtype (float64
inputs stay float64). The tests (``tests/losses/test_kernels.py``) hold every kernel to the reference
function: value, and gradient against ``torch.autograd.grad`` of the reference.

Notation: z = logits / T, log q = log_softmax(z_student), log p = log_softmax(z_teacher); ``a`` and ``b``
are log q and log p clamped at :data:`~pocl.losses.divergences.LOG_PROB_FLOOR`, exactly as the
references clamp them. For any D(log q, log p), with g = ∂D/∂log q (elementwise),

    ∂D/∂z = g − q · Σ_v g,        ∂D/∂logits = (∂D/∂z) / T

(the log-softmax Jacobian). Per divergence (m is the mixture, L = log m in log space):

* fkl   D = Σ p (b − a);                   g = −p ⊙ [log q ≥ floor]      ->  ∂D/∂z = q Σ p' − p'
* rkl   D = Σ q (a − b);                   ∂D/∂z = q ⊙ (a − b − D)
* tvd   D = ½ Σ |p − q|;                   ∂D/∂z = ½ q ⊙ (s − Σ s q),  s = sign(q − p)
* jsd(λ) m = (1−λ) p + λ q, D = λ KL(q‖m) + (1−λ) KL(p‖m);
                                           g = λ q ⊙ (a − L)  ->  ∂D/∂z = λ q ⊙ (a − L − KL(q‖m))
  (the p-term's and the mixture's derivatives cancel: λ q (a − L) + λ q − r·m with r m = λ q).
  ``gjsd(β)`` is the same with λ = 1 − β (and fkl / rkl at β = 0 / 1, as its reference).
* skl(α) m = α p + (1−α) q, D = KL(p‖m);   g = −p ⊙ r,  r = (1−α) q / m   ->  ∂D/∂z = q Σ p r − p r
* srkl(α) m = (1−α) p + α q, D = KL(q‖m);  g = q ⊙ (a − L + 1 − r),  r = α q / m
                                           ->  ∂D/∂z = q ⊙ (a − L − D + Σ q r) − q r
  (using Σ q = 1).

Parameters at the ends of their range reduce as the references do (jsd λ ∈ {0, 1}, skl/srkl skew 1:
exactly 0; skew 0: fkl / rkl).

On CPU the kernels run under ``torch.compile`` (inductor, dynamic shapes, so a short last chunk does
not recompile) with a persistent compile cache; ``POCL_COMPILE_KERNELS`` (``auto`` | ``1`` | ``0``)
chooses: ``0`` forces the eager kernel, ``1`` compiles on every device, ``auto`` (the default) compiles
float32 math on CPU only. If compilation fails the eager kernel is used and ONE warning says why.
See docs/losses.md, "Divergence kernels".
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pocl.losses.divergences import (
    LOG_PROB_FLOOR,
    Divergence,
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

__all__ = [
    "COMPILE_ENV",
    "KERNELS",
    "chunk_terms",
    "compile_mode",
    "divergence_kernel",
    "has_kernel",
    "kernel_cache_dir",
    "run_kernel",
    "set_compile_mode",
]

log = logging.getLogger(__name__)

#: Environment variable that chooses compiled or eager kernels: ``auto`` (default), ``1``, ``0``.
COMPILE_ENV = "POCL_COMPILE_KERNELS"

# A raw kernel: (student_logits, teacher_logits, temperature [0-dim tensor], params tensor) -> (D, grad),
# all inputs already in the compute dtype. ``params`` is a 1-d tensor of constants (tensors, not Python
# floats, so that one compiled graph serves every temperature and parameter value).
RawKernel = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# The kernels (pure tensor code: eager as is, or compiled)
# --------------------------------------------------------------------------------------------
# A core: (log q [n, V], log p [n, V], params) -> (D [n], ∂D/∂z [n, V]), z = logits / T. The callers
# divide by T (the chain rule to the raw logits) and, in the terms kernels, scale by the loss weight.

def _fkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    p = b.exp()
    value = (p * (b - a)).sum(-1)
    # The clamp of log q passes no gradient below the floor (where q is exactly 0).
    pm = torch.where(lq >= LOG_PROB_FLOOR, p, torch.zeros_like(p))
    return value, lq.exp() * pm.sum(-1, keepdim=True) - pm


def _rkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    q = a.exp()
    diff = a - b
    value = (q * diff).sum(-1)
    return value, q * (diff - value.unsqueeze(-1))


def _tvd(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    p, q = lp.exp(), lq.exp()
    value = 0.5 * (p - q).abs().sum(-1)
    sign = torch.sign(q - p)
    return value, 0.5 * q * (sign - (sign * q).sum(-1, keepdim=True))


def _mixture_jsd(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log w_p, log w_q (mixture m = w_p p + w_q q), c_q, c_p (D = c_q KL(q‖m) + c_p KL(p‖m)),
    # with c_q = w_q and c_p = w_p (jsd: w_q = λ; gjsd: w_p = β).
    log_wp, log_wq, c_q, c_p = params[0], params[1], params[2], params[3]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(b + log_wp, a + log_wq)
    q = a.exp()
    a_m = a - log_m
    kl_q = (q * a_m).sum(-1)
    kl_p = (b.exp() * (b - log_m)).sum(-1)
    return c_q * kl_q + c_p * kl_p, c_q * q * (a_m - kl_q.unsqueeze(-1))


def _skew_fkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log α, log(1 − α); m = α p + (1 − α) q; D = KL(p‖m).
    log_wp, log_wq = params[0], params[1]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(b + log_wp, a + log_wq)
    p = b.exp()
    value = (p * (b - log_m)).sum(-1)
    pr = p * (a + log_wq - log_m).exp()          # p ⊙ r, r = (1 − α) q / m
    return value, lq.exp() * pr.sum(-1, keepdim=True) - pr


def _skew_rkl(lq: Tensor, lp: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    # params: log α, log(1 − α); m = (1 − α) p + α q; D = KL(q‖m).
    log_wq, log_wp = params[0], params[1]
    a, b = lq.clamp(min=LOG_PROB_FLOOR), lp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(a + log_wq, b + log_wp)
    q = a.exp()
    a_m = a - log_m
    value = (q * a_m).sum(-1)
    qr = q * (a + log_wq - log_m).exp()          # q ⊙ r, r = α q / m
    return value, q * (a_m - value.unsqueeze(-1) + qr.sum(-1, keepdim=True)) - qr


Core = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

#: The divergence cores by kernel name.
CORES: dict[str, Core] = {
    "fkl": _fkl, "rkl": _rkl, "tvd": _tvd, "jsd": _mixture_jsd, "skl": _skew_fkl, "srkl": _skew_rkl,
}


def _named(fn: Callable, name: str) -> Callable:
    # One code object per kernel: torch.compile keeps its compiled graphs (and counts recompilations
    # against its limit) per code object, and every closure made by one factory would otherwise share one.
    fn.__code__ = fn.__code__.replace(co_name=name)
    fn.__name__ = fn.__qualname__ = name
    return fn


def _raw(core: Core, name: str) -> RawKernel:
    """The divergence alone: (s, t, T, params) -> (D, ∂D/∂s)."""
    def raw(s: Tensor, t: Tensor, temperature: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        value, grad_z = core(torch.log_softmax(s / temperature, dim=-1),
                             torch.log_softmax(t / temperature, dim=-1), params)
        return value, grad_z / temperature
    return _named(raw, f"kernel_{name}")


#: The raw kernels by name.
KERNELS: dict[str, RawKernel] = {name: _raw(core, name) for name, core in CORES.items()}


# A chunk's terms: (student_logits, teacher_logits, temperature, params, targets [n] int64, weights [2])
# -> (CE [n], D [n], weights[0] * dCE/dlogits + weights[1] * dD/dlogits [n, V]).
TermsKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _terms(name: str, unit_temperature: bool, ce_gradient: bool) -> TermsKernel:
    """The divergence ``name`` ("zero": none) plus the cross-entropy at T = 1 and the weighted sum of both
    gradients, so that one compiled graph reads the chunk's logits once for everything (the loss engine's
    whole per-chunk math).

    Two variants are chosen in Python, because inductor cannot see a tensor's value: at T = 1 the student's
    log-softmax serves the CE and the divergence (one softmax fewer), and with a CE weight of 0 (α = 1)
    the CE's gradient ``softmax − onehot`` is not computed at all (only its value, which is logged).
    Measured on [512, 128 000] float32, one thread: 1.09 s for the general variant, 0.68 s for T = 1 and
    α = 1 (benchmarks/loss_kernels.py).
    """
    core = CORES.get(name)

    def terms(s: Tensor, t: Tensor, temperature: Tensor, params: Tensor, targets: Tensor,
              weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_p1 = torch.log_softmax(s, dim=-1)
        index = targets.unsqueeze(-1)
        ce = -log_p1.gather(-1, index).squeeze(-1)
        if core is None:
            div, grad = s.new_zeros(s.shape[:-1]), None
        elif unit_temperature:
            div, grad_z = core(log_p1, torch.log_softmax(t, dim=-1), params)
            grad = weights[1] * grad_z
        else:
            div, grad_z = core(torch.log_softmax(s / temperature, dim=-1),
                               torch.log_softmax(t / temperature, dim=-1), params)
            grad = (weights[1] / temperature) * grad_z
        if ce_gradient:
            ce_grad = weights[0] * log_p1.exp()  # d CE / d logits = softmax - onehot
            grad = ce_grad if grad is None else grad + ce_grad
            grad = grad.scatter_add(-1, index, (-weights[0]).expand(index.shape).to(grad.dtype))
        elif grad is None:
            grad = torch.zeros_like(s)
        return ce, div, grad

    tag = f"{name}_{'t1' if unit_temperature else 'tn'}_{'ce' if ce_gradient else 'noce'}"
    return _named(terms, f"terms_{tag}")


#: The per-chunk terms kernels by (raw kernel name or "zero" for cross-entropy only, T == 1, CE weight != 0).
TERMS: dict[tuple[str, bool, bool], TermsKernel] = {
    (name, unit, ce): _terms(name, unit, ce)
    for name in (*CORES, "zero") for unit in (True, False) for ce in (True, False)
}


def _bind(divergence: Divergence) -> tuple[str, tuple[float, ...]] | None:
    """(raw kernel name, its constants) for ``divergence``; ("zero", ()) when it is identically 0;
    None when the divergence has no kernel (it keeps the autograd path)."""
    fn, prm = divergence.spec.fn, divergence.params
    if fn is forward_kl:
        return "fkl", ()
    if fn is reverse_kl:
        return "rkl", ()
    if fn is total_variation:
        return "tvd", ()
    if fn is jensen_shannon:
        lam = prm["lam"]
        if lam <= 0.0 or lam >= 1.0:
            return "zero", ()
        w_p = 1.0 - lam   # the reference: log_mixture(p, q, weight_a = 1 − λ)
        return "jsd", (math.log(w_p), math.log1p(-w_p), lam, 1.0 - lam)
    if fn is generalized_jsd:
        beta = prm["beta"]
        if beta <= 0.0:
            return "fkl", ()
        if beta >= 1.0:
            return "rkl", ()
        return "jsd", (math.log(beta), math.log1p(-beta), 1.0 - beta, beta)
    if fn is skew_forward_kl:
        skew = prm["skew"]
        if skew >= 1.0:
            return "zero", ()
        if skew <= 0.0:
            return "fkl", ()
        return "skl", (math.log(skew), math.log1p(-skew))
    if fn is skew_reverse_kl:
        skew = prm["skew"]
        if skew >= 1.0:
            return "zero", ()
        if skew <= 0.0:
            return "rkl", ()
        return "srkl", (math.log(skew), math.log1p(-skew))
    return None


def _label(key: tuple[str, bool, bool]) -> str:
    return f"terms:{key[0]}:{int(key[1])}:{int(key[2])}"


_TERMS_BY_LABEL: dict[str, TermsKernel] = {_label(key): fn for key, fn in TERMS.items()}


def has_kernel(divergence: Divergence | None) -> bool:
    """True when ``divergence`` (matched by its reference function, so aliases count) has a kernel."""
    return divergence is not None and _bind(divergence) is not None


# --------------------------------------------------------------------------------------------
# Compilation: mode, persistent cache, one-warning fallback
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_compiled: dict[str, RawKernel] = {}
_compile_failure: str | None = None


#: The run's ``loss.kernels`` when it is not auto (:func:`set_compile_mode`); it wins over the environment.
_configured_mode: str | None = None


def set_compile_mode(mode: str) -> None:
    """Set the process's kernel mode from a run's ``loss.kernels``: ``"compiled"`` or ``"eager"`` win over
    :data:`COMPILE_ENV`; ``"auto"`` leaves the choice to it (and to the device and dtype)."""
    global _configured_mode
    if mode not in ("auto", "compiled", "eager"):
        raise ValueError(f"kernel mode must be auto, compiled or eager; got {mode!r}")
    _configured_mode = None if mode == "auto" else mode


def compile_mode() -> str:
    """``"auto"``, ``"compiled"`` or ``"eager"``: the run's setting (:func:`set_compile_mode`), else
    :data:`COMPILE_ENV` (unset or empty: auto)."""
    if _configured_mode is not None:
        return _configured_mode
    raw = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on", "compile", "compiled"):
        return "compiled"
    if raw in ("0", "false", "no", "off", "eager"):
        return "eager"
    raise ValueError(f"{COMPILE_ENV} must be auto, 1 or 0; got {raw!r}")


#: ``TORCHINDUCTOR_CACHE_DIR`` as the user's environment had it when pocl was imported (torch itself sets
#: the variable to its /tmp default the first time anything compiles, so it is read once, here).
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or None


def kernel_cache_dir() -> Path:
    """Where inductor keeps its compiled artefacts: ``TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``$XDG_CACHE_HOME/pocl/inductor`` (``~/.cache/pocl/inductor``)."""
    if _USER_CACHE_DIR:
        return Path(_USER_CACHE_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pocl" / "inductor"


def _use_compiled(device: torch.device, dtype: torch.dtype) -> bool:
    if _compile_failure is not None:
        return False
    mode = compile_mode()
    if mode == "eager":
        return False
    if mode == "compiled":
        return True
    # auto: float32 math on CPU (measured: benchmarks/results/loss_kernels.json). Float64 (tests only)
    # and accelerators use the eager kernel.
    return device.type == "cpu" and dtype == torch.float32


def _compiled_kernel(name: str) -> Callable:
    """The compiled form of ``KERNELS[name]`` (or ``TERMS[x]`` for ``name = "terms:x"``), made once."""
    with _lock:
        fn = _compiled.get(name)
        if fn is None:
            # The persistent FX-graph cache of inductor: a later process reuses the compiled code.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(kernel_cache_dir())
            eager = _TERMS_BY_LABEL[name] if name.startswith("terms:") else KERNELS[name]
            fn = torch.compile(eager, dynamic=True, fullgraph=True)
            _compiled[name] = fn
        return fn


def _call(name: str, eager: Callable, args: tuple, *, device: torch.device, dtype: torch.dtype, rows: int,
          compiled: bool | None):
    """``eager(*args)``, or its compiled form ``name`` when the mode (or ``compiled``) says so; a failed
    compile falls back to ``eager`` after one warning."""
    use = _use_compiled(device, dtype) if compiled is None else (compiled and _compile_failure is None)
    with torch.no_grad():
        if use and rows > 0:
            try:
                with warnings.catch_warnings():
                    # torch's own inductor imports use the deprecated torch.jit.script_method.
                    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*",
                                            category=DeprecationWarning)
                    return _compiled_kernel(name)(*args)
            except Exception as error:  # noqa: BLE001 (any compile failure: fall back, warn once)
                _fall_back(error)
        return eager(*args)


def _fall_back(error: BaseException) -> None:
    global _compile_failure
    with _lock:
        if _compile_failure is None:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            _compile_failure = f"{type(error).__name__}: {' '.join(lines[:2])[:300]}"
            log.warning("pocl: torch.compile of the divergence kernels failed (%s); using the eager kernels "
                        "from now on (same values, slower). Set %s=0 to skip compiling.",
                        _compile_failure, COMPILE_ENV)


def run_kernel(name: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               constants: tuple[float, ...] = (), *, compiled: bool | None = None) -> tuple[Tensor, Tensor]:
    """Run raw kernel ``name`` (a key of :data:`KERNELS`, or ``"zero"``) on one chunk.

    ``compiled``: None chooses by :func:`compile_mode`; True/False force (True still falls back to
    eager, with one warning, if compilation fails). Returns ``(D [n], ∂D/∂student_logits [n, V])`` in
    the compute dtype (float32, or float64 for float64 inputs).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kernel {name!r} needs student and teacher logits of one [n, V] shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.detach().to(dtype)
    t = teacher_logits.detach().to(dtype)
    if name == "zero":
        return s.new_zeros(s.shape[:-1]), torch.zeros_like(s)
    temp = torch.tensor(float(temperature), dtype=dtype, device=s.device)
    params = torch.tensor(constants if constants else (0.0,), dtype=dtype, device=s.device)
    return _call(name, KERNELS[name], (s, t, temp, params), device=s.device, dtype=dtype, rows=s.shape[0],
                 compiled=compiled)


def divergence_kernel(divergence: Divergence, student_logits: Tensor, teacher_logits: Tensor | None,
                      temperature: float, *, compiled: bool | None = None) -> tuple[Tensor, Tensor]:
    """``divergence`` of one chunk and its gradient w.r.t. ``student_logits``, in one pass.

    Args:
        divergence: a :class:`Divergence` with a kernel (:func:`has_kernel`).
        student_logits, teacher_logits: ``[n, V]`` raw logits (any float dtype; the math is float32,
            float64 for float64 inputs). ``teacher_logits`` None means no teacher: D = 0, gradient 0.
        temperature: T > 0; both models are softened, z = logits / T, and the gradient is w.r.t. the
            logits (it carries the 1/T).
        compiled: as in :func:`run_kernel`.

    Returns:
        ``(D [n], ∂Σ_n D / ∂student_logits [n, V])``; D equals ``divergence(log_softmax(z_s),
        log_softmax(z_t))``.
    """
    bound = _bind(divergence)
    if bound is None:
        raise ValueError(f"divergence {divergence.name!r} has no kernel; use the autograd path")
    if teacher_logits is None:
        teacher_logits = student_logits
        bound = ("zero", ())
    return run_kernel(bound[0], student_logits, teacher_logits, temperature, bound[1], compiled=compiled)


def chunk_terms(divergence: Divergence | None, student_logits: Tensor, teacher_logits: Tensor | None,
                temperature: float, targets: Tensor, ce_weight: float, div_weight: float, *,
                compiled: bool | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The whole per-chunk math of the loss engine in one kernel: the cross-entropy at T = 1, the
    divergence at ``temperature`` and the gradient of ``ce_weight * Σ CE + div_weight * Σ D`` w.r.t.
    the student logits (:func:`pocl.losses.terms.term_weights` gives the weights).

    Args:
        divergence: a :class:`Divergence` with a kernel, or None (cross-entropy only; ``teacher_logits``
            is then ignored).
        student_logits: ``[n, V]``; teacher_logits: ``[n, V]`` or None; targets: ``[n]`` token ids.
        compiled: as in :func:`run_kernel`.

    Returns:
        ``(CE [n], D [n] or None, grad [n, V])`` in the compute dtype (float32, float64 for float64
        inputs). CE and D equal :func:`pocl.losses.terms.token_terms`'s values.
    """
    if divergence is None or teacher_logits is None:
        name, constants = "zero", ()
    else:
        bound = _bind(divergence)
        if bound is None:
            raise ValueError(f"divergence {divergence.name!r} has no kernel; use the autograd path")
        name, constants = bound
    if student_logits.dim() != 2 or (teacher_logits is not None and teacher_logits.shape != student_logits.shape):
        raise ValueError(f"chunk_terms needs [n, V] student and teacher logits of one shape; got "
                         f"{tuple(student_logits.shape)} and "
                         f"{None if teacher_logits is None else tuple(teacher_logits.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    if teacher_logits is not None:
        dtype = torch.promote_types(dtype, teacher_logits.dtype)
    s = student_logits.detach().to(dtype)
    t = s if teacher_logits is None or name == "zero" else teacher_logits.detach().to(dtype)
    temp = torch.tensor(float(temperature), dtype=dtype, device=s.device)
    params = torch.tensor(constants if constants else (0.0,), dtype=dtype, device=s.device)
    weights = torch.tensor((float(ce_weight), float(div_weight)), dtype=dtype, device=s.device)
    key = (name, float(temperature) == 1.0, float(ce_weight) != 0.0)
    ce, div, grad = _call(_label(key), TERMS[key], (s, t, temp, params, targets.long(), weights),
                          device=s.device, dtype=dtype, rows=s.shape[0], compiled=compiled)
    return ce, (None if divergence is None else div), grad
