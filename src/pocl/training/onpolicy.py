"""On-policy distillation (GKD) and the replay buffer of student samples.

On an *on-policy* optimizer step the student samples a response for every prompt of the step's
window, and the step trains on those sequences: the teacher scores the student's tokens, exactly
like a reference response in a teacher-forced step (Agarwal et al. 2024, "On-policy distillation of
language models", the GKD of the POCL spec). This module holds the pieces the trainer uses:

* :func:`step_uniforms` -- the per-step random numbers that decide whether a step is on-policy and
  whether it reuses the replay buffer. They are a pure function of (seed, stage, step): the same on
  every process, the same after a resume, and they never touch the global RNGs.
* :func:`generated_sample` -- turns a prompt and a generation into a :class:`TokenizedSample` with
  exactly the layout of teacher-forced data: prompt tokens (labels -100) + generated tokens
  (targets) + EOS when the student stopped (a target; no EOS when it hit the token limit). Labels
  are aligned with ``input_ids`` (the engine shifts by one), so position i predicts token i + 1 on
  generated data as on references -- the authors' code is off by one here.
* :func:`sample_responses` -- batched generation (``pocl.generation.generate``: left padding, KV
  cache) with a per-step seed, inside ``torch.random.fork_rng`` so that the global torch RNG stream
  is left exactly as it was.
* :class:`ReplayBuffer` -- DistiLLM's adaptive off-policy buffer: fresh samples are added (oldest
  dropped at capacity); a reuse step trains on samples drawn from it. Draws are seeded by (seed,
  stage, step, process), so the buffer has no RNG state: its contents are its whole state, saved
  in every checkpoint (``replay_buffer.json``).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from pocl.data import IGNORE_INDEX, TokenizedSample
from pocl.generation import DecodingConfig, Generation, generate

__all__ = ["ReplayBuffer", "generated_sample", "sample_responses", "step_uniforms", "stream_seed"]

REPLAY_FILE = "replay_buffer.json"


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (sha256 of their text): independent streams by name."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_uniforms(seed: int, stage_index: int, stage_name: str, stage_step: int) -> tuple[float, float]:
    """Two uniform numbers in [0, 1) for one optimizer step: (on-policy draw, replay draw).

    The step is on-policy when the first is < lambda_on; it reuses the buffer when the second is <
    ``replay_reuse_prob``. A pure function of its arguments (no global RNG is read or advanced)."""
    digest = hashlib.sha256(f"on-policy/{seed}/{stage_index}/{stage_name}/{stage_step}".encode()).digest()
    a = int.from_bytes(digest[:8], "little") >> 11  # 53 random bits
    b = int.from_bytes(digest[8:16], "little") >> 11
    return a / float(1 << 53), b / float(1 << 53)


def generated_sample(base: TokenizedSample, generation: Generation, *, eos_token_id: int,
                     max_length: int) -> TokenizedSample:
    """``base``'s prompt + the generated response as a training sample.

    ``input_ids = prompt + generated (+ EOS if the student stopped)`` and ``labels = [-100] * len(prompt)
    + generated (+ EOS)``: labels aligned with ``input_ids`` like :func:`pocl.data.tokenize_records`
    makes them, so the engine's shift gives each position the *next* token as its target. A
    response longer than ``max_length - len(prompt)`` is cut and then has no EOS (it did not end there).
    """
    prompt = list(base.input_ids[:base.prompt_length])
    response = list(generation.token_ids)
    if generation.stopped_at_eos:
        response.append(int(eos_token_id))
    room = max(max_length - len(prompt), 0)
    cut = len(response) > room
    if cut:
        response = list(generation.token_ids)[:room]
    return TokenizedSample(id=base.id, input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response,
                           prompt_length=len(prompt), prompt_truncated=base.prompt_truncated,
                           response_truncated=cut or not generation.stopped_at_eos)


def sample_responses(model: torch.nn.Module, tokenizer, samples: Sequence[TokenizedSample], *,
                     decoding: DecodingConfig, seed: int, batch_size: int, max_length: int) -> list[TokenizedSample]:
    """The student's responses to the prompts of ``samples`` as training samples (same order).

    The global torch RNG state is saved and restored around generation (``fork_rng``), so an
    on-policy step consumes nothing from the stream that the rest of training sees."""
    if not samples:
        return []
    prompts = [list(s.input_ids[:s.prompt_length]) for s in samples]
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        gens = generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seed=seed % (1 << 31))
    return [generated_sample(s, g, eos_token_id=tokenizer.eos_token_id, max_length=max_length)
            for s, g in zip(samples, gens)]


def _to_json(s: TokenizedSample) -> dict[str, Any]:
    return {"id": s.id, "input_ids": list(s.input_ids), "labels": list(s.labels), "prompt_length": s.prompt_length,
            "prompt_truncated": s.prompt_truncated, "response_truncated": s.response_truncated}


def _from_json(d: dict[str, Any]) -> TokenizedSample:
    return TokenizedSample(id=d["id"], input_ids=list(d["input_ids"]), labels=list(d["labels"]),
                           prompt_length=int(d["prompt_length"]), prompt_truncated=bool(d["prompt_truncated"]),
                           response_truncated=bool(d["response_truncated"]))


class ReplayBuffer:
    """A bounded FIFO of student-generated training samples (one per process).

    ``push`` adds fresh samples (the oldest are dropped beyond ``capacity``); ``draw(n, seed)``
    returns n samples chosen uniformly without replacement (with replacement when the buffer holds
    fewer than n), seeded by ``seed`` only. ``fresh_steps`` counts the steps that pushed samples:
    it is the same on every process, so decisions based on it agree across processes."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0 (got {capacity})")
        self.capacity = int(capacity)
        self.samples: deque[TokenizedSample] = deque(maxlen=self.capacity)
        self.fresh_steps = 0

    def __len__(self) -> int:
        return len(self.samples)

    def push(self, samples: Sequence[TokenizedSample]) -> None:
        self.samples.extend(samples)
        self.fresh_steps += 1

    def draw(self, n: int, seed: int) -> list[TokenizedSample]:
        if n <= 0:
            return []
        if not self.samples:
            raise ValueError("cannot draw from an empty replay buffer")
        rng = random.Random(seed)
        if len(self.samples) >= n:
            picks = rng.sample(range(len(self.samples)), n)
        else:
            picks = [rng.randrange(len(self.samples)) for _ in range(n)]
        return [self.samples[i] for i in picks]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "fresh_steps": self.fresh_steps,
                "samples": [_to_json(s) for s in self.samples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the contents (a smaller capacity keeps the newest samples)."""
        self.samples = deque((_from_json(d) for d in state.get("samples", [])), maxlen=self.capacity)
        self.fresh_steps = int(state.get("fresh_steps", 0))
