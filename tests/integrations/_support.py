"""Helpers of the integration tests: training arguments, recording what every optimizer step trained
on, and the expected curriculum order computed from its definition."""

from __future__ import annotations

import math

import torch

from pocl.config import CurriculumConfig

MICRO, ACCUM = 2, 2  # 4 samples per optimizer step
STEP = MICRO * ACCUM
LR = 1e-3


def curriculum_config(**kw) -> CurriculumConfig:
    return CurriculumConfig(curriculum="pocl", **kw)


def training_args(out, **kw):
    from transformers import TrainingArguments

    values = {"output_dir": str(out), "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
              "learning_rate": LR, "lr_scheduler_type": "cosine", "warmup_steps": 0, "seed": 0, "data_seed": 0,
              "report_to": "none", "use_cpu": True, "save_strategy": "no", "logging_strategy": "no",
              "remove_unused_columns": False, "disable_tqdm": True, "dataloader_num_workers": 0,
              "max_grad_norm": 1.0, "weight_decay": 0.0}
    values.update(kw)
    return TrainingArguments(**values)


def record_steps(trainer, knobs):
    """Wrap ``trainer.compute_loss`` (on the instance) to record, per micro-batch: the optimizer step, the
    pocl ids of the batch, the knob values, the learning rate and the optimizer's state size."""
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        from pocl.integrations import PoclCollator

        ids = PoclCollator.pop_ids(inputs)
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        seen.append({"step": trainer.state.global_step, "ids": list(ids),
                     "lr": trainer.optimizer.param_groups[0]["lr"], "opt_state": len(inner.state),
                     **{k: getattr(trainer, k, None) for k in knobs}})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


def per_step(seen):
    """{step: the ids of that optimizer step (micro-batches joined)} and {step: the first record}."""
    ids, first = {}, {}
    for r in seen:
        ids.setdefault(r["step"], []).extend(r["ids"])
        first.setdefault(r["step"], r)
    return ids, first


def expected_stream(ranked, sizes, steps, seed):
    """The order the curriculum must produce, computed here from its definition: stage s (0-based) trains
    on the easiest sizes[s] ranked ids; its samples are per-epoch permutations seeded by
    stream_seed(seed, s, f"stage{s+1}", epoch), concatenated; step j of the stage takes STEP of them."""
    from pocl.training.stages import stream_seed

    out = []
    for s, (size, n_steps) in enumerate(zip(sizes, steps)):
        pool = ranked[:size]
        stream = []
        epoch = 0
        while len(stream) < n_steps * STEP:
            gen = torch.Generator().manual_seed(stream_seed(seed, s, f"stage{s + 1}", epoch))
            stream += [pool[i] for i in torch.randperm(size, generator=gen).tolist()]
            epoch += 1
        out += [(s, stream[j * STEP:(j + 1) * STEP]) for j in range(n_steps)]
    return out


def cosine(j, n):
    return LR * 0.5 * (1 + math.cos(math.pi * j / n))
