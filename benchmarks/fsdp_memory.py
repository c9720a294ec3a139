"""Benchmark: memory per process of pocl's trainer with the student whole (1 process) and sharded by
FSDP2 over 2 CPU processes (``--parallelism fsdp2``, torchrun, gloo).

The student has SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocabulary
49 152, tied embedding and head; random weights), trained with the fused cross-entropy (alpha 0: the
teacher would be the same on both sides and is left out) for 3 optimizer steps of 4 x 256 tokens, AdamW.
Measured in every process of each variant:

* the bytes of the student's parameters, gradients (taken just before each optimizer step) and AdamW
  moments held by the process (a DTensor counts its local shard only);
* the root FSDP group that is gathered for every forward and backward (embedding = LM head, final norm):
  what the fused loss reads whole on every process;
* the peak resident memory (VmHWM) of the training steps (reset after the first step) and the resident
  memory after the last step. These include the Python runtime, torch's libraries and the activations,
  and the student is loaded whole in every process before it is sharded (which a peak over the whole
  process life would show).

    python benchmarks/fsdp_memory.py            # writes results/fsdp_memory.json (~3 min on 2 cores)
    python benchmarks/fsdp_memory.py --quick    # 4 layers, 1 step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

OUT = C.RESULTS / "fsdp_memory.json"
ARCH = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
BATCH, LENGTH = 4, 256


def _local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(parallelism: str, layers: int, steps: int) -> dict:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocl.config import DistillConfig
    from pocl.data import TokenizationStats, TokenizedDataset, TokenizedSample
    from pocl.training.stages import Stage
    from pocl.training.trainer import DistillTrainer

    torch.manual_seed(0)
    arch = dict(ARCH, num_hidden_layers=layers)
    student = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, bos_token_id=None, eos_token_id=1,
                                           pad_token_id=0, **arch))
    rng = random.Random(0)
    samples = []
    for i in range(BATCH * steps):
        ids = [rng.randrange(2, arch["vocab_size"]) for _ in range(LENGTH - 1)] + [1]
        samples.append(TokenizedSample(f"s{i}", ids, [-100] * (LENGTH // 4) + ids[LENGTH // 4:], LENGTH // 4))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = DistillConfig.from_dict({
        "model": {"mixed_precision": "no"},
        "loss": {"alpha": 0.0, "teacher_cache": "off"},
        "optim": {"lr": 1e-4, "min_lr": 1e-4, "lr_schedule": "constant", "max_grad_norm": 1.0},
        "train": {"output_dir": tempfile.mkdtemp(prefix="pocl-fsdp-bench-"), "batch_size": BATCH,
                  "micro_batch_size": BATCH // world, "seed": 0, "progress": False, "tensorboard": False,
                  "log_every": 1, "save_every": 10**6, "eval_every": 10**6, "parallelism": parallelism},
    })

    class Tok:
        pad_token_id = 0
        eos_token_id = 1

    grads: list[int] = []
    peaks: list[int] = []

    def after_step(trainer):
        peaks.append(C.peak_rss_bytes())
        if len(peaks) == 1:
            C.reset_peak_rss()  # the first step allocates the optimizer state; the later peaks are steady

    trainer = DistillTrainer(config=config, student=student, tokenizer=Tok(), teacher=None,
                             train_data=TokenizedDataset(samples, TokenizationStats()), dev_data=None,
                             stages=[Stage(name="ce", max_steps=steps, alpha=0.0)], vocab_size=arch["vocab_size"],
                             fused=True, step_callbacks=[after_step])
    def count_grads(*_):
        grads.append(sum(_local_bytes(p.grad) for p in trainer.student.parameters() if p.grad is not None))

    getattr(trainer.optimizer, "optimizer", trainer.optimizer).register_step_pre_hook(count_grads)
    trainer.save_checkpoint = lambda: None
    trainer._save_model_folder = lambda tmp, state_dict=None: None
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    seen: set[int] = set()
    params = 0
    for p in trainer.student.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += _local_bytes(p)
    optim = sum(_local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.numel() > 1)
    root = trainer.student.model.embed_tokens.weight
    root_bytes = root.numel() * root.element_size() + sum(
        p.numel() * p.element_size() for p in trainer.student.model.norm.parameters())
    return {"rank": int(os.environ.get("RANK", "0")), "world": world, "parallelism": parallelism,
            "param_bytes": params, "grad_bytes": max(grads), "optimizer_bytes": optim,
            "params_grads_optimizer_bytes": params + max(grads) + optim, "gathered_root_bytes": root_bytes,
            "peak_rss_steps_bytes": max(peaks[1:] or peaks), "rss_after_bytes": C.rss_bytes(),
            "train_seconds": seconds}


def run_variant(world: int, parallelism: str, layers: int, steps: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1" if world > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    out = Path(tempfile.mkdtemp(prefix="pocl-fsdp-bench-out-"))
    worker_args = [__file__, "--worker", parallelism, str(layers), str(steps), str(out)]
    if world == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               *worker_args]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=ARCH["num_hidden_layers"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers, 1 step")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", nargs=4, metavar=("PARALLELISM", "LAYERS", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        parallelism, layers, steps, out = args.worker
        result = worker(parallelism, int(layers), int(steps))
        Path(out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        return
    if args.quick:
        args.layers, args.steps = 4, 2
    t0 = time.time()
    result = {"generated": C.now(), "command": " ".join(["python", "benchmarks/fsdp_memory.py", *sys.argv[1:]]),
              "machine": C.machine(), "versions": C.versions(), "load_before": C.load(),
              "student": dict(ARCH, num_hidden_layers=args.layers), "batch": BATCH, "length": LENGTH,
              "steps": args.steps, "variants": {}}
    for name, world, parallelism in (("whole_1_process", 1, "ddp"), ("fsdp2_2_processes", 2, "fsdp2")):
        result["variants"][name] = run_variant(world, parallelism, args.layers, args.steps)
        for r in result["variants"][name]:
            print(f"{name} rank {r['rank']}: params+grads+AdamW {r['params_grads_optimizer_bytes'] / 2**20:.0f} MiB "
                  f"(params {r['param_bytes'] / 2**20:.0f}, grads {r['grad_bytes'] / 2**20:.0f}, AdamW "
                  f"{r['optimizer_bytes'] / 2**20:.0f}); peak RSS of the steps {r['peak_rss_steps_bytes'] / 2**20:.0f} "
                  f"MiB", flush=True)
    whole = result["variants"]["whole_1_process"][0]["params_grads_optimizer_bytes"]
    sharded = max(r["params_grads_optimizer_bytes"] for r in result["variants"]["fsdp2_2_processes"])
    result["sharded_over_whole"] = sharded / whole
    rss_whole = result["variants"]["whole_1_process"][0]["peak_rss_steps_bytes"]
    rss_sharded = max(r["peak_rss_steps_bytes"] for r in result["variants"]["fsdp2_2_processes"])
    result["peak_rss_sharded_over_whole"] = rss_sharded / rss_whole
    print(f"params+grads+AdamW per process: fsdp2 x2 / whole = {result['sharded_over_whole']:.3f}; "
          f"peak RSS of the steps: {result['peak_rss_sharded_over_whole']:.3f}")
    result["load_after"] = C.load()
    result["wall_seconds"] = time.time() - t0
    C.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
