"""Benchmark: pocl's training step on CPU in float32 vs bf16 autocast (``--mixed-precision bf16``).

One live-teacher distillation step of pocl's real trainer (JSD 0.9, alpha 1, T 1, AdamW, clip 1.0) on
random-initialised Llama pairs of three sizes, each variant in its own subprocess (accelerate fixes the
precision once per process), interleaved fp32 bf16 fp32 bf16 ...:

* ``builtin``: the built-in default's models (teacher 192 x 4 layers, student 96 x 2, vocabulary 512),
  batch 16 x 64 tokens;
* ``medium``: the models of ``step_vs_trl.py`` (teacher 512 x 4, student 256 x 2, vocabulary 32 000),
  batch 8 x 256;
* ``smollm2``: SmolLM2-135M's layer shape (hidden 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49 152)
  with a 6-layer teacher and a 3-layer student, batch 4 x 256.

Step time = wall time between the ends of consecutive optimizer steps (the first, which compiles the loss
kernels and allocates the optimizer state, is not timed). The loss of the first step is recorded per
precision, so the JSON shows how far bf16 moves it. The auto rule of ``model.mixed_precision`` on CPU
(``pocl.launch.mixed_precision_for``) is chosen from these figures (docs/training.md, "Precision").

    python benchmarks/cpu_mixed_precision.py              # writes results/cpu_mixed_precision.json (~6 min)
    python benchmarks/cpu_mixed_precision.py --quick      # smoke run
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

OUT = C.RESULTS / "cpu_mixed_precision.json"
SIZES = {
    "builtin": dict(teacher=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                                 num_key_value_heads=6),
                    student=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4), vocab=512, batch=16, length=64),
    "medium": dict(teacher=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=8),
                   student=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4), vocab=32000, batch=8, length=256),
    "smollm2": dict(teacher=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                                 num_key_value_heads=3),
                    student=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
                                 num_key_value_heads=3), vocab=49152, batch=4, length=256),
}


def worker(size: str, precision: str, steps: int) -> dict:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocl.config import DistillConfig
    from pocl.data import TokenizationStats, TokenizedDataset, TokenizedSample
    from pocl.training.stages import Stage
    from pocl.training.trainer import DistillTrainer

    spec = SIZES[size]

    def make(arch, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=spec["vocab"], max_position_embeddings=1024, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=1, pad_token_id=0, **arch)
        return LlamaForCausalLM(cfg)

    teacher, student = make(spec["teacher"], 0), make(spec["student"], 1)
    rng = random.Random(0)
    samples = []
    n = spec["batch"] * (steps + 1)
    for i in range(n):
        ids = [rng.randrange(2, spec["vocab"]) for _ in range(spec["length"] - 1)] + [1]
        prompt = rng.randint(spec["length"] // 4, spec["length"] // 2)
        samples.append(TokenizedSample(f"s{i}", ids, [-100] * prompt + ids[prompt:], prompt))
    data = TokenizedDataset(samples, TokenizationStats())
    config = DistillConfig.from_dict({
        "model": {"mixed_precision": precision},
        "loss": {"divergence": "jsd", "jsd_lambda": 0.9, "alpha": 1.0, "temperature": 1.0, "teacher_cache": "off"},
        "optim": {"lr": 1e-4, "min_lr": 1e-4, "weight_decay": 0.0, "lr_schedule": "constant", "max_grad_norm": 1.0},
        "train": {"output_dir": tempfile.mkdtemp(prefix="pocl-mp-bench-"), "batch_size": spec["batch"],
                  "micro_batch_size": spec["batch"], "seed": 0, "progress": False, "tensorboard": False,
                  "log_every": 1, "save_every": 10**6, "eval_every": 10**6},
    })
    ends: list[float] = []

    class Tok:
        pad_token_id = 0
        eos_token_id = 1

    trainer = DistillTrainer(config=config, student=student, tokenizer=Tok(), teacher=teacher, train_data=data,
                             dev_data=None, stages=[Stage(name="kd", max_steps=steps + 1, alpha=1.0)],
                             vocab_size=spec["vocab"], fused=True,
                             step_callbacks=[lambda tr: ends.append(time.perf_counter())])
    trainer.save_checkpoint = lambda: None
    trainer._save_model_folder = lambda tmp: None
    try:
        trainer.train()
    except Exception:  # noqa: BLE001 - final/ is stubbed out; the steps are done
        pass
    rows = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    return {"step_seconds": [b - a for a, b in zip(ends, ends[1:])], "first_loss": losses[0] if losses else None,
            "autocast": trainer.accelerator.mixed_precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3, help="processes per precision and size (interleaved)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 1 timed step, builtin only")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", nargs=3, metavar=("SIZE", "PRECISION", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        size, precision, steps = args.worker
        print(json.dumps(worker(size, precision, int(steps))))
        return
    if args.quick:
        args.sizes, args.repeats, args.steps = ["builtin"], 1, 1
    t0 = time.time()
    result = {"generated": C.now(), "command": " ".join(["python", "benchmarks/cpu_mixed_precision.py", *sys.argv[1:]]),
              "machine": C.machine(), "versions": C.versions(), "load_before": C.load(), "sizes": {}}
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    for size in args.sizes:
        runs = {"no": [], "bf16": []}
        for _ in range(args.repeats):
            for precision in ("no", "bf16"):
                out = subprocess.run([sys.executable, __file__, "--worker", size, precision, str(args.steps)],
                                     capture_output=True, text=True, env=env, check=True)
                runs[precision].append(json.loads(out.stdout.strip().splitlines()[-1]))
        times = {p: [t for r in rs for t in r["step_seconds"]] for p, rs in runs.items()}
        med = {p: statistics.median(ts) for p, ts in times.items()}
        loss = {p: rs[0]["first_loss"] for p, rs in runs.items()}
        result["sizes"][size] = {
            "spec": SIZES[size], "runs": runs, "median_step_seconds": med,
            "bf16_speedup": med["no"] / med["bf16"],
            "first_loss": loss, "first_loss_relative_difference": abs(loss["bf16"] - loss["no"]) / abs(loss["no"]),
        }
        print(f"{size}: fp32 {med['no']:.3f} s, bf16 {med['bf16']:.3f} s per step (x{med['no'] / med['bf16']:.2f}); "
              f"first loss {loss['no']:.6f} vs {loss['bf16']:.6f}", flush=True)
    result["load_after"] = C.load()
    result["wall_seconds"] = time.time() - t0
    result["threads"] = env["OMP_NUM_THREADS"]
    C.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
