"""A smaller student from a teacher checkpoint: keep a subset of its decoder layers.

The common compression starting point (DistilBERT keeps every other layer of BERT; Minitron's
depth pruning drops whole layers): the student has the teacher's embeddings, final norm and output
layer, and a chosen subset of the teacher's decoder layers, each copied unchanged. Nothing else
changes (width, heads, vocabulary, tokenizer), so teacher and student share a tokenizer as
white-box distillation needs.

Which layers:

* ``keep_layers=[0, 3, 6, ...]``: exactly these (0-based, strictly increasing, in range);
* ``keep_every=K``: layers 0, K, 2K, ... and the last layer (added when the stride does not land
  on it; ``keep_last=False`` leaves it out). ``keep_every=1`` keeps every layer, which turns a
  ``.gguf`` teacher into a normal checkpoint;
* ``num_layers=N``: N layers spread evenly from the first to the last (``round(i * (L - 1) / (N - 1))``).

Supported layouts: the decoder layer list at ``model.model.layers`` (Llama, SmolLM2, Qwen2,
Mistral, Gemma, Phi-3 and most current decoders) or ``model.transformer.h`` (GPT-2 and relatives).
The result is a normal Hugging Face folder (config with the new ``num_hidden_layers``, per-layer
config lists such as ``layer_types`` trimmed to the kept layers, safetensors weights, the
teacher's tokenizer and generation config, and ``init_student.json`` recording what was kept)
that ``transformers.AutoModelForCausalLM.from_pretrained`` loads without pocl.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocl.errors import ConfigError, ModelError
from pocl.artifacts import atomic_folder_write
from pocl.training.output_dirs import check_output_dir

log = logging.getLogger("pocl.student_init")

#: Where decoder layer lists live, as attribute paths from the causal-LM class.
LAYER_PATHS = ("model.layers", "transformer.h")


@dataclasses.dataclass
class StudentInitResult:
    """What :func:`init_student` made: the model (in memory) and where it was saved."""

    model: nn.Module
    output_dir: Path | None
    kept_layers: list[int]
    teacher_layers: int
    teacher_parameters: int
    student_parameters: int
    trimmed_config_fields: list[str]


def decoder_layer_path(model: nn.Module) -> str:
    """The attribute path of the decoder layer list (``model.layers`` or ``transformer.h``).

    Raises ModelError naming the architecture when neither holds an ``nn.ModuleList``."""
    for path in LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path
    arch = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    raise ModelError(f"cannot find the decoder layers of {arch} (model_type '{model_type}'): pocl init-student "
                     f"supports models whose layers are at {' or '.join('model.' + p for p in LAYER_PATHS)} "
                     "(Llama/SmolLM2, Qwen2, Mistral, GPT-2 and similar)")


def select_layers(num_layers: int, *, keep_layers: Sequence[int] | None = None, keep_every: int | None = None,
                  num_kept: int | None = None, keep_last: bool = True) -> list[int]:
    """The 0-based indices of the teacher layers to keep; exactly one of ``keep_layers``,
    ``keep_every`` and ``num_kept`` must be given. Raises ConfigError for an empty, out-of-range,
    repeated or unsorted list, or a stride or count that does not fit ``num_layers``."""
    given = [name for name, v in (("keep_layers", keep_layers), ("keep_every", keep_every),
                                  ("num_layers", num_kept)) if v is not None]
    if len(given) != 1:
        raise ConfigError("init-student: give exactly one of keep_layers, keep_every and num_layers"
                          + (f" (got {', '.join(given)})" if given else ""))
    if keep_layers is not None:
        layers = list(keep_layers)
        if not layers:
            raise ConfigError("keep_layers: the list is empty; keep at least one layer")
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise ConfigError(f"keep_layers: {bad[0]!r} is not a layer index")
        out = [i for i in layers if not 0 <= i < num_layers]
        if out:
            raise ConfigError(f"keep_layers: layer {out[0]} is out of range; the teacher has {num_layers} layers "
                              f"(0-{num_layers - 1})")
        dupes = sorted({i for i in layers if layers.count(i) > 1})
        if dupes:
            raise ConfigError(f"keep_layers: layer {dupes[0]} is listed more than once")
        if layers != sorted(layers):
            raise ConfigError(f"keep_layers: {layers} is not in increasing order; layers keep the teacher's order")
        return layers
    if keep_every is not None:
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
            raise ConfigError(f"keep_every: must be a whole number >= 1 (got {keep_every!r})")
        layers = list(range(0, num_layers, keep_every))
        if keep_last and layers[-1] != num_layers - 1:
            layers.append(num_layers - 1)
        return layers
    if isinstance(num_kept, bool) or not isinstance(num_kept, int) or not 1 <= num_kept <= num_layers:
        raise ConfigError(f"num_layers: must be a whole number from 1 to the teacher's {num_layers} layers "
                          f"(got {num_kept!r})")
    if num_kept == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (num_kept - 1)) for i in range(num_kept)})


def parse_layer_list(text: str) -> list[int]:
    """``"0,3,6"`` or ``"0 3 6"`` -> [0, 3, 6]; ConfigError naming the bad item otherwise."""
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            raise ConfigError(f"keep_layers: '{t}' is not a layer index (expected e.g. 0,3,6)") from None
    return out


def _num_layers_of(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ModelError(f"the config of model_type '{config.model_type}' has no num_hidden_layers")
    return n


def _student_config(teacher_config, kept: list[int]) -> tuple[Any, list[str]]:
    """A copy of the teacher's config with ``num_hidden_layers = len(kept)`` and every top-level list
    with one entry per teacher layer (``layer_types`` ...) cut to the kept layers."""
    n = _num_layers_of(teacher_config)
    config = copy.deepcopy(teacher_config)
    trimmed = []
    for key, value in teacher_config.to_dict().items():
        if key == "architectures" or not isinstance(value, (list, tuple)) or len(value) != n or n == 1:
            continue
        setattr(config, key, type(value)(value[i] for i in kept))
        trimmed.append(key)
    config.num_hidden_layers = len(kept)  # GPT-2: attribute_map -> n_layer
    for attr in ("quantization_config",):
        if getattr(config, attr, None) is not None:
            try:
                delattr(config, attr)
            except AttributeError:
                setattr(config, attr, None)
    return config, trimmed


def _mapped_state_dict(teacher: nn.Module, prefix: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """The teacher's state dict with layer ``kept[j]`` renamed to ``j`` and the other layers left out
    (embeddings, final norm, head and every other non-layer tensor are kept as they are)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, tensor in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            out[key] = tensor
        elif int(m.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    return out


def shrink_model(teacher: nn.Module, kept: Sequence[int]) -> tuple[nn.Module, list[str]]:
    """A new model of the teacher's class with only the decoder layers ``kept`` (copies of the
    teacher's tensors; the teacher is not modified). Returns (student, trimmed config fields)."""
    kept = list(kept)
    path = decoder_layer_path(teacher)
    n = _num_layers_of(teacher.config)
    if len(getattr_path(teacher, path)) != n:
        raise ModelError(f"{type(teacher).__name__}: {path} has {len(getattr_path(teacher, path))} layers but the "
                         f"config says num_hidden_layers={n}")
    select_layers(n, keep_layers=kept)  # validates
    config, trimmed = _student_config(teacher.config, kept)
    dtype = next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        student = type(teacher)(config)
    state = _mapped_state_dict(teacher, path, kept)
    # load_state_dict copies into the student's own tensors, so tied embeddings stay tied.
    missing, unexpected = student.load_state_dict(state, strict=False)
    params = dict(student.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    real_missing = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if real_missing or unexpected:
        raise ModelError(f"cannot copy the teacher's weights into the smaller {type(teacher).__name__} (missing "
                         f"{real_missing[:5]}, unexpected {unexpected[:5]})")
    student.to(dtype)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()
    return student, trimmed


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def init_student(teacher: str, output_dir: str | Path | None, *, keep_layers: Sequence[int] | None = None,
                 keep_every: int | None = None, num_layers: int | None = None, keep_last: bool = True,
                 dtype: torch.dtype | None = None, local_files_only: bool = False,
                 trust_remote_code: bool = False, overwrite: bool = False,
                 extra_info: dict[str, Any] | None = None) -> StudentInitResult:
    """Make a student from ``teacher`` (a model folder, hub name or ``.gguf`` file, dequantised) by
    keeping some of its decoder layers (see the module docstring for ``keep_layers`` /
    ``keep_every`` / ``num_layers`` / ``keep_last``), and save it with the teacher's tokenizer to
    ``output_dir`` (None: do not save). ``dtype``: of the saved weights (default: as loaded, float32
    for GGUF). ``overwrite``: replace a previous pocl model in ``output_dir`` (recognised by its
    manifest). A folder that pocl did not write, or one that is, lies inside or contains the teacher, is
    refused (ConfigError) before the teacher is loaded, whatever ``overwrite`` says. ``extra_info``: more
    keys for the folder's ``init_student.json`` (the run matrix records the options it asked for)."""
    from transformers import AutoTokenizer

    from pocl.model_checks import split_model_spec
    from pocl.models import count_parameters, load_model, offline_mode

    if output_dir is not None:
        check_output_dir(output_dir, inputs=[("teacher", teacher)], kind="model", overwrite=overwrite)
    model = load_model(teacher, dtype=dtype or torch.float32, local_files_only=local_files_only,
                       trust_remote_code=trust_remote_code)
    n = _num_layers_of(model.config)
    decoder_layer_path(model)  # a clear error before the layer list is checked
    kept = select_layers(n, keep_layers=keep_layers, keep_every=keep_every, num_kept=num_layers,
                         keep_last=keep_last)
    student, trimmed = shrink_model(model, kept)
    result = StudentInitResult(model=student, output_dir=None, kept_layers=kept, teacher_layers=n,
                               teacher_parameters=count_parameters(model),
                               student_parameters=count_parameters(student), trimmed_config_fields=trimmed)
    log.info("student: %d of %d layers %s, %s -> %s parameters", len(kept), n, kept,
             f"{result.teacher_parameters:,}", f"{result.student_parameters:,}")
    if output_dir is None:
        return result
    out = Path(output_dir)
    path, gguf_file = split_model_spec(teacher)
    # Not pocl.models.load_tokenizer: that one sets a missing pad token to EOS, and the student must ship the
    # teacher's tokenizer files exactly as they are.
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_files_only or offline_mode())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of '{teacher}': {exc}") from None
    info = {"teacher": str(teacher), "teacher_layers": n, "kept_layers": kept, "num_layers": len(kept),
            "teacher_parameters": result.teacher_parameters, "student_parameters": result.student_parameters,
            "trimmed_config_fields": trimmed, "architecture": type(student).__name__,
            **(extra_info or {})}

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "init_student.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    # Written into a temporary folder and renamed (with a manifest): an interrupted write never
    # leaves a half-written model under the output name, and an existing folder stays intact.
    atomic_folder_write(out, write)
    result.output_dir = out
    return result
