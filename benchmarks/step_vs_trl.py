"""Benchmark: one off-policy distillation step -- model-only floor, pocl (live teacher / exact teacher cache),
a dense full-logits step and TRL's GKDTrainer, interleaved, at vocabularies 32 000 and 128 000.

Same teacher, student, batch, length, optimizer and divergence: JSD with pocl's lambda = 0.9 (m = 0.1 p + 0.9 q,
``--divergence jsd --jsd-lambda 0.9``), which is TRL's ``generalized_jsd_loss(beta=0.1)`` (TRL puts beta on the
teacher; docs/losses.md, section gjsd). Pure distillation (pocl alpha = 1: GKD has no CE term), T = 1 (GKDTrainer's
loss uses T = 1; its ``temperature`` is only for sampling), off-policy (GKD ``lmbda=0``, ``seq_kd=False``), loss
normalised by the response tokens of the batch, AdamW (lr 1e-4, no weight decay), gradient clipping at 1.0,
random-initialised Llama models built from a config (nothing downloaded). ``--precision fp32`` (default) or
``bf16``: every variant's model passes under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (pocl's trainer through
``model.mixed_precision: bf16``, TRL through ``GKDConfig(bf16=True)``); weights and optimizer stay float32.

Variants, each in a fresh subprocess (so that peak memories do not mix), interleaved A B C D ... A B C D ...
(the workers are in ``_step_workers.py``):

* ``floor``         -- the model-only floor: teacher forward (no grad) and student forward + backward with FULL
  logits (both LM heads over all positions, as a plain ``model(...)`` call gives), the trivial loss
  ``student_logits.float().mean() + 0 * teacher_logits.sum()``, clipping, AdamW. No distillation loss at all.
* ``pocl_trainer``  -- pocl's real :class:`pocl.training.trainer.DistillTrainer` step (``_train_step``: collate,
  the live teacher's hidden states, :class:`StudentLoss` with the fused chunked loss, backward, clipping, AdamW,
  schedule), ``loss.teacher_cache: off``. The compiled divergence kernel (``POCL_COMPILE_KERNELS``, default auto =
  compiled on CPU in float32) is compiled by a warm-up call before step 1; its time is reported apart.
* ``pocl_cache``    -- the same trainer with the exact teacher cache (``loss.teacher_cache: hidden``, float32, pocl's
  default): ``train()`` runs ``prepare_teacher_cache()`` (the teacher over every sample of the run, hidden states to
  disk) before step 1; its build time is reported apart. The steps read the teacher's final hidden states by
  sample id; the teacher's body does not run, its LM head does (inside the fused loss).
* ``pocl_manual``   -- the live-teacher computation as a hand-written loop with explicit timers per phase (data,
  teacher forward, student forward, loss incl. both LM heads, backward, optimizer) and the LM-head matrix products
  timed alone: the loss share of the step.
* ``dense``         -- a hand-written step with full logits of both models and pocl's ``dense_kd_loss``.
* ``trl_gkd``       -- TRL's real ``GKDTrainer`` training step (``trainer.train()``; ``compute_loss``: full student
  and teacher logits, ``generalized_jsd_loss``), run in a separate virtual environment that has trl (``--trl-python``).
* ``trl_chunked``   -- (optional, not run by default) TRL's chunked divergence kernel
  (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, what TRL's on-policy ``DistillationTrainer`` uses)
  in a hand-written step.

Step time = wall time between the ends of consecutive optimizer steps (the first step, which allocates the
optimizer state, is not timed). Peak memory = the process's peak resident set size (VmHWM, reset with
``/proc/self/clear_refs`` just before the first step, so imports, model construction, the kernel compile and the
teacher-cache build are excluded; also reported as the increment over the RSS before the first step). Before
timing, a ``--worker verify`` run in the TRL environment checks (float32) that TRL's
``generalized_jsd_loss(beta=0.1)`` (called as ``GKDTrainer.compute_loss`` calls it), TRL's chunked kernel, pocl's
``fused_kd_loss`` and ``dense_kd_loss`` with ``jsd(lam=0.9)`` give the same loss and student gradients.

Per vocabulary the report gives each variant's median step, tokens/s, ``vs floor`` (tokens/s over the floor's),
peak RSS and its ratio to TRL's, pocl / TRL tokens/s, the loss share of the step (pocl_manual), and the goals of
issue 17 with met / not met.

    python benchmarks/step_vs_trl.py                                   # writes results/step_vs_trl.{json,md}
    python benchmarks/step_vs_trl.py --precision bf16 --output benchmarks/results/step_vs_trl_bf16.json
    python benchmarks/step_vs_trl.py --quick                           # smoke run: vocab 32000, 1 process, 1 step
    python benchmarks/step_vs_trl.py --trl-python /work/bench-trl/bin/python   # the TRL venv (default)

The TRL environment: ``python3 -m venv /work/bench-trl && /work/bench-trl/bin/pip install torch==2.13.0 &&
/work/bench-trl/bin/pip install -e . trl psutil`` (trl 1.16.0 installs with transformers 5.24.0).
"""

from __future__ import annotations

import argparse
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
import _step_workers as W  # noqa: E402

DEFAULT_OUT = C.RESULTS / "step_vs_trl.json"
DEFAULT_TRL_PYTHON = "/work/bench-trl/bin/python"
VARIANTS = ("floor", "pocl_trainer", "pocl_cache", "pocl_taid", "pocl_manual", "dense", "trl_gkd", "trl_chunked")
DEFAULT_VARIANTS = ("floor", "pocl_trainer", "pocl_cache", "pocl_manual", "dense", "trl_gkd")
TRL_VARIANTS = ("trl_gkd", "trl_chunked")
POCL_VARIANTS = ("pocl_trainer", "pocl_cache")
#: The goals of issue 17 (name -> (threshold, ">=" or "<=", what it is)).
GOALS = {
    "pocl_live_vs_floor": (0.85, ">=", "pocl trainer (live teacher) tokens/s / floor tokens/s"),
    "pocl_vs_trl": (2.5, ">=", "pocl trainer (live teacher) tokens/s / TRL GKDTrainer tokens/s"),
    "pocl_cache_vs_floor": (1.3, ">=", "pocl trainer with the exact teacher cache tokens/s / floor tokens/s"),
    "loss_share_32000": (0.20, "<=", "loss math (excluding the LM-head matmuls) / step, pocl_manual, vocab 32000"),
    "peak_memory_vs_trl": (0.3, "<=", "pocl trainer (live teacher) step memory (peak RSS minus the RSS before "
                           "step 1) / TRL GKDTrainer's"),
}


# ---------------------------------------------------------------------------------------------- orchestration
def spawn(python: str, worker: str, vocab: int, args, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        res = fh.name
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--vocab", str(vocab), "--batch",
           str(args.batch), "--length", str(args.length), "--steps", str(args.steps), "--threads", str(args.threads),
           "--chunk-size", str(args.chunk_size), "--precision", args.precision, "--result", res]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"worker": worker, "vocab": vocab, "error": f"timed out after {timeout} s", "wall": timeout}
    if proc.returncode != 0:
        return {"worker": worker, "vocab": vocab, "error": proc.stderr[-3000:], "wall": time.perf_counter() - t0}
    out = json.loads(Path(res).read_text(encoding="utf-8"))
    os.unlink(res)
    out["process_wall_seconds"] = time.perf_counter() - t0
    return out


def _median_of(runs: list[dict], fn) -> float | None:
    values = [v for v in (fn(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "not run"}
    steps = [s for r in ok for s in r["step_seconds"]]
    med = statistics.median(steps)
    r0 = ok[0]
    peaks = [r["peak_rss"] for r in ok]
    incr = [r["peak_rss"] - r["rss_before"] for r in ok]
    out = {"processes": len(ok), "step_seconds": C.stats(steps),
           "tokens_per_s_median": r0["tokens_per_step"] / med, "tokens_per_s_best": r0["tokens_per_step"] / min(steps),
           "target_tokens_per_s_median": r0["target_tokens_per_step"] / med,
           "peak_rss_gib": {"median": statistics.median(peaks) / 2**30, "max": max(peaks) / 2**30},
           "peak_increment_gib": {"median": statistics.median(incr) / 2**30, "max": max(incr) / 2**30},
           "rss_before_steps_gib": statistics.median(r["rss_before"] for r in ok) / 2**30,
           "process_wall_seconds": _median_of(ok, lambda r: r.get("process_wall_seconds")),
           "autocast_seen": r0.get("autocast_seen")}
    if "kernel_compile" in r0:
        out["kernel_compile_seconds"] = {"first_process": r0["kernel_compile"]["seconds"],
                                         "median": _median_of(ok, lambda r: r["kernel_compile"]["seconds"]),
                                         "mode": r0["kernel_compile"]["mode"],
                                         "compile_failure": r0["kernel_compile"].get("compile_failure")}
    if "first_step_seconds" in r0:
        out["first_step_seconds_median"] = _median_of(ok, lambda r: r.get("first_step_seconds"))
        # New dynamo graphs during the timed steps (after step 1): 0 means no recompilation was timed.
        out["graphs_compiled_in_timed_steps"] = [
            r["dynamo"].get("end", {}).get("unique_graphs", 0) - r["dynamo"].get("after_step1", r["dynamo"].get(
                "end", {})).get("unique_graphs", 0) for r in ok]
    if "teacher_cache_build" in r0:
        b = r0["teacher_cache_build"]
        info = (b.get("info") or {}).get("train", {})
        out["teacher_cache_build"] = {"seconds_median": _median_of(ok, lambda r: r["teacher_cache_build"].get("seconds")),
                                      "signal": b.get("train_signal"), "tokens": info.get("tokens"),
                                      "bytes": info.get("bytes"), "action": info.get("action")}
    if "phases" in r0:
        names = list(r0["phases"][0])
        ph = {n: statistics.median(p[n] for r in ok for p in r["phases"]) for n in names}
        total = sum(ph.values())
        out["phases_median_seconds"] = ph
        out["phase_total_seconds"] = total
        if "head_matmul_seconds" in r0:
            head = statistics.median(r["head_matmul_seconds"] for r in ok)
            model = ph["teacher_forward"] + ph["student_forward"] + ph["backward"] + head
            loss_math = ph["loss_with_heads"] - head
            out["breakdown"] = {
                "model_bodies_fwd_bwd_seconds": ph["teacher_forward"] + ph["student_forward"] + ph["backward"],
                "lm_head_matmuls_seconds": head,
                "loss_math_seconds": loss_math,
                "optimizer_seconds": ph["optimizer"], "data_seconds": ph["data"],
                # The loss share of the step: the loss phase without / with the LM-head matrix products.
                "loss_share_excl_heads": loss_math / total,
                "loss_share_incl_heads": ph["loss_with_heads"] / total,
                "fraction_outside_model_fwd_bwd_incl_heads": (total - model) / total,
                "fraction_outside_model_bodies": (total - model + head) / total}
            if "terms_kernel_seconds" in r0:
                kernel = statistics.median(r["terms_kernel_seconds"] for r in ok)
                out["breakdown"]["terms_kernel_seconds"] = kernel
                out["breakdown"]["terms_kernel_share"] = kernel / total
    return out


def _goal(value: float | None, name: str) -> dict:
    threshold, op, what = GOALS[name]
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"value": value, "goal": f"{op} {threshold}", "met": met, "what": what}


def compare(case: dict, vocab: int) -> dict:
    """Ratios to the floor and to TRL, the loss share, and the goals of issue 17 for one vocabulary."""
    v = case["variants"]

    def tps(name):
        return v.get(name, {}).get("tokens_per_s_median")

    def peak(name, key="peak_rss_gib"):
        return v.get(name, {}).get(key, {}).get("median")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    for name, r in v.items():
        if "tokens_per_s_median" in r:
            r["vs_floor"] = ratio(tps(name), tps("floor"))
            r["tokens_per_s_vs_trl"] = ratio(tps(name), tps("trl_gkd"))
            r["peak_rss_vs_trl"] = ratio(peak(name), peak("trl_gkd"))
            r["peak_increment_vs_trl"] = ratio(peak(name, "peak_increment_gib"), peak("trl_gkd", "peak_increment_gib"))
    b = v.get("pocl_manual", {}).get("breakdown", {})
    out = {"pocl_live_vs_floor": ratio(tps("pocl_trainer"), tps("floor")),
           "pocl_cache_vs_floor": ratio(tps("pocl_cache"), tps("floor")),
           "pocl_live_vs_trl": ratio(tps("pocl_trainer"), tps("trl_gkd")),
           "pocl_cache_vs_trl": ratio(tps("pocl_cache"), tps("trl_gkd")),
           "pocl_live_peak_rss_vs_trl": ratio(peak("pocl_trainer"), peak("trl_gkd")),
           "pocl_live_peak_increment_vs_trl": ratio(peak("pocl_trainer", "peak_increment_gib"),
                                                     peak("trl_gkd", "peak_increment_gib")),
           "pocl_cache_peak_rss_vs_trl": ratio(peak("pocl_cache"), peak("trl_gkd")),
           "loss_share_excl_heads": b.get("loss_share_excl_heads"),
           "loss_share_incl_heads": b.get("loss_share_incl_heads")}
    goals = {"pocl_live_vs_floor": _goal(out["pocl_live_vs_floor"], "pocl_live_vs_floor"),
             "pocl_vs_trl": _goal(out["pocl_live_vs_trl"], "pocl_vs_trl"),
             "pocl_cache_vs_floor": _goal(out["pocl_cache_vs_floor"], "pocl_cache_vs_floor"),
             "peak_memory_vs_trl": _goal(out["pocl_live_peak_increment_vs_trl"], "peak_memory_vs_trl")}
    if vocab == 32000:
        goals["loss_share_32000"] = _goal(out["loss_share_excl_heads"], "loss_share_32000")
    out["goals"] = goals
    return out


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _met(g: dict) -> str:
    return "n/a (not measured)" if g["met"] is None else ("met" if g["met"] else "NOT met")


def write_markdown(result: dict, path: Path) -> None:
    lines = [C.header_md("One distillation step: floor, pocl (live / cached teacher), dense, TRL GKDTrainer", result)]
    s = result["settings"]
    lines += [f"Teacher {s['teacher']}, student {s['student']}, batch {s['batch']} x length {s['length']} "
              f"({s['batch'] * s['length']} tokens per step; batch {s['large_vocab_batch']} for vocabularies > 64k), "
              f"JSD lambda 0.9 (= TRL beta 0.1), alpha 1, T 1, AdamW lr 1e-4, clip 1.0, precision "
              f"**{s['precision']}** ({s['dtype']}), {s['threads']} torch thread(s); {s['repeats']} processes per "
              f"variant ({s['large_vocab_repeats']} for vocabularies > 64k), {s['steps']} timed steps each, "
              "interleaved. Floor loss: `" + W.FLOOR_LOSS + "`.", ""]
    v = result["verification"]
    lines += [f"Loss check (float32, vocab {v.get('vocab')}, batch {v.get('batch')}): max relative loss difference to "
              f"TRL {v.get('max_rel_loss_diff', float('nan')):.2e}, max relative student-gradient difference "
              f"{v.get('max_rel_grad_diff', float('nan')):.2e} -> same: {v.get('same')}", ""]
    for vocab, case in result["cases"].items():
        lines += [f"## vocabulary {vocab}, batch {case['batch']} x length {case['length']}", "",
                  "| variant | step s (median / min) | tokens/s (median) | vs floor | vs TRL tokens/s | peak RSS GiB "
                  "| peak / TRL's | peak - RSS before steps GiB | autocast seen (teacher / student) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in case["variants"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} | | | | | | | |")
                continue
            ac = r.get("autocast_seen") or {}
            lines.append(f"| {name} | {r['step_seconds']['median']:.2f} / {r['step_seconds']['min']:.2f} | "
                         f"{r['tokens_per_s_median']:.0f} | {_fmt(r.get('vs_floor'))} | "
                         f"{_fmt(r.get('tokens_per_s_vs_trl'))} | {r['peak_rss_gib']['median']:.2f} | "
                         f"{_fmt(r.get('peak_rss_vs_trl'))} | {r['peak_increment_gib']['median']:.2f} | "
                         f"{','.join(ac.get('teacher', [])) or '-'} / {','.join(ac.get('student', [])) or '-'} |")
        vv = case["variants"]
        extra = []
        for name in ("pocl_trainer", "pocl_cache", "pocl_manual"):
            kc = vv.get(name, {}).get("kernel_compile_seconds")
            if kc:
                extra.append(f"{name}: kernel compile (warm-up before step 1, mode {kc['mode']}) "
                             f"{kc['first_process']:.1f} s in the first process, median {kc['median']:.1f} s"
                             + (f", FAILED: {kc['compile_failure']}" if kc.get("compile_failure") else "")
                             + (f"; untimed step 1 median {vv[name]['first_step_seconds_median']:.2f} s; new graphs "
                                f"compiled during the timed steps: {vv[name]['graphs_compiled_in_timed_steps']}"
                                if vv[name].get("first_step_seconds_median") is not None else ""))
        tc = vv.get("pocl_cache", {}).get("teacher_cache_build")
        if tc:
            extra.append(f"pocl_cache: teacher-cache build before step 1 (every sample of the run: "
                         f"{tc.get('tokens')} response tokens, {(tc.get('bytes') or 0) / 1e6:.1f} MB): median "
                         f"{_fmt(tc.get('seconds_median'))} s; steps read the signal `{tc.get('signal')}`")
        if extra:
            lines += [""] + [f"- {x}" for x in extra]
        b = vv.get("pocl_manual", {}).get("breakdown")
        if b:
            ph = vv["pocl_manual"]["phases_median_seconds"]
            lines += ["", "pocl step time breakdown (hand-written loop, median seconds): "
                      + ", ".join(f"{k} {x:.3f}" for k, x in ph.items())
                      + f"; of the loss phase, the LM-head matrix products alone take {b['lm_head_matmuls_seconds']:.3f}.",
                      f"Loss share of the step: {100 * b['loss_share_excl_heads']:.1f} % without the LM-head matmuls "
                      f"(loss math {b['loss_math_seconds']:.3f} s), {100 * b['loss_share_incl_heads']:.1f} % with them."]
            if "terms_kernel_seconds" in b:
                lines.append(f"The loss math timed alone (the compiled terms kernel on the same chunks): "
                             f"{b['terms_kernel_seconds']:.3f} s, {100 * b['terms_kernel_share']:.1f} % of the step.")
        t = case.get("comparison")
        if t:
            lines += ["", "Goals (issue 17):", ""]
            for name, g in t["goals"].items():
                lines.append(f"- {g['what']}: {_fmt(g['value'], '.3f')} (goal {g['goal']}): **{_met(g)}**")
            lines.append(f"- for the record: pocl_cache / TRL tokens/s {_fmt(t['pocl_cache_vs_trl'])}; pocl live "
                         f"whole-process peak RSS / TRL's {_fmt(t['pocl_live_peak_rss_vs_trl'])}; pocl_cache peak RSS / "
                         f"TRL's {_fmt(t['pocl_cache_peak_rss_vs_trl'])}; loss share with the LM heads "
                         f"{_fmt(None if t['loss_share_incl_heads'] is None else 100 * t['loss_share_incl_heads'], '.1f')} %")
        lines.append("")
    C.write_text(path, "\n".join(lines))


def print_goals(result: dict) -> None:
    for vocab, case in result["cases"].items():
        t = case.get("comparison", {})
        print(f"vocab {vocab}:")
        for name, r in case["variants"].items():
            if "error" in r:
                print(f"  {name:13s} FAILED")
                continue
            print(f"  {name:13s} step {r['step_seconds']['median']:7.2f} s  {r['tokens_per_s_median']:7.0f} tok/s  "
                  f"vs floor {_fmt(r.get('vs_floor'))}  vs TRL {_fmt(r.get('tokens_per_s_vs_trl'))}  "
                  f"peak {r['peak_rss_gib']['median']:.2f} GiB ({_fmt(r.get('peak_rss_vs_trl'))} of TRL)")
        for name, g in t.get("goals", {}).items():
            print(f"  goal {name}: {_fmt(g['value'], '.3f')} {g['goal']} -> {_met(g)}")
        if t.get("loss_share_excl_heads") is not None:
            print(f"  loss share: {100 * t['loss_share_excl_heads']:.1f} % excl. LM heads, "
                  f"{100 * t['loss_share_incl_heads']:.1f} % incl.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=sorted(W.WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--vocabs", type=int, nargs="+", default=None, help="default 32000 128000 (--quick: 32000)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (one more runs untimed first)")
    p.add_argument("--repeats", type=int, default=3, help="processes per variant and vocabulary, interleaved")
    p.add_argument("--large-vocab-repeats", type=int, default=2, help="processes per variant for vocab > 64k")
    p.add_argument("--large-vocab-batch", type=int, default=4,
                   help="batch for vocab > 64k (batch 8 would need about 18 GiB for TRL's step on this 23 GiB machine)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: torch.autocast('cpu', bfloat16) around every variant's model passes")
    p.add_argument("--chunk-size", type=int, default=0, help="pocl's loss.chunk_size (default 0: chosen from the "
                   "vocabulary, as pocl does: 512 at 32 000, 128 at 128 000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    p.add_argument("--verify-batch", type=int, default=2)
    p.add_argument("--no-verify", action="store_true", help="skip the loss check")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--output", default=None, help="default: benchmarks/results/step_vs_trl.json (a --quick run: /tmp)")
    p.add_argument("--quick", action="store_true", help="smoke run: vocab 32000 (unless --vocabs), 1 process, 1 step")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / f"{DEFAULT_OUT.stem}_quick.json") if args.quick \
            else str(DEFAULT_OUT)
    if args.worker:
        return W.run_worker(args)
    if args.vocabs is None:
        args.vocabs = [32000] if args.quick else [32000, 128000]
    if args.quick:
        args.repeats, args.large_vocab_repeats, args.steps = 1, 1, 1
    have_trl = Path(args.trl_python).exists()
    t0 = time.perf_counter()
    result = {"benchmark": "step_vs_trl", "created": C.now(),
              "command": "python benchmarks/step_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()},
              "settings": {"teacher": W.TEACHER, "student": W.STUDENT, "batch": args.batch, "length": args.length,
                           "steps": args.steps, "repeats": args.repeats, "large_vocab_batch": args.large_vocab_batch,
                           "large_vocab_repeats": args.large_vocab_repeats, "variants": args.variants,
                           "threads": args.threads, "pocl_chunk_size": args.chunk_size, "divergence":
                           "pocl jsd lam=0.9 == TRL generalized_jsd_loss beta=0.1", "alpha": 1.0, "temperature": 1.0,
                           "optimizer": "AdamW lr 1e-4, weight decay 0, clip 1.0, constant lr",
                           "precision": args.precision,
                           "dtype": "float32 weights and optimizer; model passes under torch.autocast('cpu', "
                                    "bfloat16)" if args.precision == "bf16" else "float32",
                           "floor_loss": W.FLOOR_LOSS, "tie_word_embeddings": False,
                           "pocl_compile_kernels_env": os.environ.get("POCL_COMPILE_KERNELS", "(unset: auto)"),
                           "prompt": "25-50 % of each sequence (labels -100), no padding",
                           "step_time": "wall time between the ends of consecutive optimizer steps; step 1 not timed",
                           "memory": "VmHWM of the worker process, reset (clear_refs) just before step 1; increment = "
                                     "peak - VmRSS before step 1",
                           "goals": {k: {"threshold": g[0], "op": g[1], "what": g[2]} for k, g in GOALS.items()}},
              "doc": __doc__, "cases": {}}
    if have_trl and not args.no_verify:
        v = spawn(args.trl_python, "verify", args.vocabs[0],
                  argparse.Namespace(**{**vars(args), "batch": args.verify_batch}), args.timeout)
        result["verification"] = v
        result["trl_version"] = v.get("versions", {}).get("trl")
        print(f"verification: {json.dumps({k: v.get(k) for k in ('max_rel_loss_diff', 'max_rel_grad_diff', 'same', 'error')})}",
              flush=True)
    else:
        result["verification"] = {"skipped": "--no-verify" if have_trl else f"{args.trl_python} not found"}
    for vocab in args.vocabs:
        large = vocab > 64000
        reps = args.large_vocab_repeats if large else args.repeats
        vargs = argparse.Namespace(**{**vars(args), "batch": args.large_vocab_batch if large else args.batch})
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for rep in range(reps):
            for variant in args.variants:
                if variant in TRL_VARIANTS and not have_trl:
                    continue
                python = args.trl_python if variant in TRL_VARIANTS else sys.executable
                r = spawn(python, variant, vocab, vargs, args.timeout)
                runs[variant].append(r)
                msg = r.get("error", "").strip().splitlines()[-1:] if "error" in r else \
                    f"median step {statistics.median(r['step_seconds']):.2f} s, peak {r['peak_rss'] / 2**30:.2f} GiB, " \
                    f"process {r['process_wall_seconds']:.0f} s"
                print(f"vocab {vocab} round {rep + 1}: {variant}: {msg} (load {C.load()})", flush=True)
        case = {"batch": vargs.batch, "length": args.length, "processes_per_variant": reps,
                "variants": {v: summarise(rs) for v, rs in runs.items() if rs}, "raw": runs}
        case["comparison"] = compare(case, vocab)
        result["cases"][str(vocab)] = case
        out = Path(args.output)
        result["load_average"]["after"] = C.load()
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        C.write_json(out, result)  # after every vocabulary, so a long run leaves its finished part
        write_markdown(result, out.with_suffix(".md"))
    print_goals(result)
    print(f"wrote {args.output} and {Path(args.output).with_suffix('.md')} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
