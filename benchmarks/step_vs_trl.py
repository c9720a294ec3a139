"""Benchmark: one off-policy distillation step -- pocl vs TRL's GKDTrainer vs a dense full-logits step.

Same teacher, student, batch, length, optimizer and divergence: JSD with pocl's lambda = 0.9 (m = 0.1 p + 0.9 q,
``--divergence jsd --jsd-lambda 0.9``), which is TRL's ``generalized_jsd_loss(beta=0.1)`` (TRL puts beta on the
teacher; docs/losses.md, section gjsd). Pure distillation (pocl alpha = 1: GKD has no CE term), T = 1 (GKDTrainer's
loss uses T = 1; its ``temperature`` is only for sampling), off-policy (GKD ``lmbda=0``, ``seq_kd=False``), loss
normalised by the response tokens of the batch, AdamW (lr 1e-4, no weight decay), gradient clipping at 1.0, float32,
random-initialised Llama models built from a config (nothing downloaded).

Variants, each in a fresh subprocess (so that peak memories do not mix), interleaved A B C D E A B C D E ...:

* ``pocl_trainer``  -- pocl's real :class:`pocl.training.trainer.DistillTrainer` step (``_train_step``: collate,
  teacher hidden states, :class:`StudentLoss` with the fused chunked loss, backward, clipping, AdamW, schedule).
* ``pocl_manual``   -- the same computation as a hand-written loop with explicit timers per phase (data, teacher
  forward, student forward, loss incl. both LM heads, backward, optimizer); used for the time breakdown.
* ``trl_gkd``       -- TRL's real ``GKDTrainer`` training step (``trainer.train()``; ``compute_loss``: full student
  and teacher logits, ``generalized_jsd_loss``), run in a separate virtual environment that has trl (``--trl-python``).
* ``trl_chunked``   -- TRL's chunked divergence kernel (``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``,
  what TRL's on-policy ``DistillationTrainer`` uses; that trainer cannot train off-policy) in a hand-written step.
* ``dense``         -- a hand-written step with full logits of both models and pocl's ``dense_kd_loss``.

Step time = wall time between the ends of consecutive optimizer steps (the first step, which allocates the
optimizer state, is not timed). Peak memory = the process's peak resident set size (VmHWM, reset with
``/proc/self/clear_refs`` just before the first step, so imports and model construction are excluded; also
reported as the increment over the RSS before the first step). Before timing, a ``--worker verify`` run in the TRL
environment checks that TRL's ``generalized_jsd_loss(beta=0.1)`` (called as ``GKDTrainer.compute_loss`` calls it),
TRL's chunked kernel, pocl's ``fused_kd_loss`` and ``dense_kd_loss`` with ``jsd(lam=0.9)`` give the same loss and
the same student gradients on the same models and batch.

    python benchmarks/step_vs_trl.py                           # both vocabularies, writes results/step_vs_trl.*
    python benchmarks/step_vs_trl.py --vocabs 32000 --repeats 1 --steps 1 --quick   # smoke run
    python benchmarks/step_vs_trl.py --trl-python /work/bench-trl/bin/python        # the TRL venv (default)

The TRL environment: ``python3 -m venv /work/bench-trl && /work/bench-trl/bin/pip install torch==2.13.0 &&
/work/bench-trl/bin/pip install -e . trl psutil`` (trl 1.16.0 installs with transformers 5.24.0).
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

DEFAULT_OUT = C.RESULTS / "step_vs_trl.json"
DEFAULT_TRL_PYTHON = "/work/bench-trl/bin/python"
VARIANTS = ("pocl_trainer", "pocl_manual", "trl_gkd", "trl_chunked", "dense")
TRL_VARIANTS = ("trl_gkd", "trl_chunked")

TEACHER = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8)
STUDENT = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
LAMBDA = 0.9        # pocl's jsd lambda: m = (1 - lambda) p + lambda q
TRL_BETA = 1 - LAMBDA  # TRL's beta is on the teacher: m = beta p + (1 - beta) q
LR = 1e-4
PAD, EOS = 0, 1


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


# ---------------------------------------------------------------------------------------------- workers
def _chunk(args) -> int:
    """The chunk size pocl's trainer uses for this vocabulary (``--chunk-size 0``: its automatic choice)."""
    from pocl.losses import auto_chunk_size

    return auto_chunk_size(args.chunk_size, args.vocab)


def worker_pocl_trainer(args, samples) -> dict:
    from pocl.config import DistillConfig
    from pocl.data import TokenizationStats, TokenizedDataset, TokenizedSample
    from pocl.training.stages import Stage
    from pocl.training.trainer import DistillTrainer

    teacher, student = build_models(args.vocab)
    data = TokenizedDataset([TokenizedSample(s["id"], s["input_ids"], s["labels"], s["prompt_length"]) for s in samples],
                            TokenizationStats())
    out_dir = tempfile.mkdtemp(prefix="pocl-step-bench-")
    config = DistillConfig.from_dict({
        # The live teacher at every step, like TRL's: the teacher-logit cache (on by default) would
        # skip the teacher's forward pass and time a different step (benchmarks/teacher_cache.py).
        "loss": {"divergence": "jsd", "jsd_lambda": LAMBDA, "alpha": 1.0, "temperature": 1.0,
                 "chunk_size": args.chunk_size, "teacher_cache": "off"},
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
    orig = trainer._train_step
    started = []

    def first_step(*a, **k):
        if not started:
            started.append(1)
            clock.start()
            clock.tick()  # the first interval (step 1) is dropped below
        return orig(*a, **k)

    trainer._train_step = first_step
    trainer.save_checkpoint = lambda: None  # the end-of-stage checkpoint is outside the timed steps anyway
    trainer._save_model_folder = lambda tmp: None
    try:
        trainer.train()
    except Exception:
        pass  # writing the final folder is stubbed out; the steps are done
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before}


def _manual_step_setup(args):
    import torch

    from pocl.training.optim import build_optimizer
    from pocl.config import OptimConfig

    teacher, student = build_models(args.vocab)
    opt = build_optimizer(student, OptimConfig(lr=LR, weight_decay=0.0))
    torch.nn.Module.train(student)
    return teacher, student, opt


def worker_pocl_manual(args, samples) -> dict:
    import torch

    from pocl.losses import fused_kd_loss, make_divergence, select_response_tokens
    from pocl.models import LMHead, hidden_states

    teacher, student, opt = _manual_step_setup(args)
    div = make_divergence("jsd", lam=LAMBDA)
    t_head, s_head = LMHead.from_model(teacher, args.vocab), LMHead.from_model(student, args.vocab)
    clock = StepClock()
    phases: list[dict] = []
    steps = len(samples) // args.batch
    for k in range(steps):
        if k == 0:
            clock.start()
            clock.tick()
        t = [time.perf_counter()]
        batch = collate(samples[k * args.batch:(k + 1) * args.batch])
        normalizer = target_tokens(samples[k * args.batch:(k + 1) * args.batch])
        t.append(time.perf_counter())
        with torch.no_grad():
            th, _ = select_response_tokens(hidden_states(teacher, batch["input_ids"], batch["attention_mask"]),
                                           batch["labels"])
        t.append(time.perf_counter())
        sh, targets = select_response_tokens(hidden_states(student, batch["input_ids"], batch["attention_mask"]),
                                             batch["labels"])
        t.append(time.perf_counter())
        out = fused_kd_loss(sh, s_head.weight, s_head.bias, th, t_head.weight, t_head.bias, targets, divergence=div,
                            temperature=1.0, alpha=1.0, normalizer=normalizer, vocab_size=args.vocab,
                            chunk_size=_chunk(args))
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss)
        t.append(time.perf_counter())
        clock.tick()
        names = ("data", "teacher_forward", "student_forward", "loss_with_heads", "backward", "optimizer")
        phases.append({n: b - a for n, a, b in zip(names, t, t[1:])})
    # The LM-head matrix products alone, as the fused loss runs them (chunks of chunk_size tokens): teacher head
    # forward, student head forward, and the two products of its backward (d hidden, d weight).
    head_seconds = []
    with torch.no_grad():
        n, cs = th.shape[0], _chunk(args)
        g = torch.randn(min(cs, n), args.vocab)
        for _ in range(2):
            t0 = time.perf_counter()
            for s in range(0, n, cs):
                e = min(s + cs, n)
                th[s:e] @ t_head.weight.T
                sh[s:e].detach() @ s_head.weight.T
                g[: e - s] @ s_head.weight
                g[: e - s].T @ sh[s:e].detach()
            head_seconds.append(time.perf_counter() - t0)
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "phases": phases[1:],
            "head_matmul_seconds": min(head_seconds), "loss_value_last": float(out.loss)}


def worker_dense(args, samples) -> dict:
    import torch

    from pocl.losses import dense_kd_loss, make_divergence, select_response_tokens

    teacher, student, opt = _manual_step_setup(args)
    div = make_divergence("jsd", lam=LAMBDA)
    clock = StepClock()
    phases: list[dict] = []
    for k in range(len(samples) // args.batch):
        if k == 0:
            clock.start()
            clock.tick()
        t = [time.perf_counter()]
        batch = collate(samples[k * args.batch:(k + 1) * args.batch])
        normalizer = target_tokens(samples[k * args.batch:(k + 1) * args.batch])
        t.append(time.perf_counter())
        with torch.no_grad():
            tl = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            tsel, _ = select_response_tokens(tl, batch["labels"])
            del tl
        t.append(time.perf_counter())
        sl = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ssel, targets = select_response_tokens(sl, batch["labels"])
        t.append(time.perf_counter())
        out = dense_kd_loss(ssel, tsel, targets, divergence=div, temperature=1.0, alpha=1.0, normalizer=normalizer)
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(out.loss)
        del sl, ssel, tsel, out
        t.append(time.perf_counter())
        clock.tick()
        names = ("data", "teacher_forward_with_head", "student_forward_with_head", "loss", "backward", "optimizer")
        phases.append({n: b - a for n, a, b in zip(names, t, t[1:])})
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before, "phases": phases[1:]}


def worker_trl_chunked(args, samples) -> dict:
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    teacher, student, opt = _manual_step_setup(args)
    clock = StepClock()
    for k in range(len(samples) // args.batch):
        if k == 0:
            clock.start()
            clock.tick()
        batch = collate(samples[k * args.batch:(k + 1) * args.batch])
        normalizer = target_tokens(samples[k * args.batch:(k + 1) * args.batch])
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
        loss = (div * mask).sum() / normalizer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        clock.tick()
    return {"step_seconds": clock.intervals()[1:], "rss_before": clock.rss_before}


def _hf_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": PAD, "</s>": EOS, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _gkd_trainer(args, samples, teacher, student, out_dir: str, callbacks=()):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    ds = Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
    cfg = GKDConfig(output_dir=out_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                    max_steps=len(samples) // args.batch, learning_rate=LR, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", warmup_steps=0,
                    logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                    bf16=False, fp16=False, dataloader_num_workers=0, seed=0, lmbda=0.0, beta=TRL_BETA,
                    seq_kd=False, temperature=1.0, max_length=args.length, disable_dropout=True)
    return GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                      data_collator=lambda rows: collate(rows), processing_class=_hf_tokenizer(args.vocab),
                      callbacks=list(callbacks))


def worker_trl_gkd(args, samples) -> dict:
    from transformers import TrainerCallback

    teacher, student = build_models(args.vocab)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            clock.tick()

    trainer = _gkd_trainer(args, samples, teacher, student, tempfile.mkdtemp(prefix="trl-step-bench-"), [Clock()])
    trainer.train()
    # ends[0] is the end of step 1; intervals from there on are steps 2..n
    return {"step_seconds": clock.intervals(), "rss_before": clock.rss_before}


def worker_verify(args, samples) -> dict:
    """Same models and batch: TRL's loss (as GKDTrainer.compute_loss calls it, and through the real trainer's
    compute_loss), TRL's chunked kernel, pocl's fused and dense losses; values and student gradients."""
    import torch
    from trl.experimental.gkd import GKDTrainer
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from pocl.losses import dense_kd_loss, fused_kd_loss, make_divergence, select_response_tokens
    from pocl.models import LMHead, hidden_states

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


WORKERS = {"pocl_trainer": worker_pocl_trainer, "pocl_manual": worker_pocl_manual, "trl_gkd": worker_trl_gkd,
           "trl_chunked": worker_trl_chunked, "dense": worker_dense, "verify": worker_verify}


def run_worker(args) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    samples = make_samples(args.batch * (args.steps + 1), args.length, args.vocab, seed=0)
    t0 = time.perf_counter()
    out = WORKERS[args.worker](args, samples)
    out.update(worker=args.worker, vocab=args.vocab, batch=args.batch, length=args.length,
               peak_rss=C.peak_rss_bytes(), seconds=time.perf_counter() - t0, versions=C.versions(),
               tokens_per_step=args.batch * args.length, target_tokens_per_step=target_tokens(samples[: args.batch]))
    Path(args.result).write_text(json.dumps(out, default=str), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------------- orchestration
def spawn(python: str, worker: str, vocab: int, args, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        res = fh.name
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--vocab", str(vocab), "--batch",
           str(args.batch), "--length", str(args.length), "--steps", str(args.steps), "--threads", str(args.threads),
           "--chunk-size", str(args.chunk_size), "--result", res]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"worker": worker, "vocab": vocab, "error": proc.stderr[-3000:], "wall": time.perf_counter() - t0}
    out = json.loads(Path(res).read_text(encoding="utf-8"))
    os.unlink(res)
    out["process_wall_seconds"] = time.perf_counter() - t0
    return out


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "not run"}
    steps = [s for r in ok for s in r["step_seconds"]]
    med = statistics.median(steps)
    r0 = ok[0]
    peaks = [r["peak_rss"] for r in ok]
    incr = [r["peak_rss"] - r["rss_before"] for r in ok]
    out = {"processes": len(ok), "step_seconds": C.stats(steps),
           "tokens_per_s_median": r0["tokens_per_step"] / med, "tokens_per_s_best": r0["tokens_per_step"] / min(steps),
           "target_tokens_per_s_median": r0["target_tokens_per_step"] / med,
           "peak_rss_gib": {"median": statistics.median(peaks) / 2**30, "max": max(peaks) / 2**30},
           "peak_increment_gib": {"median": statistics.median(incr) / 2**30, "max": max(incr) / 2**30},
           "rss_before_steps_gib": statistics.median(r["rss_before"] for r in ok) / 2**30}
    if "phases" in r0:
        names = list(r0["phases"][0])
        ph = {n: statistics.median(p[n] for r in ok for p in r["phases"]) for n in names}
        total = sum(ph.values())
        out["phases_median_seconds"] = ph
        out["phase_total_seconds"] = total
        if "head_matmul_seconds" in r0:
            head = statistics.median(r["head_matmul_seconds"] for r in ok)
            model = ph["teacher_forward"] + ph["student_forward"] + ph["backward"] + head
            out["breakdown"] = {
                "model_bodies_fwd_bwd_seconds": ph["teacher_forward"] + ph["student_forward"] + ph["backward"],
                "lm_head_matmuls_seconds": head,
                "loss_math_seconds": ph["loss_with_heads"] - head,
                "optimizer_seconds": ph["optimizer"], "data_seconds": ph["data"],
                "fraction_outside_model_fwd_bwd_incl_heads": (total - model) / total,
                "fraction_outside_model_bodies": (total - model + head) / total}
    return out


def write_markdown(result: dict, path: Path) -> None:
    lines = [C.header_md("One distillation step: pocl vs TRL GKDTrainer vs dense", result)]
    s = result["settings"]
    lines += [f"Teacher {s['teacher']}, student {s['student']}, batch {s['batch']} x length {s['length']} "
              f"({s['batch'] * s['length']} tokens per step; batch {s['large_vocab_batch']} for vocabularies > 64k), JSD lambda 0.9 (= TRL beta 0.1), alpha 1, T 1, "
              f"AdamW lr 1e-4, clip 1.0, float32, {s['threads']} torch thread(s); "
              f"{s['repeats']} processes per variant ({s['large_vocab_repeats']} for vocabularies > 64k), {s['steps']} timed steps each, interleaved.", ""]
    v = result["verification"]
    lines += [f"Loss check (vocab {v.get('vocab')}, batch {v.get('batch')}): max relative loss difference to TRL "
              f"{v.get('max_rel_loss_diff', float('nan')):.2e}, max relative student-gradient difference "
              f"{v.get('max_rel_grad_diff', float('nan')):.2e} -> same: {v.get('same')}", ""]
    for vocab, case in result["cases"].items():
        lines += [f"## vocabulary {vocab}, batch {case['batch']} x length {case['length']}", "",
                  "| variant | step s (median / min) | tokens/s (median) | peak RSS GiB | peak - RSS before steps GiB |",
                  "|---|---|---|---|---|"]
        for name, r in case["variants"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} | | | |")
                continue
            lines.append(f"| {name} | {r['step_seconds']['median']:.2f} / {r['step_seconds']['min']:.2f} | "
                         f"{r['tokens_per_s_median']:.0f} | {r['peak_rss_gib']['median']:.2f} | "
                         f"{r['peak_increment_gib']['median']:.2f} |")
        t = case.get("targets", {})
        if t:
            lines += ["", f"- pocl trainer / TRL GKDTrainer tokens/s: x{t['speed_ratio_pocl_trainer_vs_trl_gkd']:.2f} "
                      f"(target >= 1.3: {'met' if t['speed_target_met'] else 'NOT met'})",
                      f"- pocl trainer / TRL GKDTrainer peak RSS: {t['peak_rss_ratio']:.2f}; peak increment "
                      f"{t['peak_increment_ratio']:.2f} (target <= 0.5: {'met' if t['memory_target_met'] else 'NOT met'} "
                      "on the increment, which is what the step itself uses)"]
        b = case["variants"].get("pocl_manual", {}).get("breakdown")
        if b:
            ph = case["variants"]["pocl_manual"]["phases_median_seconds"]
            lines += ["", "pocl step time breakdown (hand-written loop, median seconds): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in ph.items())
                      + f"; of the loss phase, the LM-head matrix products alone take {b['lm_head_matmuls_seconds']:.3f}.",
                      f"Fraction of the step outside the model forward/backward passes (bodies and LM heads): "
                      f"{100 * b['fraction_outside_model_fwd_bwd_incl_heads']:.1f} % (loss math "
                      f"{b['loss_math_seconds']:.3f} s, optimizer {b['optimizer_seconds']:.3f} s, data "
                      f"{b['data_seconds']:.3f} s); counting the LM heads as loss: "
                      f"{100 * b['fraction_outside_model_bodies']:.1f} %."]
        lines.append("")
    C.write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128000])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (one more runs untimed first)")
    p.add_argument("--repeats", type=int, default=3, help="processes per variant and vocabulary, interleaved")
    p.add_argument("--large-vocab-repeats", type=int, default=2, help="processes per variant for vocab > 64k")
    p.add_argument("--large-vocab-batch", type=int, default=4,
                   help="batch for vocab > 64k (batch 8 would need about 18 GiB for TRL's step on this 23 GiB machine)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--chunk-size", type=int, default=0, help="pocl's loss.chunk_size (default 0: chosen from the "
                   "vocabulary, as pocl does: 512 at 32 000, 128 at 128 000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    p.add_argument("--verify-batch", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--output", default=None, help="default: benchmarks/results/step_vs_trl.json (a --quick run: /tmp)")
    p.add_argument("--quick", action="store_true", help="smoke run: small vocab, 1 process, 1 step")
    args = p.parse_args(argv)
    if args.output is None:
        args.output = str(Path(tempfile.gettempdir()) / f"{DEFAULT_OUT.stem}_quick.json") if args.quick \
            else str(DEFAULT_OUT)
    if args.worker:
        return run_worker(args)
    if args.quick:
        args.vocabs, args.repeats, args.large_vocab_repeats, args.steps = [8000], 1, 1, 1
    have_trl = Path(args.trl_python).exists()
    t0 = time.perf_counter()
    result = {"benchmark": "step_vs_trl", "created": C.now(),
              "command": "python benchmarks/step_vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": dict(C.machine(), torch_threads=args.threads), "versions": C.versions(),
              "load_average": {"before": C.load()},
              "settings": {"teacher": TEACHER, "student": STUDENT, "batch": args.batch, "length": args.length,
                           "steps": args.steps, "repeats": args.repeats, "large_vocab_batch": args.large_vocab_batch, "large_vocab_repeats": args.large_vocab_repeats,
                           "threads": args.threads, "pocl_chunk_size": args.chunk_size, "divergence":
                           "pocl jsd lam=0.9 == TRL generalized_jsd_loss beta=0.1", "alpha": 1.0, "temperature": 1.0,
                           "optimizer": "AdamW lr 1e-4, weight decay 0, clip 1.0, constant lr", "dtype": "float32",
                           "tie_word_embeddings": False,
                           "prompt": "25-50 % of each sequence (labels -100), no padding",
                           "step_time": "wall time between the ends of consecutive optimizer steps; step 1 not timed",
                           "memory": "VmHWM of the worker process, reset (clear_refs) just before step 1; increment = "
                                     "peak - VmRSS before step 1"},
              "doc": __doc__, "cases": {}}
    if have_trl:
        v = spawn(args.trl_python, "verify", args.vocabs[0], argparse.Namespace(**{**vars(args), "batch": args.verify_batch}),
                  args.timeout)
        result["verification"] = v
        result["trl_version"] = v.get("versions", {}).get("trl")
        print(f"verification: {json.dumps({k: v.get(k) for k in ('max_rel_loss_diff', 'max_rel_grad_diff', 'same', 'error')})}",
              flush=True)
    else:
        result["verification"] = {"skipped": f"{args.trl_python} not found"}
    for vocab in args.vocabs:
        large = vocab > 64000
        reps = args.large_vocab_repeats if large else args.repeats
        vargs = argparse.Namespace(**{**vars(args), "batch": args.large_vocab_batch if large else args.batch})
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for rep in range(reps):
            for variant in args.variants:
                if variant in TRL_VARIANTS and not have_trl:
                    continue
                python = args.trl_python if variant in TRL_VARIANTS else sys.executable
                r = spawn(python, variant, vocab, vargs, args.timeout)
                runs[variant].append(r)
                msg = r.get("error", "").strip().splitlines()[-1:] if "error" in r else \
                    f"median step {statistics.median(r['step_seconds']):.2f} s, peak {r['peak_rss'] / 2**30:.2f} GiB"
                print(f"vocab {vocab} round {rep + 1}: {variant}: {msg} (load {C.load()})", flush=True)
        case = {"batch": vargs.batch, "length": args.length, "processes_per_variant": reps,
                "variants": {v: summarise(rs) for v, rs in runs.items() if rs}, "raw": runs}
        pv, tv = case["variants"].get("pocl_trainer", {}), case["variants"].get("trl_gkd", {})
        if "step_seconds" in pv and "step_seconds" in tv:
            speed = pv["tokens_per_s_median"] / tv["tokens_per_s_median"]
            mem = pv["peak_rss_gib"]["median"] / tv["peak_rss_gib"]["median"]
            inc = pv["peak_increment_gib"]["median"] / tv["peak_increment_gib"]["median"]
            case["targets"] = {"speed_ratio_pocl_trainer_vs_trl_gkd": speed, "speed_target_met": speed >= 1.3,
                               "peak_rss_ratio": mem, "peak_increment_ratio": inc, "memory_target_met": inc <= 0.5,
                               "memory_target_met_on_absolute_peak_rss": mem <= 0.5}
        result["cases"][str(vocab)] = case
        out = Path(args.output)
        result["load_average"]["after"] = C.load()
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        C.write_json(out, result)  # after every vocabulary, so a long run leaves its finished part
        write_markdown(result, out.with_suffix(".md"))
    for vocab, case in result["cases"].items():
        print(vocab, json.dumps(case.get("targets")))
    print(f"wrote {args.output} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
