"""Benchmark: how the cost of pocl's loss step grows with batch, length and vocabulary, next to a dense loss.

The *loss step* is everything between the models' final hidden states and the gradients w.r.t. the student's hidden
states and LM-head weight: both LM heads, the softmaxes, the divergence (JSD, lambda 0.9, alpha 1, T 1) and its
backward. The transformer bodies are left out on purpose: their cost does not depend on the vocabulary and is the
same for both implementations (see ``step_vs_trl.py`` for whole steps).

* ``pocl_fused``  -- :func:`pocl.losses.fused_kd_loss` with the trainer's default chunk size
  (:func:`pocl.losses.auto_chunk_size`: 512 tokens at 8k and 32k, 128 at 128k), forward + backward;
* ``pocl_fused_chunk512`` -- the same with a fixed ``chunk_size`` 512, the default before the chunk size was chosen
  from the vocabulary (128k-vocabulary cells up to 2048 tokens only: the chunk's ``[chunk, V]`` temporaries
  dominate its memory there);
* ``dense``       -- ``logits = hidden @ W.T`` for both models, :func:`pocl.losses.dense_kd_loss`, backward. Cells
  whose estimated dense peak exceeds ``--dense-limit-gib`` are skipped (the estimate is printed in the results).

Grid: vocabulary 8k / 32k / 128k x length 128 / 512 x batch 4 / 16; every position is a response token (N = batch
x length); hidden sizes 256 (student) and 512 (teacher), float32, one torch thread. Each (cell, variant) runs in a
fresh subprocess (peak RSS = VmHWM reset just before the timed repeats; "increment" = peak minus the RSS holding the
inputs), the variants of a cell back to back. Time = median and minimum over the repeats (``--repeats``; cells with
more than 1e8 logits per model get ``--large-repeats``) after a small warm-up call.

    python benchmarks/scaling.py            # writes benchmarks/results/scaling.json and .md
    python benchmarks/scaling.py --quick    # smoke run (two small cells)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_OUT = C.RESULTS / "scaling.json"
H_STUDENT, H_TEACHER = 256, 512
LAMBDA = 0.9
DENSE_TENSORS = 14  # rough number of float32 [N, V] tensors alive at the dense peak (for the skip estimate)


def worker(args) -> dict:
    import torch

    from pocl.losses import auto_chunk_size, dense_kd_loss, fused_kd_loss, make_divergence

    torch.set_num_threads(args.threads)
    n, v = args.batch * args.length, args.vocab
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(n, H_STUDENT, generator=g).requires_grad_(True)
    th = torch.randn(n, H_TEACHER, generator=g)
    sw = (torch.randn(v, H_STUDENT, generator=g) * 0.02).requires_grad_(True)
    tw = torch.randn(v, H_TEACHER, generator=g) * 0.02
    targets = torch.randint(0, v, (n,), generator=g)
    div = make_divergence("jsd", lam=LAMBDA)
    chunk = 512 if args.variant == "pocl_fused_chunk512" else auto_chunk_size(0, v)

    def step(m: int):
        sh.grad = sw.grad = None
        if args.variant == "dense":
            s_logits = sh[:m] @ sw.T
            with torch.no_grad():
                t_logits = th[:m] @ tw.T
            out = dense_kd_loss(s_logits, t_logits, targets[:m], divergence=div, temperature=1.0, alpha=1.0,
                                normalizer=m)
        else:
            out = fused_kd_loss(sh[:m], sw, None, th[:m], tw, None, targets[:m], divergence=div, temperature=1.0,
                                alpha=1.0, normalizer=m, chunk_size=chunk)
        out.loss.backward()
        return float(out.loss)

    step(min(n, 64))  # warm-up
    rss_before = C.rss_bytes()
    C.reset_peak_rss()
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(n)
        seconds.append(time.perf_counter() - t0)
    return {"seconds": seconds, "peak_rss": C.peak_rss_bytes(), "rss_before": rss_before}


def spawn(variant: str, cell: dict, repeats: int, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        res = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--vocab", str(cell["vocab"]),
           "--length", str(cell["length"]), "--batch", str(cell["batch"]), "--repeats", str(repeats),
           "--threads", str(args.threads), "--result", res]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(Path(res).read_text(encoding="utf-8"))
    os.unlink(res)
    s = out["seconds"]
    n = cell["batch"] * cell["length"]
    return {"seconds": C.stats(s), "tokens_per_s_median": n / statistics.median(s),
            "peak_rss_gib": out["peak_rss"] / 2**30, "peak_increment_gib": (out["peak_rss"] - out["rss_before"]) / 2**30}


def write_markdown(result: dict, path: Path) -> None:
    lines = [C.header_md("Scaling of pocl's loss step (fused, chunked) vs a dense loss", result)]
    lines += ["Loss step = both LM heads + softmaxes + JSD(0.9) + backward, from hidden states (H 256 student, 512 "
              "teacher); N = batch x length tokens, all response tokens; float32; 1 torch thread. Memory = peak RSS "
              "increment over the inputs during the step.", "",
              "| vocab | length | batch | N | pocl fused s (median) | pocl MiB | dense s (median) | dense MiB | "
              "dense / pocl time | fused chunk 512 s | chunk 512 MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        f, d, f128 = c["variants"].get("pocl_fused", {}), c["variants"].get("dense", {}), \
            c["variants"].get("pocl_fused_chunk512", {})

        def cell(r, key):
            if not r:
                return "-"
            if "skipped" in r:
                return f"skipped (est. {r['estimated_gib']:.0f} GiB)" if key == "t" else "-"
            if "error" in r:
                return "failed"
            return f"{r['seconds']['median']:.2f}" if key == "t" else f"{1024 * r['peak_increment_gib']:.0f}"

        ratio = (f"{d['seconds']['median'] / f['seconds']['median']:.2f}"
                 if "seconds" in d and "seconds" in f else "-")
        lines.append(f"| {c['vocab']} | {c['length']} | {c['batch']} | {c['tokens']} | {cell(f, 't')} | "
                     f"{cell(f, 'm')} | {cell(d, 't')} | {cell(d, 'm')} | {ratio} | {cell(f128, 't')} | "
                     f"{cell(f128, 'm')} |")
    lines.append("")
    C.write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8000, 32000, 128000])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--large-repeats", type=int, default=1, help="repeats of cells with N x V > 1e8")
    p.add_argument("--dense-limit-gib", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--output", default=None, help="default: benchmarks/results/scaling.json (a --quick run: /tmp)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / f"{DEFAULT_OUT.stem}_quick.json") if args.quick \
            else str(DEFAULT_OUT)
    if args.worker:
        args.variant = args.worker
        out = worker(args)
        Path(args.result).write_text(json.dumps(out), encoding="utf-8")
        return 0
    if args.quick:
        args.vocabs, args.lengths, args.batches, args.repeats = [8000], [128], [4, 16], 1
    t0 = time.perf_counter()
    result = {"benchmark": "scaling", "created": C.now(),
              "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()},
              "settings": {"hidden_student": H_STUDENT, "hidden_teacher": H_TEACHER, "divergence": "jsd lam 0.9",
                           "alpha": 1.0, "temperature": 1.0, "dtype": "float32", "repeats": args.repeats,
                           "large_repeats": args.large_repeats, "dense_limit_gib": args.dense_limit_gib,
                           "dense_estimate": f"{DENSE_TENSORS} float32 [N, V] tensors"},
              "doc": __doc__, "cells": []}
    for vocab, length, batch in itertools.product(args.vocabs, args.lengths, args.batches):
        n = batch * length
        cell = {"vocab": vocab, "length": length, "batch": batch, "tokens": n, "variants": {}}
        repeats = args.large_repeats if n * vocab > 1e8 else args.repeats
        variants = ["pocl_fused", "dense"] + (["pocl_fused_chunk512"] if vocab > 64000 and n <= 2048 else [])
        for variant in variants:
            est = DENSE_TENSORS * n * vocab * 4 / 2**30
            if variant == "dense" and est > args.dense_limit_gib:
                cell["variants"][variant] = {"skipped": "estimated peak above --dense-limit-gib", "estimated_gib": est}
                continue
            r = spawn(variant, cell, repeats, args)
            cell["variants"][variant] = r
            msg = r.get("error", "").strip().splitlines()[-1:] if "error" in r else \
                f"{r['seconds']['median']:.2f} s, +{1024 * r['peak_increment_gib']:.0f} MiB"
            print(f"V={vocab} L={length} B={batch}: {variant}: {msg} (load {C.load()})", flush=True)
        result["cells"].append(cell)
        result["load_average"]["after"] = C.load()
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out = Path(args.output)
        C.write_json(out, result)
        write_markdown(result, out.with_suffix(".md"))
    print(f"wrote {args.output} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
