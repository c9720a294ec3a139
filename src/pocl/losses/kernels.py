"""Single-pass divergence kernels, compiled and run: each chunk's value AND analytical gradient w.r.t. the
student's logits (the formulas and their derivation: :mod:`pocl.losses.kernel_math`).

The registry's functions in :mod:`pocl.losses.divergences` are the *definition* of every divergence; the
tests (``tests/losses/test_kernels.py``) hold every kernel to them: value, and gradient against
``torch.autograd.grad`` of the reference.

On CPU the kernels run under ``torch.compile`` (inductor, dynamic shapes, so a short last chunk does
not recompile) with a persistent compile cache; ``POCL_COMPILE_KERNELS`` (``auto`` | ``1`` | ``0``)
chooses: ``0`` forces the eager kernel, ``1`` compiles on every device, ``auto`` (the default) compiles
float32 math on CPU only. If compilation fails the eager kernel is used and ONE warning says why. On CPU
the compiled per-chunk kernel (:func:`chunk_terms`) runs over blocks of rows that fit the core's cache
(:data:`CPU_BLOCK_BYTES`). See docs/losses.md, "Divergence kernels".
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pocl.losses.divergences import Divergence
from pocl.losses.kernel_math import (
    INTO_BY_LABEL,
    KERNELS,
    TERMS,
    TERMS_BY_LABEL,
    RawKernel,
    bind,
    has_kernel,
    terms_label,
)

__all__ = [
    "COMPILE_ENV",
    "CPU_BLOCK_BYTES",
    "KERNELS",
    "chunk_terms",
    "compile_mode",
    "divergence_kernel",
    "has_kernel",
    "kernel_cache_dir",
    "run_kernel",
    "set_compile_mode",
    "uses_compiled_kernels",
]

log = logging.getLogger(__name__)

#: Environment variable that chooses compiled or eager kernels: ``auto`` (default), ``1``, ``0``.
COMPILE_ENV = "POCL_COMPILE_KERNELS"

#: On CPU the compiled terms kernel runs on blocks of rows of about this many bytes per ``[rows, V]`` float32
#: tensor: inductor makes several passes over its input (the maxima, the normalisers, the divergence, the
#: gradient), and a block that stays in the core's cache makes the later passes cache reads. Measured on
#: [512, V] JSD at T = 1 and α = 1 (one thread, medians): 0.27 s -> 0.18 s at V = 32 000 (8 rows), 0.90 s ->
#: 0.63 s at 128 000 (2 rows) against one call on all rows (benchmarks/results/loss_kernels.json).
CPU_BLOCK_BYTES = 1 << 20


def _no_duck_shapes():
    """``torch.fx.experimental._config.patch(use_duck_shape=False)`` (a private module: a no-op context where
    a torch version lacks it; the kernels are then only compiled again more often)."""
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


def _row_blocks(n: int, vocab: int) -> list[tuple[int, int]]:
    """``[start, end)`` row blocks of about :data:`CPU_BLOCK_BYTES` per float32 tensor, at least 2 rows each
    (a 1-row block would make the compiler specialise on the size 1 and compile a second graph)."""
    rows = max(2, CPU_BLOCK_BYTES // (4 * max(vocab, 1)))
    bounds = [(start, min(start + rows, n)) for start in range(0, n, rows)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


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


def uses_compiled_kernels(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels on ``device`` with ``dtype`` math run compiled (the mode, the device and dtype
    rule of ``auto``, and no earlier compile failure)."""
    return _use_compiled(torch.device(device), dtype)


def _compiled_kernel(name: str) -> Callable:
    """The compiled form of ``KERNELS[name]`` (or ``TERMS[x]`` for ``name = "terms:x"``), made once."""
    with _lock:
        fn = _compiled.get(name)
        if fn is None:
            # The persistent FX-graph cache of inductor: a later process reuses the compiled code.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(kernel_cache_dir())
            if name.endswith(":into"):
                eager = INTO_BY_LABEL[name]
            else:
                eager = TERMS_BY_LABEL[name] if name.startswith("terms:") else KERNELS[name]
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
    bound = bind(divergence)
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
        bound = bind(divergence)
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
    args = (s, t, temp, params, targets.long(), weights)
    use = _use_compiled(s.device, dtype) if compiled is None else (compiled and _compile_failure is None)
    if use and s.device.type == "cpu" and s.shape[0] > 0:
        blocked = _blocked(terms_label(key), args)
        if blocked is not None:
            ce, div, grad = blocked
            return ce, (None if divergence is None else div), grad
    ce, div, grad = _call(terms_label(key), TERMS[key], args, device=s.device, dtype=dtype, rows=s.shape[0],
                          compiled=compiled)
    return ce, (None if divergence is None else div), grad


def _blocked(label: str, args: tuple) -> tuple[Tensor, Tensor, Tensor] | None:
    """The compiled terms kernel ``label`` over CPU row blocks (:data:`CPU_BLOCK_BYTES`), the gradient written
    into one preallocated tensor; None (after the one fallback warning) when compilation fails."""
    s, t, temp, params, targets, weights = args
    grad = torch.empty_like(s)
    ce_parts, div_parts = [], []
    try:
        # No "duck sizing": dynamo would otherwise tie sizes that happen to be equal on the first call
        # (the rows of a block and the 2 loss weights, the bases of the row views) and compile again
        # when they differ.
        with torch.no_grad(), warnings.catch_warnings(), _no_duck_shapes():
            warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
            fn = _compiled_kernel(f"{label}:into")
            for start, end in _row_blocks(s.shape[0], s.shape[1]):
                ce, div = fn(s[start:end], t[start:end], temp, params, targets[start:end], weights, grad[start:end])
                ce_parts.append(ce)
                div_parts.append(div)
    except Exception as error:  # noqa: BLE001 (any compile failure: fall back, warn once)
        _fall_back(error)
        return None
    return torch.cat(ce_parts), torch.cat(div_parts), grad
