"""Is evaluation the bottleneck of the evidence matrix, and what does bfloat16 generation buy on this CPU?

    python benchmarks/eval_precision.py --model runs/matrix/smollm2-dolly-powered/models/teacher \
        --data ../shared/data/eval/dolly.jsonl --prompts 48 --output benchmarks/results/eval_precision.json

Generates sampled answers (the evaluation protocol: T = 1, top-p 1, no top-k, no_repeat_ngram_size 6) for
the first ``--prompts`` prompts of one evaluation set with ``pocl.evaluation.evaluate_records`` (what
``pocl eval`` runs), with the model's weights in float32 and in bfloat16 (``pocl eval --dtype``), for each
``--batch-sizes``; modes interleaved, ``--repeats`` times, minimum reported. Records prompts per second,
generated tokens, ROUGE-L, and the share of answers identical between the two precisions (sampling with
the same seed: a bfloat16 model is a slightly different model, so its samples differ).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="../shared/data/eval/dolly.jsonl")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/eval_precision.json")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from pocl.data import get_template
    from pocl.evaluation.formats import load_eval_set
    from pocl.evaluation.scoring import evaluate_records
    from pocl.generation import DecodingConfig
    from pocl.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    records = load_eval_set(args.data, max_samples=args.prompts).records
    tokenizer = load_tokenizer(args.model)
    decoding = DecodingConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=6,
                              max_new_tokens=args.max_new_tokens)
    models = {d: load_model(args.model, dtype=getattr(torch, d)) for d in args.dtypes}
    out: dict = {"benchmark": "eval_precision", "argv": sys.argv[1:], "created": time.strftime("%Y-%m-%d %H:%M"),
                 "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), "threads": args.threads,
                             "load_before": list(os.getloadavg())},
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                 "model": args.model, "data": args.data, "prompts": len(records),
                 "max_new_tokens": args.max_new_tokens, "results": []}
    answers: dict = {}
    for bs in args.batch_sizes:
        for dtype in args.dtypes:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = evaluate_records(models[dtype], tokenizer, records, template=get_template("alpaca"), decoding=decoding,
                                       seeds=[10], batch_size=bs, max_prompt_length=256, name="set")
                times.append(time.perf_counter() - t0)
            answers[(bs, dtype)] = [s.generations[0] for s in res.samples]
            tokens = sum(s.generated_tokens[0] for s in res.samples)
            row = {"batch_size": bs, "dtype": dtype, "seconds": min(times), "seconds_all": times,
                   "prompts_per_second": len(records) / min(times), "generated_tokens": tokens,
                   "tokens_per_second": tokens / min(times), "rouge_l": res.rouge_l}
            out["results"].append(row)
            print(json.dumps(row), flush=True)
    base = args.dtypes[0]
    out["speedup_over_" + base] = {f"{r['dtype']}@{r['batch_size']}": r["tokens_per_second"] / next(
        x["tokens_per_second"] for x in out["results"] if x["dtype"] == base and x["batch_size"] == r["batch_size"])
        for r in out["results"]}
    out["identical_answers"] = {f"{d}@{bs}": sum(a == b for a, b in zip(answers[(bs, base)], answers[(bs, d)]))
                                / len(records) for bs in args.batch_sizes for d in args.dtypes if d != base}
    out["machine"]["load_after"] = list(os.getloadavg())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in out if k.startswith(("speedup", "identical"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
