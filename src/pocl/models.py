"""Loading teacher and student, and saving what training produces.

- Models load from a folder, a hub name (from the local cache when offline) or a ``.gguf`` file
  (transformers dequantizes it; the GGUF quantization config is dropped so that the model saves as
  a normal checkpoint).
- The teacher is put in eval mode with gradients off.
- The checks that teacher and student can be distilled into each other (tokenizers, shared
  vocabulary) are in :mod:`pocl.model_compat`, the LM head and hidden-states helpers in
  :mod:`pocl.model_head`; both are re-exported here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from pocl.errors import ModelError
from pocl.model_checks import (NonFiniteWeightsError, check_config_json, check_folder_kind, check_model_folder,
                               first_nonfinite_tensor, role_suffix, split_model_spec, weight_file_of)
from pocl.model_compat import check_teacher_larger, check_tokenizers, count_parameters, human_count, shared_vocab_size
from pocl.model_head import LMHead, check_fused_head, decoder_of, hidden_states, output_rows

log = logging.getLogger("pocl.models")

__all__ = ["LMHead", "apply_lora", "check_fused_head", "check_teacher_larger", "check_tokenizers", "count_parameters",
           "decoder_of", "describe_model", "freeze_teacher", "hidden_states", "is_peft_model", "load_model",
           "load_tokenizer", "load_training_weights", "merged_copy", "model_shape", "offline_mode", "output_rows",
           "resolve_dtype", "save_model_folder", "save_training_weights", "shared_vocab_size"]


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on a GPU that supports it, else float16."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(spec: str, *, local_files_only: bool = False, trust_remote_code: bool = False,
                   what: str = "tokenizer"):
    """Load a tokenizer from a folder, hub name or .gguf file; pad token defaults to EOS."""
    from transformers import AutoTokenizer

    path, gguf_file = split_model_spec(spec, what=what, kind="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only or offline_mode())
    except (OSError, ValueError) as exc:
        if gguf_file is None and Path(path).is_dir():
            # no or a broken config.json: say so, rather than what transformers tried instead
            check_folder_kind(Path(path), spec, what, "model")
            check_config_json(Path(path), spec, what)
        raise ModelError(f"cannot load a tokenizer from '{spec}'{role_suffix(what)}: {_one_line(exc)}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer of '{spec}' has no EOS token; pocl appends EOS to every response")
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the
        # usual choice and keeps the vocabulary unchanged.
        tok.pad_token = tok.eos_token
    return tok


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    errors: list[type[BaseException]] = [OSError, ValueError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(errors)


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, local_files_only: bool = False,
               trust_remote_code: bool = False, attn_implementation: str | None = None, what: str = "model",
               check_finite: bool = True, device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM. GGUF files are dequantized to ``dtype`` and lose their quantization config.
    ``device``: moved there after the checks (default: left on the CPU). One INFO line describes the
    loaded model (:func:`describe_model`: ``what``, path, parameters, dtype, device, shape).

    Validated on load: a local folder's manifest (pocl's output folders), config.json and weight files
    are checked first (:func:`check_model_folder`), and every weight must be finite
    (``check_finite``; :class:`NonFiniteWeightsError` names the tensor). Every failure is a one-line
    ModelError naming the model (``what``: student, teacher, ...) and the file."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = split_model_spec(spec, what=what)
    folder = Path(path) if gguf_file is None and Path(path).is_dir() else None
    if folder is not None:
        check_model_folder(folder, spec, what=what)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code,
                  local_files_only=local_files_only or offline_mode())
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except _load_errors() as exc:
        if folder is None and gguf_file is None:
            tried = "the hub cache" if local_files_only or offline_mode() else "the hub cache and the hub"
            raise ModelError(f"cannot load a causal LM from '{spec}'{role_suffix(what)} (no local folder of that name; "
                             f"tried {tried}): {_one_line(exc)}") from None
        raise ModelError(f"cannot load the {what} '{spec}': {_one_line(exc)}") from None
    if gguf_file is not None:
        _drop_gguf_quantization(model)
    if check_finite:
        bad = first_nonfinite_tensor(model)
        if bad is not None:
            where = weight_file_of(folder, bad.name)
            raise NonFiniteWeightsError(
                f"the {what} '{spec}' has non-finite weights: {bad.describe()}"
                + (f" in {where}" if where else "")
                + (f" (after conversion to {str(dtype).replace('torch.', '')})" if dtype != torch.float32 else "")
                + ". A model with NaN or infinite weights cannot be trained or evaluated; use an intact copy.")
    if device is not None:
        model = model.to(device)
    log.info("%s", describe_model(model, what=what, spec=spec))
    return model


def _config_value(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_shape(model: nn.Module) -> dict:
    """What the log says of a model: parameters, dtype, device, layers, hidden size, vocabulary (output
    rows) and context length (None where the config does not say)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    first = next(iter(model.parameters()), None)
    try:
        vocab = output_rows(model)
    except (ModelError, AttributeError, TypeError):
        vocab = _config_value(text, "vocab_size")
    return {
        "parameters": count_parameters(model),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "layers": _config_value(text, "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        "hidden_size": _config_value(text, "hidden_size", "n_embd", "d_model", "dim"),
        "vocab": vocab,
        "context": _config_value(text, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                                 "n_ctx"),
        "architecture": type(model).__name__,
    }


def describe_model(model: nn.Module, *, what: str = "model", spec: str | None = None) -> str:
    """One line: ``student: PATH (LlamaForCausalLM): 1,234,567 parameters (1.23M), float32, on cpu; 2
    layers, hidden size 32, vocab 300, context 128``."""
    s = model_shape(model)

    def known(value, label):
        return f"{label} {value}" if value is not None else f"{label} ?"

    where = spec if spec is not None else (getattr(model, "name_or_path", "") or "?")
    return (f"{what}: {where} ({s['architecture']}): {s['parameters']:,} parameters "
            f"({human_count(s['parameters'])}), {s['dtype']}, on {s['device']}; "
            f"{s['layers'] if s['layers'] is not None else '?'} layer{'' if s['layers'] == 1 else 's'}, "
            f"{known(s['hidden_size'], 'hidden size')}, "
            f"{known(s['vocab'], 'vocab')}, {known(s['context'], 'context')}")


def _drop_gguf_quantization(model: nn.Module) -> None:
    # transformers dequantizes GGUF weights on load but keeps a GgufConfig; without removing it
    # save_pretrained writes a config that claims a quantization the weights no longer have.
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except (AttributeError, TypeError):
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except (AttributeError, TypeError):
            pass


def freeze_teacher(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------- LoRA / saving
def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear") -> nn.Module:
    """Wrap the student with LoRA adapters (peft); only the adapters train. The output layer is
    never adapted ("all-linear" excludes it), so the fused loss still reads it as a plain weight."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelError("LoRA students need the peft package: pip install 'pocl[lora]'") from None
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with the LoRA adapters merged into the weights; the trained
    model itself is left untouched (merging in place and un-merging is not exact in floating point,
    and would break exact resume)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def save_model_folder(model: nn.Module, tokenizer, folder: Path, *,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A normal Hugging Face model folder that ``from_pretrained`` loads without pocl or peft; for a
    LoRA student the adapters are merged, and also saved separately under ``adapter/``. ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered; not with LoRA)."""
    folder = Path(folder)
    if is_peft_model(model):
        merged_copy(model).save_pretrained(folder, safe_serialization=True)
        model.save_pretrained(folder / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def save_training_weights(model: nn.Module, tokenizer, folder: Path) -> None:
    """The weights a resume needs: the full model, or for a LoRA student the adapters only (the
    frozen base is reloaded from the student path, so checkpoints stay small)."""
    folder = Path(folder)
    if is_peft_model(model):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_training_weights(model: nn.Module, folder: Path) -> None:
    """Load what :func:`save_training_weights` wrote into ``model`` (same architecture)."""
    from safetensors.torch import load_file

    from pocl.errors import CheckpointError

    folder = Path(folder)
    if is_peft_model(model):
        adapter = folder / "adapter" / "adapter_model.safetensors"
        if not adapter.is_file():
            raise CheckpointError(f"{folder}: no adapter/adapter_model.safetensors (was the run made without LoRA?)")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", []) or []
        if unexpected:
            raise CheckpointError(f"{folder}: adapter weights do not fit the student (unexpected {unexpected[:5]})")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied copies (e.g. lm_head.weight tied to the embeddings).
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    real_missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]
    if unexpected or real_missing:
        raise CheckpointError(f"{folder}: weights do not fit the student (missing {real_missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
