"""Batched generation: prompts grouped by length, left padding, KV cache, early stop at EOS.

Used by the difficulty measurer (near-greedy answers of the initial student), by evaluation
(sampled answers over several seeds), by SeqKD and by on-policy training.

**Decoding settings are explicit.** transformers' ``generate`` fills every setting that the
``GenerationConfig`` it is given leaves at ``None`` from the model's own ``generation_config``, then
from its global defaults (``top_k=50``!). A SmolLM2 checkpoint ships temperature 0.2 and top-p 0.9,
so ``top_k=None`` meant "top-k 50" (or the model's top-k), not "no top-k". Two measures keep the
protocol ours:

1. :meth:`DecodingConfig.hf_settings` gives a value to every knob that has an "off" value
   (``top_k=0``, ``no_repeat_ngram_size=0``, ``typical_p=1``, cutoffs 0, penalties 1, ...);
2. during :func:`generate`, the model's ``generation_config`` is replaced by an empty one, because
   some knobs can only be switched off with ``None`` (``min_p``, ``top_h``, ``bad_words_ids``,
   ``suppress_tokens``, ``forced_eos_token_id``, ``sequence_bias``, assisted decoding ...), and
   ``None`` is exactly what transformers fills in from the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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

    def hf_settings(self, *, eos_token_id: int | None, pad_token_id: int | None) -> dict[str, Any]:
        """Every setting handed to transformers' ``GenerationConfig``, each with an explicit value.

        A value of ``None`` here is deliberate (the knob is off and has no other "off" value); it is
        not inherited from the model because :func:`generate` hides the model's own
        ``generation_config`` (see the module docstring). ``top_k=0`` and ``no_repeat_ngram_size=0``
        are passed as 0: transformers reads 0 as "off", whereas ``None`` would mean "take the
        model's value, else top-k 50".
        """
        settings: dict[str, Any] = dict(
            # length: at most max_new_tokens new tokens, no minimum (EOS may come first); min_new_tokens
            # stays unset because transformers warns when both minimums are given
            max_new_tokens=self.max_new_tokens, min_length=0, min_new_tokens=None, max_time=None,
            stop_strings=None,
            # mode: one sequence per prompt, no beams, no assistant, plain sampling or greedy
            do_sample=self.do_sample, num_beams=1, num_return_sequences=1, early_stopping=False,
            length_penalty=1.0, penalty_alpha=None, dola_layers=None, prompt_lookup_num_tokens=None,
            # logits processors applied in both modes
            repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
            encoder_repetition_penalty=1.0, encoder_no_repeat_ngram_size=0, guidance_scale=1.0,
            bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None,
            forced_bos_token_id=None, forced_eos_token_id=None, exponential_decay_length_penalty=None,
            renormalize_logits=False, remove_invalid_values=False, watermarking_config=None,
            # tokens, cache, outputs (generate must return the plain [B, P + N] tensor)
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True, cache_implementation=None,
            return_dict_in_generate=False, output_scores=False, output_logits=False, output_attentions=False,
            output_hidden_states=False,
        )
        if self.do_sample:
            # the warpers (transformers applies them only when sampling): all off except ours
            settings.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=None,
                            top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
        # Greedy: the warpers are not applied, and setting them would make transformers warn that
        # sampling flags are set without do_sample; they stay unset.
        return settings

    def to_hf(self, *, eos_token_id: int | None, pad_token_id: int | None):
        """The ``transformers.GenerationConfig`` of these settings (:meth:`hf_settings`)."""
        from transformers import GenerationConfig

        settings = self.hf_settings(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        supported = set(GenerationConfig().__dict__)
        # a knob this transformers does not know would land in the config as a stray attribute:
        # keep only the known ones (the installed version is recorded with the settings)
        return GenerationConfig(**{k: v for k, v in settings.items() if k in supported})


def effective_settings(decoding: DecodingConfig, *, eos_token_id: int | None,
                       pad_token_id: int | None) -> dict[str, Any]:
    """The settings that :func:`generate` hands to transformers for ``decoding``, as JSON-able data.

    They are read back from the ``GenerationConfig`` object that ``generate`` receives (not from
    ``decoding``), so a knob that the installed transformers drops or converts shows as it is used.
    """
    hf_config = decoding.to_hf(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    out: dict[str, Any] = {}
    for name in decoding.hf_settings(eos_token_id=eos_token_id, pad_token_id=pad_token_id):
        if hasattr(hf_config, name):
            value = getattr(hf_config, name)
            out[name] = value if value is None or isinstance(value, (bool, int, float, str, list, dict)) else str(value)
    return out


@contextlib.contextmanager
def model_generation_config_hidden(model: nn.Module) -> Iterator[None]:
    """Replace the ``generation_config`` of every generating module inside ``model`` by an empty one
    (restored on exit), so that ``generate`` cannot fill unset knobs from the checkpoint's file.

    Every submodule is visited because wrappers (PEFT, compiled modules) call ``generate`` of the
    transformers model they hold, and that model's ``generation_config`` is the one consulted.
    """
    from transformers import GenerationConfig

    saved = []
    for module in model.modules():
        # only modules that hold the attribute themselves: a wrapper that forwards attribute access
        # to the model inside (PEFT) would otherwise keep a copy of it after the restore
        if isinstance(vars(module).get("generation_config"), GenerationConfig):
            saved.append((module, module.generation_config))
            module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


def special_token_ids(tokenizer) -> tuple[int | None, int | None]:
    """(EOS id, padding id) that :func:`generate` uses: the tokenizer's, padding falling back to EOS."""
    eos = tokenizer.eos_token_id
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


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


KV_CACHES = ("dynamic", "static")


def speed_settings(cache: str = "dynamic", compile: bool = False) -> dict[str, Any]:
    """The transformers settings of the speed-only knobs of :func:`generate` (validated).

    ``cache``: ``"dynamic"`` (transformers' default: the KV cache grows by one position per step) or
    ``"static"`` (pre-allocated to prompt width + ``max_new_tokens`` per batch). ``compile``:
    ``torch.compile`` the decoding step (transformers' ``compile_config``; needs ``cache="static"``,
    and transformers only compiles on CPU when asked to with ``_compile_all_devices``).

    These knobs are *not* part of :func:`effective_settings` and never enter ranking or SeqKD
    stamps: they change how fast the answers come, not which answers come for greedy decoding
    (``tests/test_generation_cache.py`` checks token equality; the float summation order of the
    attention over a longer, masked cache could in principle flip an exact tie in the logits).
    Measured on a 2-core CPU (``benchmarks/generation_cache.py``) neither is faster than the
    default, so both stay opt-in.
    """
    if cache not in KV_CACHES:
        raise ConfigError(f"generation cache must be one of {', '.join(KV_CACHES)} (got {cache!r})")
    if not isinstance(compile, bool):
        raise ConfigError(f"generation compile must be true or false (got {compile!r})")
    if compile and cache != "static":
        raise ConfigError("compiled decoding needs cache='static' (a dynamic cache changes shape at every step)")
    out: dict[str, Any] = {}
    if cache == "static":
        out["cache_implementation"] = "static"
    if compile:
        from transformers import CompileConfig

        # "default" mode: "reduce-overhead" (transformers' default) means CUDA graphs; dynamic=None
        # lets torch mark the cache length dynamic after the first recompilation (prompt widths vary)
        config = CompileConfig(fullgraph=False, dynamic=None, mode="default")
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
        out.update(compile_config=config, disable_compile=False)
    else:
        out["disable_compile"] = True
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], decoding: DecodingConfig, *,
             batch_size: int = 16, seed: int = 0, progress: Callable[[int], None] | None = None,
             batch_plan: Sequence[tuple[int, Sequence[int]]] | None = None, cache: str = "dynamic",
             compile: bool = False) -> list[Generation]:
    """Generate one answer per prompt (token ids). Results come back in the order of ``prompts``.

    Each batch re-seeds the RNG with ``seed`` and the batch's index, so a run with the same
    prompts, batch size and seed is reproducible. ``progress(n)`` is called after each batch with
    the number of prompts done in it.

    ``batch_plan`` (``[(batch_index, prompt_indices), ...]``) replaces the default length-sorted
    batches; prompts not in the plan get ``None``. Processes that share the work of one pass each
    take a part of the same plan (``length_sorted_batches``), so every batch has the same
    composition and seed as in a single-process pass and gives the same answers.

    ``cache`` and ``compile`` are speed-only knobs (:func:`speed_settings`); they are not part of
    :func:`effective_settings`.
    """
    if batch_size <= 0:
        raise ConfigError(f"generation batch size must be > 0 (got {batch_size})")
    speed = speed_settings(cache, compile)
    eos, pad = special_token_ids(tokenizer)
    device = next(model.parameters()).device
    hf_config = decoding.to_hf(eos_token_id=eos, pad_token_id=pad)
    for name, value in speed.items():
        setattr(hf_config, name, value)
    was_training = model.training
    model.eval()
    results: list[Generation | None] = [None] * len(prompts)
    if batch_plan is None:
        batch_plan = list(enumerate(length_sorted_batches([len(p) for p in prompts], batch_size)))
    try:
        with model_generation_config_hidden(model):
            for b, batch in batch_plan:
                ids, mask = left_pad([prompts[i] for i in batch], pad, device)  # [B, P] each
                torch.manual_seed(seed * 1_000_003 + b)
                # synced_gpus off: every process generates its own prompts on its own (an FSDP2 student is
                # gathered first, pocl.training.sharding); transformers would otherwise step FSDP-managed
                # models in lock-step with all processes, which wait forever when only one generates.
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config,
                                     synced_gpus=False)  # [B, P + N]
                new = out[:, ids.shape[1]:].tolist()
                for row, i in enumerate(batch):
                    tokens = new[row]
                    stopped = eos in tokens
                    if stopped:
                        tokens = tokens[:tokens.index(eos)]
                    else:
                        # Sequences that finished early are padded by generate; strip the padding
                        # only when pad differs from EOS (otherwise it was handled above).
                        while tokens and tokens[-1] == pad and pad != eos:
                            tokens.pop()
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    results[i] = Generation(tokens, text, stopped)
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
