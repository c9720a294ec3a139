"""The divergence kernels (pocl.losses.kernels) against autograd through the reference functions.

Per divergence, one chunk of ``[tokens, vocab]`` float32 logits (default [512, 32000], the engine's chunk
at a 32k vocabulary), forward + backward w.r.t. the student logits:

* ``reference`` -- log_softmax of both models at T, the registry's reference function, ``torch.autograd.grad``
  (what the engine did per chunk before the kernels);
* ``eager``     -- the kernel's closed-form value and gradient, eager PyTorch;
* ``compiled``  -- the same kernel under ``torch.compile`` (inductor, dynamic shapes).

Timings are medians of interleaved repetitions (reference, eager, compiled, reference, ...). The first
compile of each kernel is timed against an empty inductor cache (a temporary folder), and again after
``torch._dynamo.reset()`` with that cache warm (what a later process pays: tracing plus a cache hit).
Then the per-chunk terms kernel (CE + JSD 0.9 + the weighted gradient, :func:`pocl.losses.kernels.chunk_terms`) at
[512, 32000] and [512, 128000], compiled: its variants (general: T 2 with a CE weight; T 1 with a CE weight; T 1
and alpha 1, no CE gradient) in one call over all rows and in CPU row blocks (``CPU_BLOCK_BYTES``, the default).
Last, one whole ``fused_kd_loss`` step (N 1024 tokens, V 32000, JSD 0.9, alpha 0.5, T 1, chunk 512) with the
kernels off (autograd through the reference, as before the kernels), eager and compiled.

    python benchmarks/loss_kernels.py            # writes benchmarks/results/loss_kernels.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

DEFAULT_OUT = C.RESULTS / "loss_kernels.json"
DIVERGENCES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"lam": 0.9}), ("skl", {"skew": 0.1}),
               ("srkl", {"skew": 0.1})]


def fused_step(args, torch) -> dict:
    """One whole ``fused_kd_loss`` forward + backward (JSD 0.9, alpha 0.5, T 1): kernels off / eager / compiled."""
    from unittest import mock

    from pocl.losses import fused_kd_loss, make_divergence, terms
    from pocl.losses import kernels as K

    n, v = args.step_tokens, args.vocab
    g = torch.Generator().manual_seed(1)
    sh = torch.randn(n, 256, generator=g).requires_grad_(True)
    th = torch.randn(n, 512, generator=g)
    sw = (torch.randn(v, 256, generator=g) * 0.02).requires_grad_(True)
    tw = torch.randn(v, 512, generator=g) * 0.02
    targets = torch.randint(0, v, (n,), generator=g)
    div = make_divergence("jsd", lam=0.9)

    def step():
        out = fused_kd_loss(sh, sw, None, th, tw, None, targets, divergence=div, temperature=1.0, alpha=0.5,
                            normalizer=n, chunk_size=512)
        return [float(out.loss.detach()), *torch.autograd.grad(out.loss, [sh, sw])]

    def run(variant):
        if variant == "autograd":
            with mock.patch.object(terms, "token_terms_and_grad", lambda *a: None), \
                    mock.patch("pocl.losses.fused.token_terms_and_grad", lambda *a: None), \
                    mock.patch("pocl.losses.fused.has_closed_form", lambda *a: False):
                return step()
        with mock.patch.dict(os.environ, {K.COMPILE_ENV: "0" if variant == "eager" else "1"}):
            return step()

    outs = {k: run(k) for k in ("autograd", "eager", "compiled")}  # also warms up
    agree = {k: {"loss_abs_diff": abs(outs[k][0] - outs["autograd"][0]),
                 "grad_hidden_max_abs_diff": float((outs[k][1] - outs["autograd"][1]).abs().max()),
                 "grad_weight_max_abs_diff": float((outs[k][2] - outs["autograd"][2]).abs().max())}
             for k in ("eager", "compiled")}
    seconds = {k: [] for k in outs}
    for _ in range(args.repeats):
        for k, times in seconds.items():
            c0 = time.perf_counter()
            run(k)
            times.append(time.perf_counter() - c0)
    med = {k: statistics.median(x) for k, x in seconds.items()}
    print(f"fused step N={n}: autograd {med['autograd']:.3f}s eager {med['eager']:.3f}s "
          f"compiled {med['compiled']:.3f}s", flush=True)
    return {"settings": {"tokens": n, "vocab": v, "hidden": [256, 512], "chunk_size": 512, "divergence": "jsd lam 0.9",
                         "alpha": 0.5, "temperature": 1.0},
            "timing": {k: C.stats(x) for k, x in seconds.items()},
            "speedup_vs_autograd": {k: med["autograd"] / med[k] for k in ("eager", "compiled")},
            "agreement_with_autograd": agree}


def terms_variants(args, torch) -> dict:
    """The compiled terms kernel per variant, one call over all rows vs row blocks (the default)."""
    from unittest import mock

    from pocl.losses import kernels as K
    from pocl.losses import make_divergence

    div = make_divergence("jsd", lam=0.9)
    variants = {"general_T2_ce": (2.0, 0.3), "T1_ce": (1.0, 0.3), "T1_alpha1_no_ce_grad": (1.0, 0.0)}
    out = {}
    for v in args.terms_vocabs:
        g = torch.Generator().manual_seed(2)
        s = torch.randn(args.tokens, v, generator=g) * 2
        t = torch.randn(args.tokens, v, generator=g) * 2
        targets = torch.randint(0, v, (args.tokens,), generator=g)

        def call(temperature, ce_weight, layout, s=s, t=t, targets=targets):
            block = 1 << 62 if layout == "one_call" else K.CPU_BLOCK_BYTES
            with mock.patch.object(K, "CPU_BLOCK_BYTES", block):
                return K.chunk_terms(div, s, t, temperature, targets, ce_weight, 1.0 - ce_weight, compiled=True)

        cases = {(name, layout): tp for name, tp in variants.items() for layout in ("one_call", "row_blocks")}
        for (name, layout), (temp, ce_w) in cases.items():
            call(temp, ce_w, layout)  # compile / warm up
        seconds = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case, (temp, ce_w) in cases.items():
                c0 = time.perf_counter()
                call(temp, ce_w, case[1])
                seconds[case].append(time.perf_counter() - c0)
        rows = K._row_blocks(args.tokens, v)
        res = {"shape": [args.tokens, v], "rows_per_block": rows[0][1] - rows[0][0], "variants": {}}
        for name in variants:
            one, blk = (statistics.median(seconds[(name, lay)]) for lay in ("one_call", "row_blocks"))
            res["variants"][name] = {"one_call": C.stats(seconds[(name, "one_call")]),
                                     "row_blocks": C.stats(seconds[(name, "row_blocks")]),
                                     "row_blocks_speedup": one / blk}
            print(f"terms V={v} {name}: one call {one:.3f}s, row blocks {blk:.3f}s", flush=True)
        out[str(v)] = res
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step-tokens", type=int, default=1024, help="tokens of the whole fused-loss step")
    p.add_argument("--terms-vocabs", type=int, nargs="*", default=[32000, 128000],
                   help="vocabularies of the terms-kernel variants (none: skip them)")
    p.add_argument("--output", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="pocl-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold first compile; the user's cache is untouched
    import torch

    from pocl.losses import make_divergence
    from pocl.losses.kernel_math import bind as _bind
    from pocl.losses.kernels import run_kernel

    torch.set_num_threads(args.threads)
    n, v, temp = args.tokens, args.vocab, args.temperature
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2

    def reference(div):
        leaf = s.detach().requires_grad_(True)
        with torch.enable_grad():
            d = div(torch.log_softmax(leaf / temp, -1), torch.log_softmax(t / temp, -1))
            (grad,) = torch.autograd.grad(d.sum(), [leaf])
        return d.detach(), grad

    t0 = time.perf_counter()
    result = {"benchmark": "loss_kernels", "created": C.now(),
              "command": "python benchmarks/loss_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()},
              "settings": {"tokens": n, "vocab": v, "temperature": temp, "dtype": "float32",
                           "repeats": args.repeats, "inductor_cache": "fresh temporary folder"},
              "doc": __doc__, "divergences": {}}
    for name, params in DIVERGENCES:
        div = make_divergence(name, **params)
        kname, consts = _bind(div)
        row = {"params": params}
        c0 = time.perf_counter()
        run_kernel(kname, s, t, temp, consts, compiled=True)
        row["first_compile_seconds_cold_cache"] = time.perf_counter() - c0
        torch._dynamo.reset()
        from pocl.losses import kernels as K
        K._compiled.clear()
        c0 = time.perf_counter()
        run_kernel(kname, s, t, temp, consts, compiled=True)
        row["first_compile_seconds_warm_cache"] = time.perf_counter() - c0
        ref_v, ref_g = reference(div)
        for mode, compiled in (("eager", False), ("compiled", True)):
            kv, kg = run_kernel(kname, s, t, temp, consts, compiled=compiled)
            row[f"{mode}_max_abs_diff"] = {"value": float((kv - ref_v).abs().max()),
                                           "grad": float((kg - ref_g).abs().max())}
        fns = {"reference": lambda div=div: reference(div),
               "eager": lambda k=kname, c=consts: run_kernel(k, s, t, temp, c, compiled=False),
               "compiled": lambda k=kname, c=consts: run_kernel(k, s, t, temp, c, compiled=True)}
        seconds = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                c0 = time.perf_counter()
                fn()
                seconds[k].append(time.perf_counter() - c0)
        row["timing"] = {k: C.stats(x) for k, x in seconds.items()}
        med = {k: statistics.median(x) for k, x in seconds.items()}
        row["speedup_vs_reference"] = {"eager": med["reference"] / med["eager"],
                                       "compiled": med["reference"] / med["compiled"]}
        row["compiled_vs_eager"] = med["eager"] / med["compiled"]
        result["divergences"][f"{name}{params or ''}"] = row
        print(f"{name:5s} ref {med['reference']:.3f}s eager {med['eager']:.3f}s compiled {med['compiled']:.3f}s "
              f"first compile {row['first_compile_seconds_cold_cache']:.1f}s (warm cache "
              f"{row['first_compile_seconds_warm_cache']:.1f}s)", flush=True)
    result["terms_kernel"] = terms_variants(args, torch)
    result["fused_step"] = fused_step(args, torch)
    result["load_average"]["after"] = C.load()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    C.write_json(Path(args.output), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
