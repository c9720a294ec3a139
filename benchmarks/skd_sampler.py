"""Speculative KD sampling: seconds per call with the KV caches kept across blocks, against the old
sampler that re-left-padded the batch and recomputed the whole prefix after every block.

    OMP_NUM_THREADS=1 python benchmarks/skd_sampler.py          # about 5 minutes on a 2-core CPU
    python benchmarks/skd_sampler.py --repeats 1 --skip-old     # the new sampler and plain sampling only

The setting of ``--method skd`` in the evidence matrix: teacher SmolLM2-135M (30 layers), student its
healed 10-layer subset (``runs/matrix/smollm2-dolly-powered/models/{teacher,heal/final}``), the first
``--prompts`` Dolly training instructions in the Alpaca-style prompt, one batch, ``--max-new-tokens``
new tokens, bf16 autocast on CPU, the official SKD settings (gamma 5, top-K 25, T = 1). Variants, in
this order within each repeat (minimum over repeats reported):

* ``student_sampling``: ``pocl.generation.generate`` with the student alone (T = 1, top-p 1, no top-k,
  no n-gram block), the floor an SKD call cannot beat;
* ``skd_old``: the recompute sampler as it was before the cache change (a copy of its functions is
  kept below, ``old_speculative_generate``; the rest of the module is shared);
* ``skd_new``: ``pocl.training.speculative.speculative_generate`` (both KV caches kept, holes masked).

The old sampler's copy draws as the sampler does now (``sample_rows``, one uniform per row; it drew by
per-row ``torch.multinomial`` then), so the two differ only in the cache. ``--device cuda`` times the sampler
on a GPU (bf16 autocast there too).
Same seed for both SKD variants: they draw the same random numbers, but under bf16 the cached and the
recomputed forward passes round differently, so their samples may part after a near tie; the share of
identical outputs is recorded. Skips (exit 0, a message) when the models or the data are absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "runs/matrix/smollm2-dolly-powered/models"
PROMPT = "Below is an instruction.\n\n### Instruction:\n{instruction}\n\n### Response:\n"


# ------------------------------------------------------- the old recompute sampler (before the cache)
def old_speculative_generate(student, teacher, tokenizer, prompts, settings, *, seed: int, batch_size: int):
    """``speculative_generate`` as it was before the KV caches were kept across blocks."""
    import torch

    from pocl.generation import (
        Generation,
        left_pad,
        length_sorted_batches,
        special_token_ids,
    )
    from pocl.models import output_rows
    from pocl.training import speculative as sp
    from pocl.training.stages import stream_seed

    def positions_of(mask):
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def draft(seqs, budgets, gens, s, vocab, eos, filler):
        device = sp._device(student)
        ids, mask = left_pad(seqs, filler, device)
        positions = positions_of(mask)
        drafts = [[] for _ in seqs]
        logits, cache = sp._forward(student, ids, mask, positions, keep=1)
        for step in range(max(budgets)):
            probs = sp._probs(logits[:, -1, :vocab], s.temperature)
            feed = []
            for r, gen in enumerate(gens):
                if len(drafts[r]) < budgets[r] and (not drafts[r] or drafts[r][-1] != eos):
                    drafts[r].append(sp.sample_rows(probs[r:r + 1], [gen])[0])
                feed.append(drafts[r][-1] if drafts[r] else filler)
            if step == max(budgets) - 1 or all(len(d) == b or d[-1] == eos for d, b in zip(drafts, budgets)):
                break
            mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits, cache = sp._forward(student, torch.tensor(feed, device=device)[:, None], mask, positions,
                                        keep=1, cache=cache)
        return drafts

    def judge(seqs, drafts, s, vocab, starts, filler):
        width = max(len(d) for d in drafts)
        ids, mask = left_pad([q + d[:-1] for q, d in zip(seqs, drafts)], filler, sp._device(teacher))
        logits, _ = sp._forward(teacher, ids, mask, positions_of(mask), keep=width)
        logits = logits[..., :vocab]
        tokens = torch.full(logits.shape[:2], filler, dtype=torch.long)
        for r, d in enumerate(drafts):
            tokens[r, width - len(d):] = torch.tensor(d, dtype=torch.long)
        tokens = tokens.to(logits.device)
        if s.top_p > 0:
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            ok = (probs * (probs > probs.gather(-1, tokens[..., None]))).sum(-1) < s.top_p
        else:
            ks = torch.ones(logits.shape[:2], dtype=torch.long)
            for r, d in enumerate(drafts):
                ks[r, width - len(d):] = torch.tensor([s.k_at(starts[r] + j) for j in range(len(d))])
            ok = (logits > logits.gather(-1, tokens[..., None])).sum(-1) < ks.to(logits.device)
        ok = ok.tolist()
        return ([ok[r][width - len(d):] for r, d in enumerate(drafts)],
                [logits[r, width - len(d):] for r, d in enumerate(drafts)])

    def run_batch(rows, s, vocab, eos, filler, stats):
        active = [row for row in rows if not row.done]
        while active:
            seqs = [row.prompt + row.tokens for row in active]
            budgets = [min(s.gamma, s.max_new_tokens - len(row.tokens)) for row in active]
            drafts = draft(seqs, budgets, [row.gen for row in active], s, vocab, eos, filler)
            accepted, logits = judge(seqs, drafts, s, vocab, [len(row.tokens) for row in active], filler)
            for row, d, ok, row_logits in zip(active, drafts, accepted, logits):
                n = next((j for j, flag in enumerate(ok) if not flag), len(d))
                row.tokens += d[:n]
                stats.drafted += len(d)
                stats.accepted += n
                stats.blocks += 1
                if n < len(d):
                    if s.teacher_temperature == 0:
                        token = int(row_logits[n].argmax())
                    else:
                        token = sp.sample_rows(sp._probs(row_logits[n][None], s.teacher_temperature), [row.gen])[0]
                    row.tokens.append(token)
                    stats.replaced += 1
                if eos is not None and eos in row.tokens:
                    row.tokens = row.tokens[:row.tokens.index(eos)]
                    row.stopped_at_eos = row.done = True
                elif len(row.tokens) >= s.max_new_tokens:
                    row.done = True
            active = [row for row in active if not row.done]

    eos, pad = special_token_ids(tokenizer)
    filler = pad if pad is not None else 0
    vocab = min(output_rows(student), output_rows(teacher))
    rows = [sp._Row(list(p), torch.Generator().manual_seed(stream_seed("skd", seed, i))) for i, p in enumerate(prompts)]
    stats = sp.SpeculativeStats()
    with torch.no_grad():
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            run_batch([rows[i] for i in batch], settings, vocab, eos, filler, stats)
    out = [Generation(row.tokens, tokenizer.decode(row.tokens, skip_special_tokens=True), row.stopped_at_eos)
           for row in rows]
    return out, stats


# ------------------------------------------------------------------------------------------- main
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        return None


def model_arguments(description: str, *, prompts: int, max_new_tokens: int) -> argparse.ArgumentParser:
    """The arguments every SKD benchmark on the SmolLM2 models takes: the models, the data and its size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--teacher", default=str(MODELS / "teacher"))
    p.add_argument("--student", default=str(MODELS / "heal" / "final"))
    p.add_argument("--data", default="/work/shared/data/dolly/train.jsonl")
    p.add_argument("--prompts", type=int, default=prompts)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    return p


def load_models_and_prompts(args, name: str):
    """(tokenizer, teacher, student, prompt token ids) in float32 on the CPU, or None (after a message) when a
    model or the data is absent: the first ``--prompts`` Dolly instructions in the Alpaca-style prompt."""
    missing = [x for x in (args.teacher, args.student, args.data) if not Path(x).exists()]
    if missing:
        print(f"{name}: skipped, not found: {', '.join(missing)} (the SmolLM2 matrix models and Dolly data; "
              f"pass --teacher / --student / --data)")
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
    with open(args.data, encoding="utf-8") as fh:
        records = [json.loads(line) for _, line in zip(range(args.prompts), fh)]
    prompts = [tokenizer(PROMPT.format(instruction=r["instruction"]))["input_ids"] for r in records]
    return tokenizer, teacher, student, prompts


def main(argv=None) -> int:
    p = model_arguments(__doc__.split("\n\n")[0], prompts=8, max_new_tokens=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the models and the autocast)")
    p.add_argument("--skip-old", action="store_true", help="do not time the old recompute sampler")
    p.add_argument("--check-tokens", type=int, default=48,
                   help="then old vs new in float32 (no autocast) with this many new tokens: identical outputs? (0: skip)")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/skd_sampler.json"))
    args = p.parse_args(argv)
    import torch
    import transformers

    from pocl.generation import DecodingConfig, generate
    from pocl.training.speculative import SpeculativeSettings, speculative_generate

    torch.set_num_threads(args.threads)
    loaded = load_models_and_prompts(args, "skd_sampler")
    if loaded is None:
        return 0
    tokenizer, teacher, student, prompts = loaded
    teacher, student = teacher.to(args.device), student.to(args.device)
    device_type = torch.device(args.device).type

    def synchronize():  # time the device's work, not only its launches
        if device_type == "cuda":
            torch.cuda.synchronize()
    settings = SpeculativeSettings(max_new_tokens=args.max_new_tokens)
    decoding = DecodingConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=0,
                              max_new_tokens=args.max_new_tokens)
    variants = {
        "student_sampling": lambda: (generate(student, tokenizer, prompts, decoding, batch_size=len(prompts),
                                              seed=args.seed), None),
        "skd_old": lambda: old_speculative_generate(student, teacher, tokenizer, prompts, settings, seed=args.seed,
                                                    batch_size=len(prompts)),
        "skd_new": lambda: speculative_generate(student, teacher, tokenizer, prompts, settings, seed=args.seed,
                                                batch_size=len(prompts)),
    }
    if args.skip_old:
        del variants["skd_old"]
    out: dict = {
        "benchmark": "skd_sampler", "argv": sys.argv[1:], "created": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_before": list(os.getloadavg())},
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if device_type == "cuda" else None, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "teacher": args.teacher, "student": args.student, "data": args.data, "prompts": len(prompts),
        "prompt_tokens": [len(q) for q in prompts], "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "precision": "bf16 autocast (float32 weights)", "settings": dataclasses.asdict(settings), "seconds": {name: [] for name in variants}, "calls": {},
    }
    generations = {}
    for repeat in range(args.repeats):
        for name, call in variants.items():
            with torch.autocast(device_type, dtype=torch.bfloat16):
                synchronize()
                start = time.perf_counter()
                gens, stats = call()
                synchronize()
                seconds = time.perf_counter() - start
            out["seconds"][name].append(round(seconds, 3))
            generations[name] = gens
            lengths = [len(g.token_ids) for g in gens]
            out["calls"][name] = {"new_tokens": lengths, "stopped_at_eos": [g.stopped_at_eos for g in gens]}
            if stats is not None:
                out["calls"][name].update(drafted=stats.drafted, accepted=stats.accepted, replaced=stats.replaced,
                                          blocks=stats.blocks, acceptance_rate=round(stats.acceptance_rate, 4))
            print(f"repeat {repeat} {name}: {seconds:.2f} s, {sum(lengths)} tokens"
                  + (f", acceptance {stats.acceptance_rate:.3f}, blocks {stats.blocks}" if stats else ""), flush=True)
    best = {name: min(values) for name, values in out["seconds"].items()}
    out["best_seconds"] = best
    out["tokens_per_second"] = {name: round(sum(out["calls"][name]["new_tokens"]) / best[name], 2) for name in best}
    if "skd_old" in best:
        out["speedup_new_vs_old"] = round(best["skd_old"] / best["skd_new"], 2)
        out["identical_outputs_old_new"] = sum(
            a.token_ids == b.token_ids for a, b in zip(generations["skd_old"], generations["skd_new"])) / len(prompts)
    out["new_vs_student_sampling"] = round(best["skd_new"] / best["student_sampling"], 2)
    if args.check_tokens and not args.skip_old:  # exactness on the real models: no bf16 rounding
        check = dataclasses.replace(settings, max_new_tokens=args.check_tokens)
        old, old_stats = old_speculative_generate(student, teacher, tokenizer, prompts, check, seed=args.seed,
                                                  batch_size=len(prompts))
        new, new_stats = speculative_generate(student, teacher, tokenizer, prompts, check, seed=args.seed,
                                              batch_size=len(prompts))
        out["float32_check"] = {"max_new_tokens": args.check_tokens, "identical_outputs": sum(
            a.token_ids == b.token_ids for a, b in zip(old, new)) / len(prompts), "same_stats": old_stats == new_stats}
        print(f"float32 check: {out['float32_check']}", flush=True)
    out["load_after"] = list(os.getloadavg())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("best_seconds", "tokens_per_second", "new_vs_student_sampling")
                      + (("speedup_new_vs_old", "identical_outputs_old_new") if "skd_old" in best else ())}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
