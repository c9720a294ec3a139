"""The sections of a distillation run's configuration: one dataclass per concern.

:class:`ModelConfig` (``model:``), :class:`DataConfig` (``data:``), :class:`LossConfig` (``loss:``),
:class:`OptimConfig` (``optim:``) and :class:`TrainConfig` (``train:``), with the names their
``Literal`` fields accept; the ``curriculum:`` section is in :mod:`pocl.config.curriculum`.
:mod:`pocl.config.distill` composes them into :class:`~pocl.config.distill.DistillConfig`; every field
is also a flag of ``pocl distill`` (``--train-file``, ``--divergence`` ...). Importing this module does
not import torch.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from pocl.config.schema import ConfigSection, option
from pocl.errors import ConfigError

#: The metrics that choose a run's best model and measure a stage's plateau; the one list of them
#: (:data:`pocl.training.selection.SELECTABLE` is this tuple).
SelectionMetric = Literal["dev_rouge_l", "dev_ce", "dev_loss"]
SELECTABLE_METRICS: tuple[str, ...] = typing.get_args(SelectionMetric)



@dataclasses.dataclass
class ModelConfig(ConfigSection):
    """Teacher and student models."""

    section_name = "model"

    teacher: str | None = option(None, "Teacher: a Hugging Face model folder, a hub name (from the local "
                                 "cache when offline) or a .gguf file. Empty with no student: the built-in "
                                 "default models.", metavar="PATH")
    student: str | None = option(None, "Student: a model folder, hub name or .gguf file (see --teacher).", metavar="PATH")
    tokenizer: str | None = option(None, "Tokenizer to use for both models (default: the student's).", metavar="PATH")
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Teacher weight dtype. auto: float32 on CPU, bfloat16 on a GPU that supports it, else float16.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "Compute precision of the model passes (weights and the loss stay float32). auto: bf16 on a GPU "
        "that supports it, else fp16; on CPU bf16 autocast when the CPU computes bfloat16 natively (AVX512-BF16, "
        "AMX) and the student is at least 256 wide (where it measured faster), else no.")
    local_files_only: bool = option(False, "Never contact the hub (also on when HF_HUB_OFFLINE=1).")
    trust_remote_code: bool = option(False, "Allow model code from the model folder (only for models you trust).")
    attn_implementation: str | None = option(None, "Attention implementation passed to transformers "
                                             "(eager, sdpa, flash_attention_2); default: transformers' choice.")
    gradient_checkpointing: bool = option(False, "Recompute student activations in the backward pass to save memory.")
    cpu: bool = option(False, "Run on the CPU even when a GPU is present.")
    lora_r: int = option(0, "LoRA rank of the student (peft; 0: train all weights). Checkpoints then hold the "
                         "adapters only; final/ and best/ hold the merged model (plus the adapters in adapter/).")
    lora_alpha: float = option(16.0, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.")
    lora_target_modules: str = option("all-linear", "Modules that get adapters: all-linear (every linear layer but "
                                      "the output layer) or a comma-separated list of module names.")

    def __post_init__(self) -> None:
        for name in ("teacher_dtype", "mixed_precision"):
            self._check_literal(name)
        self._check(self.lora_r >= 0, "lora_r", "must be >= 0 (0 turns LoRA off)")
        self._check(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        self._check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")


@dataclasses.dataclass
class DataConfig(ConfigSection):
    """Training and dev data, prompt template and tokenisation limits."""

    section_name = "data"

    train_file: str | None = option(None, "Training data: a .jsonl or .json file, a dataset folder (save_to_disk "
                                    "or {split}.jsonl files) or a hub dataset name. Empty: the built-in task suite.", metavar="PATH")
    dev_file: str | None = option(None, "Dev data for periodic evaluation (same formats). Empty: no dev evaluation "
                                  "(with the built-in suite: its dev split).", metavar="PATH")
    train_split: str = option("train", "Split to read when --train-file is a dataset with several splits.")
    dev_split: str = option("validation", "Split to read when --dev-file is a dataset with several splits.")
    template: str = option("alpaca", "Prompt template: alpaca, chat (the tokenizer's chat template), plain, a "
                           "string with {instruction} and {input}, or a .txt/.yaml file.")
    use_prompt_field: bool | None = option(None, "Use a row's ready-made 'prompt' field when it has one "
                                           "(default: yes with the alpaca template, no with the others).")
    max_length: int = option(512, "Maximum tokens of prompt + response; longer responses are cut (and get no "
                                "EOS). Must fit the models' context; the default is clipped to it, with a warning.")
    max_prompt_length: int = option(256, "Maximum prompt tokens; longer prompts are cut on --truncation-side.")
    truncation_side: Literal["left", "right", "error"] = option(
        "left", "Where to cut a too-long prompt: left keeps its end (the response cue), right keeps its start, "
        "error refuses.")
    skip_invalid_rows: bool = option(False, "Skip invalid rows (their count and ids are reported) instead of stopping.")
    max_train_samples: int | None = option(None, "Use only the first N training rows (after validation).")
    max_dev_samples: int | None = option(None, "Use only the first N dev rows.")

    def __post_init__(self) -> None:
        self._check_literal("truncation_side")
        self._check(self.max_length > 1, "max_length", "must be > 1")
        self._check(0 < self.max_prompt_length < self.max_length, "max_prompt_length",
                    f"must be > 0 and < max_length ({self.max_length}) so every response keeps some tokens")
        for name in ("max_train_samples", "max_dev_samples"):
            value = getattr(self, name)
            self._check(value is None or value > 0, name, "must be a positive number of rows")


@dataclasses.dataclass
class LossConfig(ConfigSection):
    """The distillation objective (1 - alpha) * CE + alpha * s(T) * D_T(teacher, student)."""

    section_name = "loss"

    method: Literal["kd", "taid", "skd", "seqkd", "sft"] = option(
        "kd", "What the student is trained on: kd (the teacher's distributions on the reference responses, plus "
        "on-policy student samples when --on-policy-fraction > 0: GKD); taid (TAID, Shing et al. 2025: forward KL "
        "to a target interpolated between the student and the teacher, the interpolation t rising from "
        "--taid-t-start to --taid-t-end, adaptively; no temperature; docs/losses.md); skd (Speculative KD, Xu et al. "
        "2025: the student drafts --skd-gamma tokens at a time, the teacher keeps those in its top --skd-top-k and "
        "replaces the first other one by its own sample; trained on with --divergence on --skd-fraction of the "
        "steps); seqkd (sequence-level KD: cross-entropy "
        "only, alpha = 0, on responses the teacher generates once for the training prompts, cached in "
        "OUTPUT_DIR/seqkd_teacher.jsonl); sft (cross-entropy only, alpha = 0, on the references). Composes with "
        "--curriculum pocl (every stage then has alpha 0 for seqkd and sft).")
    divergence: str = option("fkl", "Divergence D: fkl, rkl, jsd, tvd, skl, srkl, akl, gjsd (exact names; see "
                             "docs/losses.md).")
    alpha: float = option(1.0, "KD weight alpha in (1 - alpha) * CE + alpha * D; 0 = plain SFT, 1 = pure KD. With "
                          "--curriculum pocl, given explicitly: the same alpha in every stage (logged).")
    temperature: float = option(1.0, "Distillation temperature T applied to both teacher and student logits. With "
                                "--curriculum pocl, given explicitly: the same T in every stage (logged).")
    temperature_scaling: Literal["t2", "none"] = option(
        "t2", "How the divergence is scaled by temperature: t2 multiplies every divergence by T^2 (keeps gradient "
        "size comparable across temperatures); none leaves it unscaled.")
    jsd_lambda: float = option(0.9, "lambda of JSD: m = (1 - lambda) p + lambda q.")
    skew: float = option(0.1, "Skew coefficient a of skl and srkl.")
    gjsd_beta: float = option(0.5, "beta of gjsd (TRL's convention): m = beta p + (1 - beta) q; "
                              "beta KL(p||m) + (1 - beta) KL(q||m); 0 gives KL(p||q), 1 gives KL(q||p).")
    akl_mu: float = option(0.5, "Head mass mu of akl: the teacher's most probable tokens up to cumulative "
                           "probability mu form the head.")
    taid_t_start: float = option(0.4, "TAID: interpolation t at the first step (the official default; one official "
                                 "script uses 0.2).")
    taid_t_end: float = option(1.0, "TAID: t at the end of the linear schedule (and its upper bound).")
    taid_alpha: float = option(5e-4, "TAID: step size of the adaptive update t <- t + alpha sigmoid(m) (1 - t).")
    taid_beta: float = option(0.99, "TAID: momentum of the relative loss change m <- beta m + (1 - beta) r.")
    taid_adaptive: bool = option(True, "TAID: the adaptive update on top of the linear schedule (off: linear only, "
                                 "the official --taid_disable_adaptive).")
    taid_scope: Literal["run", "stage"] = option(
        "run", "TAID with --curriculum pocl: run (t rises once over the whole curriculum's steps and carries over "
        "between stages) or stage (t, its momentum and its schedule restart at every stage). Plain KD: one stage.")
    skd_gamma: int = option(5, "skd: tokens the student drafts per block before the teacher checks them in one "
                            "forward pass.")
    skd_top_k: int = option(25, "skd: a drafted token is kept when it is among the teacher's top K tokens at its "
                            "position (the official 25; the vocabulary size: pure student sampling).")
    skd_top_p: float = option(0.0, "skd: > 0 keeps a drafted token when it is inside the teacher's top-p nucleus "
                              "instead (--skd-top-k is then unused).")
    skd_top_k_end: int | None = option(None, "skd: K falls linearly along the response from --skd-top-k to this "
                                       "(empty: no decay).")
    skd_teacher_temperature: float = option(1.0, "skd: temperature of the teacher's replacement sample at the first "
                                            "rejected token (0: the teacher's most probable token).")
    skd_fraction: float = option(1.0, "skd: probability that an optimizer step trains on speculative samples (the "
                                 "rest on the references; decided per step like --on-policy-fraction). Per stage: "
                                 "curriculum.stages[i].on_policy_fraction.")
    on_policy_fraction: float = option(
        0.0, "GKD: probability lambda_on that an optimizer step trains on responses the student samples for the "
        "window's prompts (scored by the teacher) instead of the references; 0 = off. Decided per step from "
        "(seed, stage, step), so a resumed run makes the same decisions. Per stage: Stage.on_policy_fraction, "
        "curriculum.stages[i].on_policy_fraction.")
    on_policy_temperature: float = option(
        1.0, "Sampling temperature of the student's on-policy responses (generation only; the loss uses the "
        "distillation temperature T).")
    on_policy_top_p: float = option(1.0, "top-p of the student's on-policy sampling (1 = the full distribution).")
    on_policy_max_new_tokens: int = option(256, "Maximum new tokens of an on-policy response (cut further to "
                                           "fit --max-length).")
    on_policy_ce: bool = option(
        False, "Keep the (1 - alpha) CE term on on-policy steps, i.e. cross-entropy on the student's own samples "
        "(off by default: it would train the student on its own mistakes); when off, on-policy steps train "
        "alpha * s(T) * D only.")
    replay_buffer_size: int = option(
        0, "Capacity of the replay buffer of student samples (DistiLLM's adaptive off-policy; 0 = off). Fresh "
        "on-policy samples are added (oldest dropped first); the buffer is saved in checkpoints.")
    replay_reuse_prob: float = option(
        0.5, "On an on-policy step with a non-empty replay buffer: probability of training on samples drawn "
        "from the buffer instead of generating fresh ones.")
    seqkd_sampling: bool = option(
        False, "seqkd: sample the teacher's responses (T = 1, top-p 1) instead of greedy decoding.")
    seqkd_max_new_tokens: int = option(256, "seqkd: maximum new tokens of the teacher's responses (cut further "
                                       "to fit --max-length).")
    seqkd_batch_size: int = option(32, "seqkd: prompts per generation batch of the teacher.")
    chunk_size: int = option(0, "Tokens per chunk of the loss computation; peak loss memory grows with chunk_size x "
                             "vocabulary, not with batch x length x vocabulary. 0 (auto): the largest power of two "
                             "up to 512 whose float32 temporaries fit in 1 GiB: about 6 of [chunk, vocabulary] with "
                             "the compiled divergence kernels (float32 on CPU: 512 up to 49k, 256 at 128k and 152k), "
                             "about 16 otherwise (512 up to 32k, 256 at 49k, 128 at 128k, 64 at 152k).")
    kernels: Literal["auto", "compiled", "eager"] = option(
        "auto", "How the divergence kernels (value and closed-form gradient per chunk; docs/losses.md) run: compiled "
        "(torch.compile, cached in ~/.cache/pocl/inductor; after a failed compile the eager kernels, with one "
        "warning), eager, or auto: compiled for float32 on CPU, eager elsewhere (the environment variable "
        "POCL_COMPILE_KERNELS=1/0 decides auto when set). The same formulas either way.", affects_weights=False)
    loss_path: Literal["auto", "fused", "logits"] = option(
        "auto", "fused: logits are computed chunk by chunk from hidden states (bounded memory); logits: the "
        "model's own full logits are used (for heads pocl cannot reproduce); auto: fused when a check at start "
        "shows it reproduces the model's logits.")
    teacher_cache: Literal["off", "hidden", "topk"] = option(
        "hidden", "hidden (exact, the default): run the teacher once over the training and dev data before the first "
        "step and store its final hidden states per response token in --teacher-cache-dir; later passes read them "
        "and recompute the teacher's logits through its LM head inside the fused loss (the full-vocabulary "
        "divergence at every temperature, without the teacher's body). topk (an APPROXIMATION): store the top-k "
        "logits plus one tail bucket; the divergence becomes a lower bound whose gap grows with T, so it is measured "
        "at every stage temperature and refused above --teacher-cache-max-error unless --accept-approximation "
        "topk-cache. off: run the teacher at every step. On-policy steps always use the live teacher; with the "
        "unfused loss path (--loss-path logits) hidden falls back to the live teacher.")
    teacher_cache_topk: int = option(
        64, "topk cache: teacher tokens kept per response token (the rest is one tail bucket); a value >= the "
        "vocabulary size keeps every token (exact, N x V values on disk).")
    teacher_cache_dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "Storage dtype of the cached hidden states or top-k logits (tails are always float32). float16 and "
        "bfloat16 halve the disk and are approximations: their error is measured like topk's.")
    teacher_cache_dir: str | None = option(
        None, "Folder of the teacher cache (default: OUTPUT_DIR/teacher_cache). Reused when its stamp (kind, teacher, "
        "data, dtype; k and temperatures for topk) matches, rebuilt otherwise.", metavar="PATH", affects_weights=False)
    teacher_cache_max_error: float = option(
        0.01, "Largest relative error of the divergence (cached vs live teacher, measured on the first "
        "--teacher-cache-check-samples training samples at every stage temperature with the initial student) that "
        "an approximate cache may have; above it the run stops unless --accept-approximation names it.",
        affects_weights=False)
    teacher_cache_check_samples: int = option(
        16, "Training samples on which an approximate teacher cache is compared with the live teacher before "
        "training (the errors are logged and written to summary.json).", affects_weights=False)
    accept_approximation: Literal["none", "topk-cache", "half-precision-cache"] = option(
        "none", "Accept a teacher signal that changes the objective by more than --teacher-cache-max-error: "
        "topk-cache (--teacher-cache topk) or half-precision-cache (--teacher-cache-dtype float16/bfloat16). The "
        "measured error is still logged and recorded.", affects_weights=False)
    teacher_signal_file: str | None = option(
        None, "An imported teacher signal (an APPROXIMATION, like --teacher-cache topk): a Parquet file (or folder of "
        "shards) of the teacher's top-k logprobs per response token, keyed by sample id (`pocl teacher-signal "
        "export`, or vLLM prompt_logprobs; docs/losses.md). It replaces the teacher cache: measured against the live "
        "teacher at every stage temperature and refused above --teacher-cache-max-error unless "
        "--accept-approximation topk-cache. Every training sample must be in it.", metavar="PATH",
        affects_weights=False)
    teacher_signal_ignore_tokenizer: bool = option(
        False, "Use --teacher-signal-file although its tokenizer fingerprint differs from the student's (or is "
        "missing): only when its token ids are known to mean the student's tokens.", affects_weights=False)

    def __post_init__(self) -> None:
        from pocl.losses import DIVERGENCES  # late import: the registry imports torch

        self._check_literal("method")
        self._check_literal("temperature_scaling")
        self._check_literal("loss_path")
        if self.teacher_cache in ("on", True):
            raise ConfigError("loss.teacher_cache: 'on' was the top-k cache, an approximation of the objective; use "
                              "hidden (exact, the default), topk (an approximation) or off")
        self._check_literal("teacher_cache")
        self._check_literal("teacher_cache_dtype")
        self._check_literal("accept_approximation")
        self._check(self.teacher_cache_topk >= 1, "teacher_cache_topk", "must be >= 1")
        self._check(self.teacher_cache_max_error >= 0, "teacher_cache_max_error", "must be >= 0")
        self._check(self.teacher_cache_check_samples >= 1, "teacher_cache_check_samples", "must be >= 1")
        self._check(not self.teacher_signal_file or self.teacher_cache != "off", "teacher_signal_file",
                    "replaces the teacher cache: give it without --teacher-cache off")
        if self.divergence not in DIVERGENCES:
            DIVERGENCES.canonical(self.divergence)  # raises UnknownNameError with a suggestion
        self._check(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        self._check(self.temperature > 0, "temperature", "must be > 0")
        self._check(0.0 <= self.jsd_lambda <= 1.0, "jsd_lambda", "must be in [0, 1]")
        self._check(0.0 <= self.skew <= 1.0, "skew", "must be in [0, 1]")
        self._check(self.chunk_size >= 0, "chunk_size", "must be >= 0 (0: chosen from the vocabulary)")
        self._check(0.0 <= self.gjsd_beta <= 1.0, "gjsd_beta", "must be in [0, 1]")
        self._check(0.0 <= self.akl_mu <= 1.0, "akl_mu", "must be in [0, 1]")
        self._check(0.0 <= self.on_policy_fraction <= 1.0, "on_policy_fraction", "must be in [0, 1]")
        self._check(self.on_policy_temperature > 0, "on_policy_temperature", "must be > 0")
        self._check(0.0 < self.on_policy_top_p <= 1.0, "on_policy_top_p", "must be in (0, 1]")
        self._check(self.on_policy_max_new_tokens > 0, "on_policy_max_new_tokens", "must be > 0")
        self._check(self.replay_buffer_size >= 0, "replay_buffer_size", "must be >= 0")
        self._check(0.0 <= self.replay_reuse_prob <= 1.0, "replay_reuse_prob", "must be in [0, 1]")
        self._check(self.seqkd_max_new_tokens > 0, "seqkd_max_new_tokens", "must be > 0")
        self._check(self.seqkd_batch_size > 0, "seqkd_batch_size", "must be > 0")
        self._check(self.distills or self.on_policy_fraction == 0, "on_policy_fraction",
                    f"must be 0 with method {self.method} (on-policy steps are a kd method: GKD)")
        self._check_literal("taid_scope")
        self._check(0.0 <= self.taid_t_start < 1.0, "taid_t_start", "must be in [0, 1)")
        self._check(self.taid_t_start <= self.taid_t_end <= 1.0 and self.taid_t_end > 0, "taid_t_end",
                    f"must be in (0, 1] and >= taid_t_start ({self.taid_t_start:g})")
        self._check(0.0 <= self.taid_alpha <= 1.0, "taid_alpha", "must be in [0, 1]")
        self._check(0.0 <= self.taid_beta <= 1.0, "taid_beta", "must be in [0, 1]")
        self._check(self.skd_gamma >= 1, "skd_gamma", "must be >= 1")
        self._check(self.skd_top_k >= 1, "skd_top_k", "must be >= 1")
        self._check(0.0 <= self.skd_top_p <= 1.0, "skd_top_p", "must be in [0, 1] (0: top-K acceptance)")
        self._check(self.skd_top_k_end is None or self.skd_top_k_end >= 1, "skd_top_k_end", "must be >= 1")
        self._check(self.skd_teacher_temperature >= 0, "skd_teacher_temperature", "must be >= 0 (0: greedy)")
        self._check(0.0 <= self.skd_fraction <= 1.0, "skd_fraction", "must be in [0, 1]")
        if self.method == "skd":
            self._check(self.on_policy_fraction == 0, "on_policy_fraction",
                        "must be 0 with --method skd: its speculative steps are set by --skd-fraction")
        if self.method == "taid":
            self._check(self.divergence in ("fkl", "taid"), "divergence",
                        f"is {self.divergence!r}, but --method taid trains TAID's own objective (KL from the "
                        "interpolated target to the student); leave --divergence out")
            self._check(self.temperature == 1.0, "temperature",
                        f"is {self.temperature:g}, but TAID has no temperature; leave --temperature out")

    @property
    def distills(self) -> bool:
        """Whether the method trains on the teacher's distributions (kd, taid, skd), not on cross-entropy only."""
        return self.method in ("kd", "taid", "skd")

    def divergence_params(self, *, skew: float | None = None) -> dict[str, float]:
        """The parameters of the chosen divergence (only those it accepts)."""
        from pocl.losses import DIVERGENCES

        spec = DIVERGENCES.get(self.divergence)
        values = {"lam": self.jsd_lambda, "skew": self.skew if skew is None else skew, "beta": self.gjsd_beta,
                  "mu": self.akl_mu}
        return {k: v for k, v in values.items() if k in spec.defaults}


@dataclasses.dataclass
class OptimConfig(ConfigSection):
    """AdamW and the learning-rate schedule (a fresh optimizer and schedule start in every stage)."""

    section_name = "optim"

    lr: float = option(1e-4, "Peak learning rate.")
    min_lr: float = option(1e-7, "Learning rate at the end of the cosine schedule.")
    weight_decay: float = option(0.01, "AdamW weight decay (never applied to biases and normalisation weights).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    lr_schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Decay after warm-up.")
    warmup_steps: int = option(0, "Linear warm-up steps at the start of each stage.")
    warmup_ratio: float = option(0.0, "Warm-up as a fraction of the stage's steps (used when warmup_steps is 0).")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0 disables clipping).")

    def __post_init__(self) -> None:
        self._check_literal("lr_schedule")
        self._check(self.lr > 0, "lr", "must be > 0")
        self._check(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        self._check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._check(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        self._check(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        self._check(self.adam_eps > 0, "adam_eps", "must be > 0")
        self._check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        self._check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")


@dataclasses.dataclass
class TrainConfig(ConfigSection):
    """Batching, duration, evaluation, checkpoints and logging."""

    section_name = "train"

    output_dir: str = option("runs/pocl", "Folder of the run: checkpoints, final model, metrics, TensorBoard logs.",
                             metavar="PATH", affects_weights=False)
    batch_size: int = option(64, "Global batch size (samples per optimizer step, over all processes).")
    micro_batch_size: int = option(8, "Samples per forward/backward pass on one process; gradient accumulation "
                                   "makes up the global batch.")
    epochs: float = option(20, "Passes over the training data (fractions allowed). Plain KD only: with "
                           "--curriculum pocl every stage runs --stage-epochs, and --epochs is refused.")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (overrides epochs for the schedule). "
                                   "With --curriculum pocl: a cap on the optimizer steps of the whole run; the "
                                   "stage it falls in is cut short (its learning-rate schedule too) and later "
                                   "stages do not run.")
    seed: int = option(10, "Seed of initialisation, shuffling and sampling.")
    eval_every: int = option(0, "Evaluate on the dev set every N optimizer steps (0: at the end of every epoch).",
                             affects_weights=False)
    eval_batch_size: int = option(16, "Samples per forward pass during dev evaluation.", affects_weights=False)
    save_every: int = option(0, "Write a checkpoint every N optimizer steps (0: at the end of every epoch).",
                             affects_weights=False)
    save_total_limit: int = option(2, "Keep at most this many step checkpoints (older ones are deleted).",
                                   affects_weights=False)
    resume: Literal["auto", "never"] = option(
        "auto", "auto: continue from the last complete checkpoint in output_dir when there is one; never: "
        "start over (refused if output_dir already has checkpoints, unless --overwrite).", affects_weights=False)
    overwrite: bool = option(False, "Delete an existing run in output_dir before starting.", affects_weights=False)
    allow_config_change: bool = option(False, "Resume even though the config, models or data differ from the "
                                       "checkpoint's (the differences are printed).", affects_weights=False)
    log_every: int = option(10, "Log training metrics every N optimizer steps.", affects_weights=False)
    tensorboard: bool = option(True, "Write TensorBoard logs to output_dir/tensorboard.", affects_weights=False)
    report_to: list[str] = option(default_factory=lambda: ["tensorboard"], help="Trackers of every logged metric: "  # noqa: RUF009
                                  "tensorboard, wandb, trackio (pip install 'pocl[wandb]', 'pocl[trackio]') or none; "
                                  "comma- or space-separated. docs/training.md.", metavar="TRACKER", affects_weights=False)
    progress: bool = option(True, "Show a progress bar.", affects_weights=False)
    push_to_hub: str | None = option(
        None, "After a completed run, upload final/ (with its model card) to this Hugging Face Hub model repository "
        "(created if missing; the token of `hf auth login` or HF_TOKEN). A failed upload leaves final/ as it is.",
        metavar="REPO_ID", affects_weights=False)
    hub_private: bool = option(False, "With --push-to-hub: create the Hub repository as private.",
                               affects_weights=False)
    max_nonfinite_steps: int = option(5, "Skip optimizer steps whose loss or gradient is NaN/inf; stop the run "
                                      "after this many in a row.")
    sort_micro_batches: bool = option(True, "Within a step, group samples of similar length into micro-batches "
                                      "(less padding; the step's gradient is unchanged).")
    dev_rouge_samples: int = option(
        0, "Dev samples whose answers are generated (sampling at T = 1, one seed: the run's; at most "
        "--dev-rouge-max-new-tokens tokens) at every dev evaluation to compute dev ROUGE-L: the first N. 0: all "
        "dev samples when --selection-metric is dev_rouge_l (the authors select on the whole dev set), none "
        "otherwise. Generating is most of the cost of a dev evaluation (docs/training.md, \"Evaluation and model "
        "selection\"); --selection-metric dev_ce needs none.")
    dev_rouge_max_new_tokens: int = option(256, "Maximum new tokens of the dev ROUGE-L generations (the "
                                           "evaluation protocol's 256).")
    selection_metric: SelectionMetric = option(
        "dev_rouge_l", "How the best model (OUTPUT_DIR/best) is chosen, and what a stage's plateau "
        "(--plateau-patience) is measured on: dev_rouge_l (ROUGE-L of sampled dev answers, higher is better; "
        "the spec's choice), dev_ce (reference cross-entropy at T = 1, lower is better; no generation) or "
        "dev_loss (the training loss at the stage's T and alpha, lower is better; not comparable across "
        "curriculum stages). Needs a dev set (--dev-file); without one no best/ is written.")
    num_processes: int = option(1, "Data-parallel processes to launch (GPUs: accelerate launch, one per GPU; "
                                "CPU: torchrun with the gloo backend). Or start pocl yourself with "
                                "`accelerate launch -m pocl distill ...`.", affects_weights=False)
    parallelism: Literal["ddp", "fsdp2"] = option(
        "ddp", "How the processes hold the student. ddp: every process a full copy, gradients averaged. fsdp2: "
        "PyTorch FSDP2 (fully_shard per decoder layer and the rest): the student's weights, gradients and AdamW "
        "state are split over the processes (about 1/N each; the teacher stays whole on every process). fsdp2 "
        "checkpoints are sharded (torch.distributed.checkpoint) and resume with another --num-processes; "
        "final/ and best/ stay plain Hugging Face folders. docs/distributed.md.")
    teacher_sharding: Literal["auto", "sharded", "whole"] = option(
        "auto", "With --parallelism fsdp2 and several processes: whether the teacher's decoder layers are sharded "
        "too (sharded), or every process holds the whole teacher (whole). auto: sharded when the teacher has "
        "more parameters than the student. Its embedding, final norm and LM head stay whole (the fused loss "
        "reads the head). The result is the same either way.", affects_weights=False)

    def __post_init__(self) -> None:
        self._check_literal("resume")
        self._check(self.batch_size > 0, "batch_size", "must be > 0")
        self._check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        self._check(self.batch_size % self.micro_batch_size == 0, "batch_size",
                    f"must be a multiple of micro_batch_size ({self.micro_batch_size})")
        self._check(self.epochs > 0, "epochs", "must be > 0")
        self._check(self.max_steps is None or self.max_steps > 0, "max_steps", "must be > 0")
        for name in ("eval_every", "save_every", "log_every", "eval_batch_size"):
            self._check(getattr(self, name) >= 0, name, "must be >= 0")
        self._check(self.eval_batch_size > 0, "eval_batch_size", "must be > 0")
        self._check(self.log_every > 0, "log_every", "must be > 0")
        self._check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1")
        self._check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        self._check(self.num_processes >= 1, "num_processes", "must be >= 1")
        self._check_literal("parallelism")
        self._check_literal("teacher_sharding")
        self._check_literal("selection_metric")
        self._check(self.dev_rouge_samples >= 0, "dev_rouge_samples", "must be >= 0")
        self._check(self.dev_rouge_max_new_tokens > 0, "dev_rouge_max_new_tokens", "must be > 0")
        from pocl.training.trackers import check_report_to
        self.report_to = check_report_to(self.report_to, tensorboard=self.tensorboard)


__all__ = [
    "SELECTABLE_METRICS", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "SelectionMetric", "TrainConfig",
]
