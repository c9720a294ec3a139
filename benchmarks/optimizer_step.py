"""Benchmark: one AdamW step of torch's three implementations (for-loop, foreach, fused) on a student's parameters.

pocl's :func:`pocl.training.optim.build_optimizer` uses the fused kernel where it applies. The parameter sets are
the step benchmark's student (benchmarks/step_vs_trl.py: 2 layers x 256, untied embedding and head) at vocabularies
32 000 and 128 000, float32, weight decay 0.01 on matrices, gradients random. Each implementation is timed over
``--repeats`` interleaved rounds after one warm-up step; the result is the minimum and median. The updates of the
three are compared after the timed steps (max absolute difference of the parameters, same start and gradients).

    python benchmarks/optimizer_step.py        # writes benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

IMPLEMENTATIONS = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def student_params(vocab: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """The step benchmark's student as parameter shapes: embedding, head, 2 layers (q, k, v, o, MLP), norms."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(vocab, 256), (vocab, 256)]
    for _ in range(2):
        shapes += [(256, 256)] * 4 + [(704, 256), (704, 256), (256, 704), (256,), (256,)]
    shapes.append((256,))
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def optimizer(params, kwargs) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-4, **kwargs)


def run_case(vocab: int, repeats: int) -> dict:
    sets = {name: student_params(vocab) for name in IMPLEMENTATIONS}
    opts = {name: optimizer(sets[name], kw) for name, kw in IMPLEMENTATIONS.items()}
    for o in opts.values():
        o.step()  # warm-up (allocates the moment buffers)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(repeats):
        for name, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[name].append(time.perf_counter() - t0)
    ref = sets["for_loop"]
    diff = {name: max(float((a - b).detach().abs().max()) for a, b in zip(sets[name], ref)) for name in IMPLEMENTATIONS}
    n_params = sum(p.numel() for p in ref)
    out = {"parameters": n_params, "steps_compared": repeats + 1,
           "max_abs_param_difference_to_for_loop": diff, "seconds": {}}
    for name, values in times.items():
        out["seconds"][name] = {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
                                "values": [round(v, 4) for v in values]}
    base = out["seconds"]["for_loop"]["median"]
    out["speedup_vs_for_loop_median"] = {n: round(base / s["median"], 2) for n, s in out["seconds"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "optimizer_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = {"benchmark": "optimizer_step", "created": C.now(),
              "command": "python benchmarks/optimizer_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": C.machine(), "versions": C.versions(), "load_average_before": C.load(),
              "settings": {"torch_threads": args.threads, "repeats": args.repeats, "dtype": "float32",
                           "implementations": IMPLEMENTATIONS},
              "cases": {str(v): run_case(v, args.repeats) for v in args.vocab}}
    result["load_average_after"] = C.load()
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    C.write_json(Path(args.output), result)
    for vocab, case in result["cases"].items():
        med = {n: s["median"] for n, s in case["seconds"].items()}
        print(f"vocab {vocab}: {case['parameters']:,} parameters, median s {med}, "
              f"speed-up vs for-loop {case['speedup_vs_for_loop_median']}, "
              f"max |diff| {case['max_abs_param_difference_to_for_loop']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
