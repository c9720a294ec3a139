"""The worker processes of ``step_vs_trl.py``: one variant of one distillation step per process.

Not a benchmark itself: ``step_vs_trl.py --worker NAME`` runs :func:`run_worker` in a fresh process (pocl's
environment, or the TRL environment for the TRL variants) and reads back the JSON it writes. Every worker builds
the same random-initialised models and batch, runs ``--steps + 1`` optimizer steps (the first untimed) and
returns the intervals between the ends of consecutive optimizer steps, the RSS before step 1 and, where it
applies, a per-phase breakdown, the kernel-compile time and the teacher-cache build time.

``--precision bf16`` runs every variant's model passes under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(pocl's trainer: ``model.mixed_precision: bf16``, i.e. accelerate's autocast; TRL: ``GKDConfig(bf16=True)``);
the weights and the optimizer stay float32. A forward pre-hook on the first decoder layer of each model records
whether autocast was really on when that model ran (``autocast_seen``), so the JSON says what each variant did.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import _common as C

TEACHER = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8)
STUDENT = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
LAMBDA = 0.9        # pocl's jsd lambda: m = (1 - lambda) p + lambda q
TRL_BETA = 1 - LAMBDA  # TRL's beta is on the teacher: m = beta p + (1 - beta) q
LR = 1e-4
PAD, EOS = 0, 1
#: The floor's loss: a trivial function of both models' full logits (the teacher's term is 0 but is computed, so
#: the teacher's LM head over all positions runs as in a plain ``model(...)`` call and its output is used).
FLOOR_LOSS = "student_logits.float().mean() + 0 * teacher_logits.sum()"


# ---------------------------------------------------------------------------------------------- shared setup
def build_models(vocab: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(arch, s):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD, **arch)
        return LlamaForCausalLM(cfg)

    teacher, student = make(TEACHER, seed), make(STUDENT, seed + 1)
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    return teacher, student


def make_samples(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` sequences of exactly ``length`` tokens; a prompt of 25-50 % of the length (labels -100), the rest the
    response (labels = the tokens; the last token is EOS)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(2, vocab) for _ in range(length - 1)] + [EOS]
        prompt = rng.randint(length // 4, length // 2)
        out.append({"id": f"s{i}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt})
    return out


def collate(samples: list[dict]):
    import torch

    ids = torch.tensor([s["input_ids"] for s in samples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([s["labels"] for s in samples])}


def target_tokens(samples: list[dict]) -> int:
    return sum(sum(1 for x in s["labels"][1:] if x != -100) for s in samples)


def precision(args):
    """The autocast context of ``--precision`` around model passes: bf16 autocast on CPU, or nothing (fp32)."""
    import torch

    if getattr(args, "precision", "fp32") == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class AutocastProbe:
    """Records, per model, whether CPU autocast was on (and its dtype) when its first decoder layer ran."""

    def __init__(self, **models):
        import torch

        self.seen: dict[str, set] = {name: set() for name in models}

        def hook(name):
            def pre(module, inputs):
                on = torch.is_autocast_enabled("cpu")
                self.seen[name].add(str(torch.get_autocast_dtype("cpu")).removeprefix("torch.") if on else "off")
            return pre

        for name, model in models.items():
            model.model.layers[0].register_forward_pre_hook(hook(name))

    def result(self) -> dict:
        return {name: sorted(v) for name, v in self.seen.items()}


class StepClock:
    """Times between the ends of consecutive optimizer steps."""

    def __init__(self):
        self.ends: list[float] = []
        self.rss_before: int | None = None

    def start(self) -> None:
        self.rss_before = C.rss_bytes()
        C.reset_peak_rss()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]

    def windows(self, samples: list[dict], batch: int):
        """The step windows of ``samples`` (``batch`` each); the clock starts just before the first."""
        for k in range(len(samples) // batch):
            if k == 0:
                self.start()
                self.tick()
            yield samples[k * batch:(k + 1) * batch]


# ---------------------------------------------------------------------------------------------- compile
def _dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters

        return {k: int(v) for k, v in counters["stats"].items()}
    except Exception:  # noqa: BLE001 (diagnostics only)
        return {}


def warm_kernels(args) -> dict:
    """Compile pocl's JSD terms kernel before the first step (POCL_COMPILE_KERNELS: auto compiles float32 math on CPU),
    on one [chunk, V] block inside the run's precision context, and time it: the compile time, reported apart
    from the steps. The dynamo counters before/after let the report check that no step recompiles."""
    import torch

    from pocl.losses import kernels, make_divergence

    n = _chunk(args)
    s, t = torch.randn(n, args.vocab), torch.randn(n, args.vocab)
    targets = torch.randint(0, args.vocab, (n,))
    before = _dynamo_stats()
    t0 = time.perf_counter()
    with precision(args):
        # The variant the steps run: T = 1, alpha = 1 (CE weight 0, so no CE gradient).
        kernels.chunk_terms(make_divergence("jsd", lam=LAMBDA), s, t, 1.0, targets, 0.0, 1.0)
    return {"mode": kernels.compile_mode(), "seconds": time.perf_counter() - t0, "shape": [n, args.vocab],
            "compile_failure": kernels._compile_failure, "cache_dir": str(kernels.kernel_cache_dir()),
            "dynamo_before": before, "dynamo_after_warmup": _dynamo_stats()}


# ---------------------------------------------------------------------------------------------- workers
def _chunk(args) -> int:
    """The chunk size pocl's trainer uses for this vocabulary (``--chunk-size 0``: its automatic choice)."""
    from pocl.losses import auto_chunk_size

    return auto_chunk_size(args.chunk_size, args.vocab, kernel=True)  # JSD with full teacher logits: the kernel path


def _pocl_trainer_run(args, samples, *, teacher_cache: str, method: str = "kd") -> dict:
    """pocl's real DistillTrainer; ``teacher_cache`` off (the live teacher at every step) or hidden (the exact
    cache, built by the trainer's ``prepare_teacher_cache()`` inside ``train()``, before the first step);
    ``method`` kd (JSD) or taid (TAID's own objective: no divergence, no temperature)."""
    from pocl.config import DistillConfig
    from pocl.data import TokenizationStats, TokenizedDataset, TokenizedSample
    from pocl.training.stages import Stage
    from pocl.training.trainer import DistillTrainer

    teacher, student = build_models(args.vocab)
    probe = AutocastProbe(teacher=teacher, student=student)
    data = TokenizedDataset([TokenizedSample(s["id"], s["input_ids"], s["labels"], s["prompt_length"]) for s in samples],
                            TokenizationStats())
    out_dir = tempfile.mkdtemp(prefix="pocl-step-bench-")
    config = DistillConfig.from_dict({
        "model": {"cpu": True, "mixed_precision": "bf16" if args.precision == "bf16" else "no"},
        "loss": {**({"divergence": "jsd", "jsd_lambda": LAMBDA, "temperature": 1.0} if method == "kd"
                    else {"method": method}), "alpha": 1.0, "chunk_size": args.chunk_size, "teacher_cache": teacher_cache, "teacher_cache_dtype": "float32",
                 "teacher_cache_dir": str(Path(out_dir) / "teacher_cache")},
        "optim": {"lr": LR, "min_lr": LR, "weight_decay": 0.0, "lr_schedule": "constant", "max_grad_norm": 1.0},
        "train": {"output_dir": out_dir, "batch_size": args.batch, "micro_batch_size": args.batch,
                  "seed": 0, "progress": False, "tensorboard": False, "log_every": 10**6, "save_every": 10**6,
                  "eval_every": 10**6},
    })
    clock = StepClock()

    class Tok:  # the trainer only reads pad_token_id during training
        pad_token_id = PAD
        eos_token_id = EOS

    trainer = DistillTrainer(config=config, student=student, tokenizer=Tok(), teacher=teacher, train_data=data,
                             dev_data=None, stages=[Stage(name="kd", max_steps=len(samples) // args.batch, alpha=1.0)],
                             vocab_size=args.vocab, fused=True, step_callbacks=[lambda tr: clock.tick()])
    first_step_seconds = []
    dyn = {}
    orig = trainer._train_step

    def step(*a, **k):
        if not clock.ends:
            dyn["before_step1"] = _dynamo_stats()
            clock.start()
            clock.tick()  # the first interval (step 1) is dropped below
            t0 = time.perf_counter()
            out = orig(*a, **k)
            first_step_seconds.append(time.perf_counter() - t0)
            return out
        if len(clock.ends) == 2:
            dyn["after_step1"] = _dynamo_stats()
        return orig(*a, **k)

    cache_build = {}
    orig_prepare = trainer.prepare_teacher_cache

    def prepare():
        t0 = time.perf_counter()
        orig_prepare()
        cache_build["seconds"] = time.perf_counter() - t0  # incl. the teacher fingerprint and opening the cache
        cache_build["info"] = trainer.summary_extra.get("teacher_cache")
        cache_build["train_signal"] = getattr(trainer.train_signal, "name", None)

    trainer._train_step = step
    trainer.prepare_teacher_cache = prepare
    trainer.save_checkpoint = lambda: None  # the end-of-stage checkpoint is outside the timed steps anyway
    trainer._save_model_folder = lambda tmp: None
    compile_info = warm_kernels(args)
    try:
        trainer.train()
    except Exception:
        pass  # writing the final folder is stubbed out; the steps are done
    dyn["end"] = _dynamo_stats()
    out = {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "autocast_seen": probe.result(),
           "first_step_seconds": first_step_seconds[0] if first_step_seconds else None, "kernel_compile": compile_info,
           "dynamo": dyn, "train_signal": getattr(trainer.train_signal, "name", None),
           "mixed_precision": trainer.accelerator.mixed_precision}
    if teacher_cache != "off":
        out["teacher_cache_build"] = cache_build
    return out


def worker_pocl_trainer(args, samples) -> dict:
    return _pocl_trainer_run(args, samples, teacher_cache="off")


def worker_pocl_taid(args, samples) -> dict:
    return _pocl_trainer_run(args, samples, teacher_cache="off", method="taid")


def worker_pocl_cache(args, samples) -> dict:
    return _pocl_trainer_run(args, samples, teacher_cache="hidden")


def _manual_step_setup(args):
    import torch

    from pocl.config import OptimConfig
    from pocl.training.optim import build_optimizer

    teacher, student = build_models(args.vocab)
    opt = build_optimizer(student, OptimConfig(lr=LR, weight_decay=0.0))
    torch.nn.Module.train(student)
    return teacher, student, opt


def worker_floor(args, samples) -> dict:
    """The model-only floor: teacher forward (no grad) and student forward + backward with full logits (both LM
    heads over all positions, a plain ``model(...)`` call), the trivial loss :data:`FLOOR_LOSS`, clipping, AdamW."""
    import torch

    teacher, student, opt = _manual_step_setup(args)
    probe = AutocastProbe(teacher=teacher, student=student)
    clock = StepClock()
    for window in clock.windows(samples, args.batch):
        batch = collate(window)
        with precision(args):
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).logits
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits
            loss = student_logits.float().mean() + 0 * teacher_logits.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        del teacher_logits, student_logits, loss
        clock.tick()
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "autocast_seen": probe.result(),
            "loss": FLOOR_LOSS}


def worker_pocl_manual(args, samples) -> dict:
    import torch

    from pocl.losses import fused_kd_loss, make_divergence, select_response_tokens
    from pocl.models import LMHead, hidden_states

    teacher, student, opt = _manual_step_setup(args)
    probe = AutocastProbe(teacher=teacher, student=student)
    div = make_divergence("jsd", lam=LAMBDA)
    t_head, s_head = LMHead.from_model(teacher, args.vocab), LMHead.from_model(student, args.vocab)
    compile_info = warm_kernels(args)
    clock = StepClock()
    phases: list[dict] = []
    for window in clock.windows(samples, args.batch):
        t = [time.perf_counter()]
        batch = collate(window)
        normalizer = target_tokens(window)
        t.append(time.perf_counter())
        with precision(args):
            with torch.no_grad():
                th, _ = select_response_tokens(hidden_states(teacher, batch["input_ids"], batch["attention_mask"]),
                                               batch["labels"])
            t.append(time.perf_counter())
            sh, targets = select_response_tokens(hidden_states(student, batch["input_ids"], batch["attention_mask"]),
                                                 batch["labels"])
            t.append(time.perf_counter())
            out = fused_kd_loss(sh, s_head.weight, s_head.bias, th, t_head.weight, t_head.bias, targets,
                                divergence=div, temperature=1.0, alpha=1.0, normalizer=normalizer,
                                vocab_size=args.vocab, chunk_size=_chunk(args))
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss.detach())
        t.append(time.perf_counter())
        clock.tick()
        names = ("data", "teacher_forward", "student_forward", "loss_with_heads", "backward", "optimizer")
        phases.append({n: b - a for n, a, b in zip(names, t, t[1:])})
    # The LM-head matrix products alone, as the fused loss runs them (chunks of chunk_size tokens, in the run's
    # precision): teacher head forward, student head forward, and the two products of its backward (d hidden,
    # d weight, accumulated in place as the fused loss does: addmm_ in float32, a product then += under autocast).
    head_seconds = []
    with torch.no_grad(), precision(args):
        n, cs = th.shape[0], _chunk(args)
        g = torch.randn(min(cs, n), args.vocab)
        grad_w = torch.zeros(args.vocab, sh.shape[-1])
        for _ in range(2):
            t0 = time.perf_counter()
            for s in range(0, n, cs):
                e = min(s + cs, n)
                th[s:e] @ t_head.weight.T
                sh[s:e].detach() @ s_head.weight.T
                g[: e - s] @ s_head.weight
                if args.precision == "bf16":
                    grad_w += g[: e - s].T @ sh[s:e].detach()
                else:
                    grad_w.addmm_(g[: e - s].T, sh[s:e].detach())
            head_seconds.append(time.perf_counter() - t0)
    # The per-chunk loss math alone, as the fused loss runs it: the compiled terms kernel (CE + JSD + the
    # weighted gradient) on each chunk's [rows, V] logits.
    from pocl.losses import kernels

    kernel_seconds = []
    with torch.no_grad():
        ls, lt = torch.randn(min(cs, n), args.vocab), torch.randn(min(cs, n), args.vocab)
        lt_targets = torch.randint(0, args.vocab, (min(cs, n),))
        for _ in range(2):
            t0 = time.perf_counter()
            for s in range(0, n, cs):
                e = min(s + cs, n)
                kernels.chunk_terms(div, ls[: e - s], lt[: e - s], 1.0, lt_targets[: e - s], 0.0, 1.0 / normalizer)
            kernel_seconds.append(time.perf_counter() - t0)
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "phases": phases[1:],
            "head_matmul_seconds": min(head_seconds), "terms_kernel_seconds": min(kernel_seconds), "loss_value_last": float(out.loss),
            "loss_dtype": str(out.loss.dtype), "autocast_seen": probe.result(), "kernel_compile": compile_info,
            "dynamo_end": _dynamo_stats()}


def worker_dense(args, samples) -> dict:
    import torch

    from pocl.losses import dense_kd_loss, make_divergence, select_response_tokens

    teacher, student, opt = _manual_step_setup(args)
    probe = AutocastProbe(teacher=teacher, student=student)
    div = make_divergence("jsd", lam=LAMBDA)
    clock = StepClock()
    phases: list[dict] = []
    for window in clock.windows(samples, args.batch):
        t = [time.perf_counter()]
        batch = collate(window)
        normalizer = target_tokens(window)
        t.append(time.perf_counter())
        with precision(args):
            with torch.no_grad():
                tl = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
                tsel, _ = select_response_tokens(tl, batch["labels"])
                del tl
            t.append(time.perf_counter())
            sl = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            ssel, targets = select_response_tokens(sl, batch["labels"])
            t.append(time.perf_counter())
            out = dense_kd_loss(ssel, tsel, targets, divergence=div, temperature=1.0, alpha=1.0,
                                normalizer=normalizer)
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss.detach())
        del sl, ssel, tsel, out
        t.append(time.perf_counter())
        clock.tick()
        names = ("data", "teacher_forward_with_head", "student_forward_with_head", "loss", "backward", "optimizer")
        phases.append({n: b - a for n, a, b in zip(names, t, t[1:])})
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "phases": phases[1:],
            "autocast_seen": probe.result()}


def worker_trl_chunked(args, samples) -> dict:
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    teacher, student, opt = _manual_step_setup(args)
    probe = AutocastProbe(teacher=teacher, student=student)
    clock = StepClock()
    for window in clock.windows(samples, args.batch):
        batch = collate(window)
        normalizer = target_tokens(window)
        with precision(args):
            with torch.no_grad():
                th = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).last_hidden_state[:, :-1]
            sh = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).last_hidden_state[:, :-1]
            mask = (batch["labels"][:, 1:] != -100).reshape(-1)
            # As DistillationTrainer does on devices without Triton: every position is projected, then masked.
            div, _ = ChunkedDivergenceFunction.apply(sh.reshape(-1, sh.shape[-1]), student.lm_head.weight, None,
                                                     th.reshape(-1, th.shape[-1]), teacher.lm_head.weight, None,
                                                     TRL_BETA, 1.0)
            loss = (div.float() * mask).sum() / normalizer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        clock.tick()
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "autocast_seen": probe.result()}


def _hf_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": PAD, "</s>": EOS, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _gkd_trainer(args, samples, teacher, student, out_dir: str, callbacks=()):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    bf16 = getattr(args, "precision", "fp32") == "bf16"
    ds = Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
    cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=len(samples) // args.batch, learning_rate=LR, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", warmup_steps=0,
                    logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                    bf16=bf16, fp16=False, dataloader_num_workers=0, seed=0, lmbda=0.0, beta=TRL_BETA,
                    seq_kd=False, temperature=1.0, max_length=args.length, disable_dropout=True)
    return GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                      data_collator=lambda rows: collate(rows), processing_class=_hf_tokenizer(args.vocab),
                      callbacks=list(callbacks))


def worker_trl_gkd(args, samples) -> dict:
    from transformers import TrainerCallback

    teacher, student = build_models(args.vocab)
    probe = AutocastProbe(teacher=teacher, student=student)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            clock.tick()

    trainer = _gkd_trainer(args, samples, teacher, student, tempfile.mkdtemp(prefix="trl-step-bench-"), [Clock()])
    trainer.train()
    dtypes = {"student_weights": str(next(trainer.model.parameters()).dtype),
              "teacher_weights": str(next(trainer.teacher_model.parameters()).dtype)}
    # ends[0] is the end of step 1; intervals from there on are steps 2..n
    return {"step_seconds": clock.intervals(), "rss_before": clock.rss_before, "autocast_seen": probe.result(),
            "weight_dtypes": dtypes, "accelerate_mixed_precision": str(trainer.accelerator.mixed_precision)}


def worker_verify(args, samples) -> dict:
    """Same models and batch: TRL's loss (as GKDTrainer.compute_loss calls it, and through the real trainer's
    compute_loss), TRL's chunked kernel, pocl's fused and dense losses; values and student gradients (float32)."""
    import torch
    from trl.experimental.gkd import GKDTrainer
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from pocl.losses import (
        dense_kd_loss,
        fused_kd_loss,
        make_divergence,
        select_response_tokens,
    )
    from pocl.models import LMHead, hidden_states

    args.precision = "fp32"
    teacher, student = build_models(args.vocab)
    batch = collate(samples[: args.batch])
    n_tok = target_tokens(samples[: args.batch])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    params = {"lm_head": student.lm_head.weight, "layer0.q_proj": student.model.layers[0].self_attn.q_proj.weight,
              "embed": student.model.embed_tokens.weight}
    results: dict[str, dict] = {}

    def record(name, loss):
        student.zero_grad(set_to_none=True)
        loss.backward()
        results[name] = {"loss": float(loss), "grads": {k: p.grad.detach().clone() for k, p in params.items()}}

    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    record("trl_generalized_jsd_loss_beta_0.1", GKDTrainer.generalized_jsd_loss(
        s_logits[:, :-1], t_logits[:, :-1], labels=labels[:, 1:], beta=TRL_BETA, num_items_in_batch=n_tok))
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    ssel, targets = select_response_tokens(s_logits, labels)
    tsel, _ = select_response_tokens(t_logits, labels)
    for name, div in (("pocl_dense_jsd_lam_0.9", make_divergence("jsd", lam=LAMBDA)),
                      ("pocl_dense_gjsd_beta_0.1", make_divergence("gjsd", beta=TRL_BETA))):
        if name != "pocl_dense_jsd_lam_0.9":
            s_logits = student(input_ids=ids, attention_mask=mask).logits
            ssel, targets = select_response_tokens(s_logits, labels)
        record(name, dense_kd_loss(ssel, tsel, targets, divergence=div, temperature=1.0, alpha=1.0,
                                   normalizer=n_tok).loss)
    with torch.no_grad():
        th, _ = select_response_tokens(hidden_states(teacher, ids, mask), labels)
    sh, targets = select_response_tokens(hidden_states(student, ids, mask), labels)
    t_head, s_head = LMHead.from_model(teacher, args.vocab), LMHead.from_model(student, args.vocab)
    record("pocl_fused_jsd_lam_0.9", fused_kd_loss(sh, s_head.weight, None, th, t_head.weight, None, targets,
                                                   divergence=make_divergence("jsd", lam=LAMBDA), temperature=1.0,
                                                   alpha=1.0, normalizer=n_tok, chunk_size=_chunk(args)).loss)
    sh, _ = select_response_tokens(hidden_states(student, ids, mask), labels)
    div, _ = ChunkedDivergenceFunction.apply(sh, student.lm_head.weight, None, th, teacher.lm_head.weight, None,
                                             TRL_BETA, 1.0)
    record("trl_chunked_kernel_beta_0.1", div.sum() / n_tok)
    # The real trainer's compute_loss (with the batch's token count, as Trainer passes it).
    trainer = _gkd_trainer(args, samples[: args.batch], teacher, student, tempfile.mkdtemp(prefix="trl-verify-"))
    model = trainer.model
    model.train()
    record("trl_GKDTrainer.compute_loss", trainer.compute_loss(model, dict(batch), num_items_in_batch=n_tok))
    ref = results["trl_generalized_jsd_loss_beta_0.1"]
    out = {}
    for name, r in results.items():
        out[name] = {"loss": r["loss"], "abs_diff_vs_trl": abs(r["loss"] - ref["loss"]),
                     "rel_diff_vs_trl": abs(r["loss"] - ref["loss"]) / abs(ref["loss"]),
                     "grad_max_rel_diff_vs_trl": {
                         k: float((g - ref["grads"][k]).abs().max() / ref["grads"][k].abs().max().clamp_min(1e-30))
                         for k, g in r["grads"].items()}}
    worst = max(max(v["grad_max_rel_diff_vs_trl"].values()) for v in out.values())
    return {"batch": args.batch, "length": args.length, "vocab": args.vocab, "target_tokens": n_tok, "losses": out,
            "max_rel_loss_diff": max(v["rel_diff_vs_trl"] for v in out.values()), "max_rel_grad_diff": worst,
            "same": max(v["rel_diff_vs_trl"] for v in out.values()) < 1e-4 and worst < 1e-3}


WORKERS = {"floor": worker_floor, "pocl_trainer": worker_pocl_trainer, "pocl_cache": worker_pocl_cache,
           "pocl_taid": worker_pocl_taid,
           "pocl_manual": worker_pocl_manual, "trl_gkd": worker_trl_gkd, "trl_chunked": worker_trl_chunked,
           "dense": worker_dense, "verify": worker_verify}


def run_worker(args) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    samples = make_samples(args.batch * (args.steps + 1), args.length, args.vocab, seed=0)
    t0 = time.perf_counter()
    out = WORKERS[args.worker](args, samples)
    out.update(worker=args.worker, vocab=args.vocab, batch=args.batch, length=args.length,
               precision=getattr(args, "precision", "fp32"),
               peak_rss=C.peak_rss_bytes(), seconds=time.perf_counter() - t0, versions=C.versions(),
               tokens_per_step=args.batch * args.length, target_tokens_per_step=target_tokens(samples[: args.batch]))
    Path(args.result).write_text(json.dumps(out, default=str), encoding="utf-8")
    return 0
