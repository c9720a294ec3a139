"""Speculative KD sampling where the models cost almost nothing: how much of a call is the sampler's own work.

    OMP_NUM_THREADS=1 python benchmarks/skd_overhead.py        # about 1 minute; -> results/skd_overhead.json

Random tiny Llama models (teacher 6 x 128, student 2 x 64) with SmolLM2's vocabulary size (49 152), 8 random
prompts of 20-60 tokens, 96 new tokens, the official SKD settings (gamma 5, top-K 25, T = 1), float32, one
thread. Random models accept almost no draft, so every block costs 5 student steps and 1 teacher pass for one
kept token: the regime of a GPU, where a small model's forward pass is bound by kernel launches and Python,
not by arithmetic. Reported: seconds per ``speculative_generate`` call; the seconds of the same number of draws
done as the sampler does them now (``sample_rows``: one batched inverse-CDF draw of 8 rows per step, one float64
uniform per row) and as it did them before 2026-12-05 (one ``torch.multinomial`` per row over the full
vocabulary, one exponential per entry), each as a share of the call. Minimum over ``--repeats`` calls.
``results/skd_overhead_multinomial.json`` is the run of the old sampler (its call still drew by multinomial).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

VOCAB = 49152


def tiny_llama(hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class _Tokenizer:  # what speculative_generate reads: the special ids and decode
    eos_token_id, pad_token_id = 2, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def main(argv=None) -> int:
    import torch

    from pocl.training.speculative import (
        SpeculativeSettings,
        sample_rows,
        speculative_generate,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(C.RESULTS / "skd_overhead.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, student = tiny_llama(128, 6, 0), tiny_llama(64, 2, 1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 60, (8,), generator=g)]
    settings = SpeculativeSettings(max_new_tokens=96)
    calls = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        out, stats = speculative_generate(student, teacher, _Tokenizer(), prompts, settings, seed=i, batch_size=8)
        calls.append({"seconds": time.perf_counter() - t0, "new_tokens": sum(len(o.token_ids) for o in out),
                      "drafted": stats.drafted, "accepted": stats.accepted, "replaced": stats.replaced,
                      "blocks": stats.blocks})
    best = min(calls, key=lambda c: c["seconds"])
    draws = best["drafted"] + best["replaced"]  # one multinomial per drafted token and per replacement
    probs = torch.softmax(torch.randn(8, VOCAB, generator=g), -1)
    gens = [torch.Generator().manual_seed(s) for s in range(8)]
    times, batched = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for k in range(draws):
            torch.multinomial(probs[k % 8], 1, generator=gens[k % 8])
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(-(-draws // 8)):
            sample_rows(probs, gens)
        batched.append(time.perf_counter() - t0)
    result = {"date": C.now(), "machine": C.machine(), "versions": C.versions(), "git": C.git_state(),
              "load_average": C.load(), "settings": {"vocab": VOCAB, "teacher": "6 x 128", "student": "2 x 64",
                                                    "prompts": 8, "max_new_tokens": 96, "gamma": 5, "top_k": 25,
                                                    "threads": args.threads, "repeats": args.repeats},
              "calls": calls, "call_seconds_min": best["seconds"], "multinomial_draws": draws,
              "multinomial_seconds_min": min(times), "multinomial_share_of_call": min(times) / best["seconds"],
              "sample_rows_calls": -(-draws // 8), "sample_rows_seconds_min": min(batched),
              "sample_rows_share_of_call": min(batched) / best["seconds"], "doc": __doc__}
    C.write_json(Path(args.output), result)
    print(f"SKD call {best['seconds']:.2f} s ({best['new_tokens']} new tokens, {best['blocks']} blocks, "
          f"{best['accepted']}/{best['drafted']} drafts kept); {draws} per-row multinomial draws alone "
          f"{min(times):.2f} s = {min(times) / best['seconds']:.0%} of the call; the same draws by sample_rows "
          f"(8 rows a call) {min(batched):.2f} s = {min(batched) / best['seconds']:.0%} -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
