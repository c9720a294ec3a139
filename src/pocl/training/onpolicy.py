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
* :class:`OnPolicySchedule` -- what the trainer asks: the stage's on-policy fraction, the kind of
  each step (teacher-forced, fresh samples, replay), the step's samples and the run's GKD counters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from pocl.data import IGNORE_INDEX, TokenizedSample
from pocl.errors import ConfigError
from pocl.generation import DecodingConfig, Generation, generate
from pocl.model_checks import first_nonfinite_tensor
from pocl.training.stages import Stage, stream_seed

__all__ = ["OnPolicySchedule", "ReplayBuffer", "generated_sample", "sample_responses", "step_uniforms",
           "stream_seed"]

REPLAY_FILE = "replay_buffer.json"


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
    """A sample as JSON (the replay buffer's checkpoint file)."""
    return {"id": s.id, "input_ids": list(s.input_ids), "labels": list(s.labels), "prompt_length": s.prompt_length,
            "prompt_truncated": s.prompt_truncated, "response_truncated": s.response_truncated}


def _from_json(d: dict[str, Any]) -> TokenizedSample:
    """The sample :func:`_to_json` wrote."""
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
        """An empty buffer of at most ``capacity`` samples (> 0)."""
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0 (got {capacity})")
        self.capacity = int(capacity)
        self.samples: deque[TokenizedSample] = deque(maxlen=self.capacity)
        self.fresh_steps = 0

    def __len__(self) -> int:
        """The number of samples held."""
        return len(self.samples)

    def push(self, samples: Sequence[TokenizedSample]) -> None:
        """Add one fresh step's samples (the oldest are dropped beyond capacity); counts the step."""
        self.samples.extend(samples)
        self.fresh_steps += 1

    def draw(self, n: int, seed: int) -> list[TokenizedSample]:
        """``n`` samples chosen by ``seed`` alone (without replacement when the buffer holds n or more)."""
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
        """The whole state as JSON: capacity, fresh-step count and the samples, oldest first."""
        return {"capacity": self.capacity, "fresh_steps": self.fresh_steps,
                "samples": [_to_json(s) for s in self.samples]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the contents (a smaller capacity keeps the newest samples)."""
        self.samples = deque((_from_json(d) for d in state.get("samples", [])), maxlen=self.capacity)
        self.fresh_steps = int(state.get("fresh_steps", 0))


class OnPolicySchedule:
    """The on-policy (GKD) side of a run: which steps train on the student's own samples, those samples,
    the replay buffer and the run's counters (``TrainState.on_policy_steps`` and friends).

    ``config`` is the run's :class:`pocl.config.DistillConfig`; ``stages`` the stages as trained (a
    CE-only method's with alpha 0). Refuses (ConfigError) on-policy stages that cannot work: without
    ``loss.method kd``, without a teacher, or with nothing to train on (alpha 0 and no on-policy CE)."""

    def __init__(self, config, stages: Sequence[Stage], *, has_teacher: bool):
        """Check the on-policy stages and create the replay buffer when one is configured and used."""
        self.cfg = config
        self.stages = list(stages)
        lc = config.loss
        for stage in self.stages:
            if self.fraction(stage) <= 0:
                continue
            where = f"stage '{stage.name}': on_policy_fraction {self.fraction(stage):g}"
            if not lc.distills:
                raise ConfigError(f"{where}: on-policy steps need loss.method kd, taid or skd (not {lc.method})")
            if not has_teacher:
                raise ConfigError(f"{where}: on-policy steps need a teacher to score the student's samples")
            if stage.alpha == 0 and not lc.on_policy_ce:
                raise ConfigError(f"{where} with alpha 0 and loss.on_policy_ce off: on-policy steps would train on "
                                  "nothing (give the stage alpha > 0, or turn on_policy_ce on)")
        #: this process's replay buffer (None: no replay, or no on-policy stage)
        self.replay = ReplayBuffer(lc.replay_buffer_size) if (
            lc.replay_buffer_size > 0 and any(self.fraction(s) > 0 for s in self.stages)) else None

    def fraction(self, stage: Stage) -> float:
        """The stage's on-policy fraction lambda_on (the loss config's when the stage has none: its
        ``skd_fraction`` for ``--method skd``, whose on-policy steps are the speculative ones)."""
        if stage.on_policy_fraction is not None:
            return stage.on_policy_fraction
        lc = self.cfg.loss
        return lc.skd_fraction if lc.method == "skd" else lc.on_policy_fraction

    def speculative_settings(self):
        """The sampler settings of ``--method skd`` (:class:`pocl.training.speculative.SpeculativeSettings`)."""
        from pocl.training.speculative import SpeculativeSettings

        lc = self.cfg.loss
        return SpeculativeSettings(gamma=lc.skd_gamma, top_k=lc.skd_top_k, top_p=lc.skd_top_p,
                                   top_k_end=lc.skd_top_k_end, temperature=lc.on_policy_temperature,
                                   teacher_temperature=lc.skd_teacher_temperature,
                                   max_new_tokens=lc.on_policy_max_new_tokens)

    def kind(self, stage_index: int, stage_step: int) -> str | None:
        """None (a teacher-forced step on the references), "fresh" (the student generates now) or
        "replay" (samples drawn from the replay buffer): a pure function of (seed, stage, step) and of
        the number of fresh steps so far, hence the same on every process and after a resume."""
        stage = self.stages[stage_index]
        lam = self.fraction(stage)
        if lam <= 0:
            return None
        u_on, u_replay = step_uniforms(self.cfg.train.seed, stage_index, stage.name, stage_step)
        if u_on >= lam:
            return None
        if self.replay is not None and self.replay.fresh_steps > 0 and u_replay < self.cfg.loss.replay_reuse_prob:
            return "replay"
        return "fresh"

    @staticmethod
    def unsampleable(student: torch.nn.Module) -> str | None:
        """Why ``student`` cannot sample now (non-finite weights: torch.multinomial fails on NaN
        probabilities), or None."""
        bad = first_nonfinite_tensor(student)
        if bad is None:
            return None
        return f"the student's weights are not finite ({bad.describe()}); no on-policy samples generated"

    def samples(self, local: list[TokenizedSample], kind: str, stage_index: int, stage_step: int, *,
                student: torch.nn.Module, tokenizer, accelerator, state, autocast=None,
                teacher: torch.nn.Module | None = None) -> list[TokenizedSample]:
        """This process's share of an on-policy window: student responses to the prompts of ``local``
        (fresh; pushed to the replay buffer), or as many samples drawn from its replay buffer (replay).
        With ``--method skd`` the fresh responses are speculative: the student drafts and ``teacher`` (the
        stage's) keeps or replaces (:func:`pocl.training.speculative.speculative_generate`; the counts go
        to ``state.skd``). Adds the generation time to ``state.generation_seconds``. ``autocast``: the
        context of the run's model passes (default: accelerate's)."""
        lc = self.cfg.loss
        stage = self.stages[stage_index]
        seed = stream_seed(self.cfg.train.seed, kind, stage_index, stage.name, stage_step, accelerator.process_index)
        if kind == "replay" and self.replay is not None and len(self.replay) > 0:
            return self.replay.draw(len(local), seed)
        decoding = DecodingConfig(do_sample=True, temperature=lc.on_policy_temperature, top_p=lc.on_policy_top_p,
                                  top_k=0, no_repeat_ngram_size=0, max_new_tokens=lc.on_policy_max_new_tokens)
        t0 = time.perf_counter()
        with (autocast or accelerator.autocast)():
            if lc.method == "skd":
                fresh = self._speculative(local, student=student, teacher=teacher, tokenizer=tokenizer, seed=seed,
                                          state=state)
            else:
                fresh = sample_responses(student, tokenizer, local, decoding=decoding, seed=seed,
                                         batch_size=self.cfg.train.micro_batch_size,
                                         max_length=self.cfg.data.max_length)
        state.generation_seconds += time.perf_counter() - t0
        if self.replay is not None and kind == "fresh":
            # (A "replay" step that found this process's buffer empty generated instead; its samples are
            # not added, so that fresh_steps, which the decisions read, stays equal on every process.)
            self.replay.push(fresh)
        return fresh

    def _speculative(self, local: list[TokenizedSample], *, student, teacher, tokenizer, seed: int,
                     state) -> list[TokenizedSample]:
        """Speculative KD samples for the prompts of ``local`` (their counts added to ``state.skd``)."""
        from pocl.training.speculative import SpeculativeStats, speculative_generate

        if teacher is None:
            raise ConfigError("loss.method skd: the speculative samples need the teacher")
        prompts = [list(s.input_ids[:s.prompt_length]) for s in local]
        with torch.random.fork_rng(devices=[]):  # the sampler uses its own generators; belt and braces
            gens, stats = speculative_generate(student, teacher, tokenizer, prompts, self.speculative_settings(),
                                               seed=seed % (1 << 31), batch_size=self.cfg.train.micro_batch_size)
        total = SpeculativeStats(**(state.skd or {}))
        total.add(stats)
        state.skd = dataclasses.asdict(total)
        return [generated_sample(s, g, eos_token_id=tokenizer.eos_token_id, max_length=self.cfg.data.max_length)
                for s, g in zip(local, gens)]

    @staticmethod
    def count(kind: str, state) -> None:
        """Count one on-policy step of ``kind`` in the run's and the stage's counters of ``state``."""
        state.on_policy_steps += 1
        state.stage_on_policy_steps += 1
        if kind == "replay":
            state.replayed_steps += 1
            state.stage_replayed_steps += 1
