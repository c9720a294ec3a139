"""Profile of pocl's fused loss step (JSD): where the time goes, and what two candidate fixes would save.

1. ``torch.profiler`` operator table of one :func:`pocl.losses.fused_kd_loss` forward + backward (JSD lambda 0.9,
   alpha 1, T 1, N tokens x V vocabulary, hidden 256 / 512): matrix products (the LM heads) vs elementwise work.
2. Interleaved timing (A B C A B C ..., median and min) of the same call with:

   * ``pocl``            -- the registered ``jsd`` (``pocl.losses.divergences.jensen_shannon``);
   * ``one_floor``       -- the same formula with each log-probability clamped at ``LOG_PROB_FLOOR`` *once*
     (pocl clamps the student's twice, the teacher's twice and the mixture's twice; the mixture, a ``logaddexp`` of
     two floored finite operands, is always finite, so its clamps change nothing). Registered here under another
     name (``jsd_one_floor``); the values and gradients are checked to agree with ``jsd``;
   * ``pocl_T2``         -- ``jsd`` at T = 2 (alpha 1): with T != 1 the engine also computes the student's T = 1
     log-softmax for the CE term and back-propagates through it although its weight (1 - alpha) is 0.

    python benchmarks/loss_profile.py          # writes benchmarks/results/loss_profile.json and .md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_OUT = C.RESULTS / "loss_profile.json"


def jsd_one_floor(student_logp, teacher_logp, *, lam: float = 0.9):
    """pocl's JSD with one clamp per operand: m = (1-lam) p + lam q; lam KL(q||m) + (1-lam) KL(p||m)."""
    import torch

    from pocl.losses.divergences import LOG_PROB_FLOOR

    s = student_logp.clamp(min=LOG_PROB_FLOOR)
    t = teacher_logp.clamp(min=LOG_PROB_FLOOR)
    log_m = torch.logaddexp(t + math.log(1.0 - lam), s + math.log(lam))  # finite: both operands are
    return lam * (student_logp.exp() * (s - log_m)).sum(-1) + (1.0 - lam) * (teacher_logp.exp() * (t - log_m)).sum(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pocl.losses import DivergenceSpec, fused_kd_loss, make_divergence, register_divergence

    torch.set_num_threads(args.threads)
    register_divergence(DivergenceSpec(name="jsd_one_floor", fn=jsd_one_floor, defaults={"lam": 0.9},
                                       bounds={"lam": (0.0, 1.0)}, description="benchmark copy of jsd, one floor",
                                       formula="lam KL(q||m) + (1-lam) KL(p||m)"))
    n, v = args.tokens, args.vocab
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(n, 256, generator=g).requires_grad_(True)
    th = torch.randn(n, 512, generator=g)
    sw = (torch.randn(v, 256, generator=g) * 0.02).requires_grad_(True)
    tw = torch.randn(v, 512, generator=g) * 0.02
    targets = torch.randint(0, v, (n,), generator=g)
    variants = {"pocl": (make_divergence("jsd", lam=0.9), 1.0), "one_floor": (make_divergence("jsd_one_floor", lam=0.9), 1.0),
                "pocl_T2": (make_divergence("jsd", lam=0.9), 2.0)}

    def step(name):
        div, temp = variants[name]
        sh.grad = sw.grad = None
        out = fused_kd_loss(sh, sw, None, th, tw, None, targets, divergence=div, temperature=temp, alpha=1.0,
                            normalizer=n, chunk_size=args.chunk_size)
        out.loss.backward()
        return float(out.loss), sh.grad.clone(), sw.grad.clone()

    t0 = time.perf_counter()
    result = {"benchmark": "loss_profile", "created": C.now(),
              "command": "python benchmarks/loss_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()},
              "settings": {"tokens": n, "vocab": v, "chunk_size": args.chunk_size, "hidden": [256, 512],
                           "divergence": "jsd lam 0.9", "alpha": 1.0}, "doc": __doc__}
    ref, alt = step("pocl"), step("one_floor")
    result["one_floor_agreement"] = {"loss_abs_diff": abs(ref[0] - alt[0]),
                                     "grad_hidden_max_abs_diff": float((ref[1] - alt[1]).abs().max()),
                                     "grad_weight_max_abs_diff": float((ref[2] - alt[2]).abs().max())}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step("pocl")
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    table = [{"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6,
              "share": e.self_cpu_time_total / total} for e in ops if e.self_cpu_time_total > 0.002 * total]
    mm = sum(r["self_seconds"] for r in table if r["op"] in ("aten::mm", "aten::addmm"))
    clamp_ops = ("aten::clamp", "aten::where", "aten::ge")
    result["profile"] = {"ops": table, "total_self_seconds": total / 1e6, "matmul_share": mm / (total / 1e6),
                         "clamp_and_clamp_backward_share": sum(r["share"] for r in table if r["op"] in clamp_ops),
                         "note": "clamp backward = aten::ge (mask) + aten::where; shares of the total self CPU time"}
    seconds = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name in variants:
            t1 = time.perf_counter()
            step(name)
            seconds[name].append(time.perf_counter() - t1)
    result["timing"] = {k: C.stats(s) for k, s in seconds.items()}
    med = {k: statistics.median(s) for k, s in seconds.items()}
    result["one_floor_saving_median"] = 1 - med["one_floor"] / med["pocl"]
    result["t2_extra_cost_median"] = med["pocl_T2"] / med["pocl"] - 1
    result["load_average"]["after"] = C.load()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output)
    C.write_json(out, result)
    pr = result["profile"]
    lines = [C.header_md("Profile of pocl's fused JSD loss step", result),
             f"N = {n} tokens, V = {v}, chunk {args.chunk_size}, JSD 0.9, alpha 1, forward + backward.", "",
             f"Profiler: matrix products {100 * pr['matmul_share']:.1f} % of the self CPU time; clamps at "
             f"LOG_PROB_FLOOR and their backward (clamp, ge, where) {100 * pr['clamp_and_clamp_backward_share']:.1f} %.", "",
             "| op | calls | self s | share |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['calls']} | {r['self_seconds']:.3f} | {100 * r['share']:.1f} % |" for r in table[:15]]
    lines += ["", "| variant | seconds median / min |", "|---|---|"]
    lines += [f"| {k} | {r['median']:.3f} / {r['min']:.3f} |" for k, r in result["timing"].items()]
    lines += ["", f"One floor per operand: {100 * result['one_floor_saving_median']:.1f} % less time (median); "
              f"same loss within {result['one_floor_agreement']['loss_abs_diff']:.1e}, gradients within "
              f"{max(result['one_floor_agreement']['grad_hidden_max_abs_diff'], result['one_floor_agreement']['grad_weight_max_abs_diff']):.1e}.",
              f"T = 2 instead of 1 (alpha 1): {100 * result['t2_extra_cost_median']:.1f} % more time (median).", ""]
    C.write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines[-12:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
