"""Batched generation: prompts grouped by length, left padding, KV cache, early stop at EOS.

Used by the difficulty measurer (near-greedy answers of the initial student) and by evaluation
(sampled answers over several seeds). Decoding settings are always passed explicitly, so a model's
own ``generation_config`` (SmolLM2 ships temperature 0.2, transformers defaults to top-k 50) never
changes the protocol silently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pocl.errors import ConfigError

log = logging.getLogger("pocl.generation")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """Decoding settings (defaults: the evaluation protocol of the POCL spec, section 5)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"decoding temperature must be > 0 when sampling (got {self.temperature}); "
                              "use greedy decoding instead")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ConfigError("top_k and no_repeat_ngram_size must be >= 0")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be > 0 (got {self.max_new_tokens})")

    @classmethod
    def greedy(cls, **kw) -> "DecodingConfig":
        return cls(do_sample=False, **kw)

    def to_hf(self, *, eos_token_id: int, pad_token_id: int):
        from transformers import GenerationConfig

        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      no_repeat_ngram_size=self.no_repeat_ngram_size or None,
                      repetition_penalty=self.repetition_penalty, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, num_beams=1, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        return GenerationConfig(**kwargs)


@dataclasses.dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS and anything after it removed
    text: str
    stopped_at_eos: bool


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so an out-of-memory error
    shows up in the first batch rather than after an hour). Deterministic: ties by index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` input ids and attention mask with the prompts right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError("cannot generate from an empty prompt")
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], decoding: DecodingConfig, *,
             batch_size: int = 16, seed: int = 0, progress: Callable[[int], None] | None = None,
             batch_plan: Sequence[tuple[int, Sequence[int]]] | None = None) -> list[Generation]:
    """Generate one answer per prompt (token ids). Results come back in the order of ``prompts``.

    Each batch re-seeds the RNG with ``seed`` and the batch's index, so a run with the same
    prompts, batch size and seed is reproducible. ``progress(n)`` is called after each batch with
    the number of prompts done in it.

    ``batch_plan`` (``[(batch_index, prompt_indices), ...]``) replaces the default length-sorted
    batches; prompts not in the plan get ``None``. Processes that share the work of one pass each
    take a part of the same plan (``length_sorted_batches``), so every batch has the same
    composition and seed as in a single-process pass and gives the same answers.
    """
    if batch_size <= 0:
        raise ConfigError(f"generation batch size must be > 0 (got {batch_size})")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    hf_config = decoding.to_hf(eos_token_id=eos, pad_token_id=pad)
    was_training = model.training
    model.eval()
    results: list[Generation | None] = [None] * len(prompts)
    try:
        if batch_plan is None:
            batch_plan = list(enumerate(length_sorted_batches([len(p) for p in prompts], batch_size)))
        for b, batch in batch_plan:
            ids, mask = left_pad([prompts[i] for i in batch], pad, device)
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config)
            new = out[:, ids.shape[1]:].tolist()
            for row, i in enumerate(batch):
                tokens = new[row]
                stopped = eos in tokens
                if stopped:
                    tokens = tokens[:tokens.index(eos)]
                else:
                    # Sequences that finished early are padded by generate; strip the padding only
                    # when pad differs from EOS (otherwise it was handled above).
                    while tokens and tokens[-1] == pad and pad != eos:
                        tokens.pop()
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                results[i] = Generation(tokens, text, stopped)
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_texts(model, tokenizer, prompts, decoding, **kw) -> tuple[list[str], float]:
    """Convenience: texts plus the wall time in seconds."""
    t0 = time.perf_counter()
    gens = generate(model, tokenizer, prompts, decoding, **kw)
    return [g.text for g in gens], time.perf_counter() - t0
