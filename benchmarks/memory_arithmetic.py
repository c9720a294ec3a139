"""Memory arithmetic of a distillation step: what fits where, for common teacher -> student pairs.

Pure arithmetic from published architecture hyper-parameters (nothing is downloaded or run), so
that docs/distributed.md's tables can be regenerated:

    python benchmarks/memory_arithmetic.py            # prints the Markdown and writes results/memory_arithmetic.{json,md}

The per-token activation formula is Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"), bf16, with a fused attention kernel (SDPA / flash: no L x L score
matrix kept): about 34 * H bytes per token per layer without activation checkpointing and
2 * H bytes per token per layer (the layer inputs) with it, plus one layer's full activations
during the recomputation. The loss-chunk term is pocl's fused loss: about 16 float32 tensors of
chunk_size x vocabulary alive at the peak (measured in tests/losses/test_engine.py's memory test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pocl.losses import auto_chunk_size

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    gated_mlp: bool = True  # SwiGLU (3 matrices) vs GELU MLP (2)

    @property
    def params(self) -> int:
        h, kv_dim = self.hidden, self.hidden // self.heads * self.kv_heads
        attention = 2 * h * h + 2 * h * kv_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.layers * (attention + mlp + 2 * h) + embeddings + h


# Hyper-parameters from the models' published config.json files.
ARCHS = {
    "gpt2-xl": Arch("GPT-2 XL", 50257, 1600, 48, 25, 25, 6400, True, gated_mlp=False),
    "gpt2": Arch("GPT-2 base", 50257, 768, 12, 12, 12, 3072, True, gated_mlp=False),
    "llama2-7b": Arch("Llama-2-7B", 32000, 4096, 32, 32, 32, 11008, False),
    "tinyllama": Arch("TinyLlama-1.1B", 32000, 2048, 22, 32, 4, 5632, False),
    "qwen2.5-7b": Arch("Qwen2.5-7B", 152064, 3584, 28, 28, 4, 18944, False),
    "qwen2.5-1.5b": Arch("Qwen2.5-1.5B", 151936, 1536, 28, 12, 2, 8960, True),
    "qwen2.5-0.5b": Arch("Qwen2.5-0.5B", 151936, 896, 24, 14, 2, 4864, True),
    "smollm2-135m": Arch("SmolLM2-135M", 49152, 576, 30, 9, 3, 1536, True),
    "smollm2-10l": Arch("SmolLM2-135M, every 3rd layer", 49152, 576, 10, 9, 3, 1536, True),
}

PAIRS = [("llama2-7b", "tinyllama"), ("qwen2.5-7b", "qwen2.5-1.5b"), ("qwen2.5-7b", "qwen2.5-0.5b"),
         ("gpt2-xl", "gpt2"), ("smollm2-135m", "smollm2-10l")]


def step_memory(teacher: Arch, student: Arch, *, micro_batch: int, length: int, chunk: int,
                checkpointing: bool, lora: bool) -> dict[str, float]:
    """GiB per device for one process holding everything (DDP): the baseline that FSDP/ZeRO divide."""
    tokens = micro_batch * length
    out = {}
    out["teacher_weights_bf16"] = teacher.params * 2 / GIB
    if lora:
        # frozen bf16 base, trainable adapters (rank 16 on every linear layer: negligible here)
        out["student_weights"] = student.params * 2 / GIB
        out["student_grads_and_adam"] = 0.0
    else:
        out["student_weights"] = student.params * 4 / GIB  # float32 master weights
        out["student_grads_and_adam"] = student.params * 12 / GIB  # grad + Adam m, v in float32
    per_token_layer = (2 if checkpointing else 34) * student.hidden
    out["student_activations"] = per_token_layer * tokens * student.layers / GIB
    if checkpointing:
        out["student_activations"] += 34 * student.hidden * tokens / GIB  # the recomputed layer
    # teacher: no autograd graph; one layer's activations at a time plus its final hidden states
    out["teacher_activations"] = (34 * teacher.hidden * tokens + 2 * teacher.hidden * tokens) / GIB
    out["loss_chunk"] = 16 * chunk * student.vocab * 4 / GIB
    out["total"] = sum(out.values())
    return out


def build(micro_batch: int, length: int, chunk: int) -> dict:
    rows = []
    for t_key, s_key in PAIRS:
        t, s = ARCHS[t_key], ARCHS[s_key]
        pair_chunk = auto_chunk_size(chunk, s.vocab)  # what the trainer uses (0: chosen from the vocabulary)
        for lora in (False, True):
            for ckpt in (False, True):
                mem = step_memory(t, s, micro_batch=micro_batch, length=length, chunk=pair_chunk,
                                  checkpointing=ckpt, lora=lora)
                rows.append({"teacher": t.name, "student": s.name, "teacher_params": t.params,
                             "student_params": s.params, "lora": lora, "checkpointing": ckpt,
                             "chunk_size": pair_chunk, **mem})
    return {"micro_batch": micro_batch, "length": length, "chunk_size": chunk, "rows": rows}


def markdown(result: dict) -> str:
    chunk = result["chunk_size"]
    lines = [f"Micro-batch {result['micro_batch']} x length {result['length']}, loss chunk "
             f"{'chosen from the vocabulary (--chunk-size 0, the default)' if chunk == 0 else f'{chunk} tokens'}; "
             "GiB per process with everything replicated (DDP).", "",
             "| teacher → student | student training | act. ckpt | teacher bf16 | student weights | grads + Adam "
             "| student act. | teacher act. | loss chunk (tokens) | **total** |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['teacher']} ({r['teacher_params'] / 1e9:.2f}B) → {r['student']} ({r['student_params'] / 1e9:.3f}B) "
            f"| {'LoRA, bf16 base' if r['lora'] else 'full, fp32 master'} | {'yes' if r['checkpointing'] else 'no'} "
            f"| {r['teacher_weights_bf16']:.1f} | {r['student_weights']:.1f} | {r['student_grads_and_adam']:.1f} "
            f"| {r['student_activations']:.1f} | {r['teacher_activations']:.2f} | {r['loss_chunk']:.2f} ({r['chunk_size']}) "
            f"| **{r['total']:.1f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=0, help="0: chosen from the vocabulary, as the trainer does")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_arithmetic"))
    args = p.parse_args()
    result = build(args.micro_batch, args.length, args.chunk_size)
    md = markdown(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
