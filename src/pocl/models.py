"""Loading teacher and student, checking that they can be distilled into each other.

- Models load from a folder, a hub name (from the local cache when offline) or a ``.gguf`` file
  (transformers dequantizes it; the GGUF quantization config is dropped so that the model saves as
  a normal checkpoint).
- The teacher is put in eval mode with gradients off.
- Tokenizers must agree (same token -> id mapping and the same EOS). When the models' output
  layers differ only by padded rows beyond the tokenizer's vocabulary (Qwen2.5 has 151,936 rows in
  small models and 152,064 in large ones), both are trimmed to the shared size; any other mismatch
  stops with an error.
- :class:`LMHead` exposes the output layer as (weight, bias, logit transform) so the loss engine can
  compute logits chunk by chunk from hidden states; :func:`check_fused_head` verifies at start that
  this reproduces the model's own logits (architectures that post-process logits in a way pocl does
  not know fall back to the model's full logits).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pocl.errors import ModelError

log = logging.getLogger("pocl.models")


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 on a GPU that supports it, else float16."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class NonFiniteWeightsError(ModelError):
    """A model whose weights hold NaN or infinite values (names the tensor)."""


@dataclasses.dataclass
class NonFiniteTensor:
    """The first floating-point tensor of a model that holds NaN or infinite values."""

    name: str
    nan: int
    inf: int
    numel: int

    def describe(self) -> str:
        return f"tensor '{self.name}' holds {self.nan} NaN and {self.inf} infinite values (of {self.numel})"

    def to_dict(self) -> dict:
        return {"tensor": self.name, "nan": self.nan, "inf": self.inf, "numel": self.numel}


def first_nonfinite_tensor(model: nn.Module, *, chunk: int = 1 << 24) -> NonFiniteTensor | None:
    """The first floating-point parameter or buffer of ``model`` holding NaN or inf, or None when
    every weight is finite. Checked in chunks, so the check needs little memory beyond the model."""
    seen: set[int] = set()
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in named:
        if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(part).all()) for part in flat.split(chunk)):
            continue
        nan = sum(int(torch.isnan(part).sum()) for part in flat.split(chunk))
        inf = sum(int(torch.isinf(part).sum()) for part in flat.split(chunk))
        return NonFiniteTensor(name, nan, inf, flat.numel())
    return None


def _hub_cached(spec: str) -> bool:
    """Whether ``spec`` is a hub name whose config is in the local hub cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no hub library: not cached
        return False
    return isinstance(found, str)


_RUN_MODEL_FOLDERS = ("final", "best")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _run_models_in(folder: Path) -> list[Path]:
    """``folder/final`` and ``folder/best`` when they are model folders (``folder`` is a pocl run)."""
    return [folder / name for name in _RUN_MODEL_FOLDERS if (folder / name / "config.json").is_file()]


def _model_folders_near(folder: Path) -> list[Path]:
    """Model folders a user probably meant by ``folder`` (a run folder: its final/ and best/)."""
    return _run_models_in(folder)


def _is_model_or_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() or bool(_run_models_in(folder))


def _looks_local(spec: str) -> bool:
    """Whether a spec that does not exist was meant as a local path rather than a hub name: it starts
    with '.', '/' or '~', has a backslash or more than one '/', or its first part is a local folder
    (``RUN/fnial`` where ``RUN`` exists). Hub names are ``name`` or ``org/name``."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in spec:  # pragma: no cover - Windows
        return True
    if "/" in spec:
        first = spec.split("/", 1)[0]
        return bool(first) and Path(first).is_dir() and not _hub_cached(spec)
    # A bare name close to a local model or run folder is a typo of it ("studnet" for "student").
    return _closest_sibling(Path("."), spec, model_only=True) is not None and not _hub_cached(spec)


def _closest_sibling(parent: Path, name: str, *, model_only: bool = False, cutoff: float = 0.6) -> str | None:
    try:
        names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (not model_only or _is_model_or_run(p)))
    except OSError:
        return None
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75 if model_only else cutoff)
    return close[0] if close else None


def _closest_existing(spec: str) -> tuple[str | None, Path, str]:
    """For a path that does not exist: (the folder probably meant, or None; the deepest folder of the
    path that exists; the first part that does not exist). Each missing part is replaced by the most
    similar folder name (difflib) next to it; a run folder becomes its ``final/``."""
    path = Path(os.path.expanduser(spec))
    parts = path.parts
    cur, rest = (Path(parts[0]), parts[1:]) if path.is_absolute() else (Path("."), parts)
    deepest, missing, guessed = cur, "", False
    for part in rest:
        nxt = cur / part
        if nxt.exists():
            cur = nxt
            if not guessed:
                deepest = nxt
            continue
        if not guessed:
            missing = part
        close = _closest_sibling(cur, part)
        if close is None:
            return None, deepest, missing
        cur, guessed = cur / close, True
    if not guessed:
        return None, deepest, missing
    if cur.is_dir() and not (cur / "config.json").is_file():
        near = _model_folders_near(cur)
        if near:
            cur = near[0]
    guess = str(cur)
    if spec.startswith("./") and not guess.startswith("."):
        guess = "./" + guess  # in the user's own spelling
    return guess, deepest, missing


def _who(what: str) -> str:
    return "" if what == "model" else f" (the {what})"


def _missing_path_message(spec: str, what: str) -> str:
    guess, deepest, missing = _closest_existing(spec)
    message = f"model path not found: {spec}{_who(what)}: no local file or folder of that name"
    if guess is not None:
        message += f"; did you mean '{guess}'?"
    else:
        where = "the current folder" if str(deepest) == "." else f"'{deepest}'"
        message += f"; the closest existing folder is {where}, which has nothing named like '{missing}'"
    if "/" in spec.strip("/") and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        message += f" (not looked up on the hub: '{spec.split('/', 1)[0]}' is a local folder)"
    elif "/" not in spec and not spec.startswith((".", "~")):
        message += " (not looked up on the hub: a local folder has a similar name)"
    return message


def _check_folder(folder: Path, spec: str, what: str, kind: str) -> None:
    """A folder given as a model must hold config.json (as a tokenizer: config.json or tokenizer files)."""
    if (folder / "config.json").is_file():
        return
    if kind == "tokenizer" and any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return
    message = f"cannot load the {what} '{spec}': no config.json in {folder}"
    try:
        empty = not any(folder.iterdir())
    except OSError:
        empty = False
    near = _model_folders_near(folder)
    if empty:
        message += ": the folder is empty"
    elif near:
        message += (f": it is a pocl run folder; did you mean '{near[0]}'"
                    + (f" (or '{near[1]}', the best model on the dev set)" if len(near) > 1 else "") + "?")
    elif (folder / "checkpoints").is_dir():
        message += ": it is a pocl run folder without final/ or best/ (the run has not finished; its checkpoints " \
                   f"are in {folder / 'checkpoints'})"
    elif (folder / "adapter_config.json").is_file():
        message += ": it holds a LoRA adapter only; give the folder of the merged model"
    else:
        message += ": not a Hugging Face model folder"
    raise ModelError(message)


def split_model_spec(spec: str, *, what: str = "model", kind: str = "model") -> tuple[str, str | None]:
    """``dir/model.gguf`` -> (``dir``, ``model.gguf``); anything else -> (spec, None).

    A local path that does not exist raises ModelError at once, naming the closest existing folder
    (instead of a slow and confusing hub lookup); a folder without config.json (``kind="tokenizer"``:
    without config.json or tokenizer files) raises ModelError, suggesting ``RUN/final`` for a run
    folder. ``what`` names the model in messages (student, teacher, ...).
    """
    expanded = os.path.expanduser(spec)
    if expanded.endswith(".gguf"):
        path = Path(expanded)
        if not path.is_file():
            guess = _closest_existing(spec)[0]
            raise ModelError(f"GGUF file not found: {spec}{_who(what)}" + (f"; did you mean '{guess}'?" if guess else ""))
        return str(path.parent), path.name
    path = Path(expanded)
    if path.exists():
        if path.is_dir():
            _check_folder(path, spec, what, kind)
        elif path.suffix in (".safetensors", ".bin", ".json", ".pt"):
            raise ModelError(f"cannot load the {what} '{spec}': give the model folder ({path.parent}), not one of "
                             "its files")
        return expanded, None
    if _looks_local(spec):
        raise ModelError(_missing_path_message(spec, what))
    return spec, None


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file (its header and its size against the header), or None."""
    try:
        size = path.stat().st_size
        if size < 8:
            return f"{size} bytes, too short for a safetensors file (truncated?)"
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > size - 8:
                return f"its header claims {n} bytes but the file has {size} (truncated or not a safetensors file)"
            raw = fh.read(n)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON (corrupt or not a safetensors file)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (corrupt)"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            return f"its header entry of tensor '{key}' is malformed (corrupt)"
        end = max(end, begin, stop)
    expected = 8 + n + end
    if size < expected:
        return f"{size} bytes, but its header describes {expected} (truncated)"
    if size > expected:
        return f"{size} bytes, but its header describes {expected} (extra bytes: corrupt)"
    return None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
            return sorted(folder.glob("*.safetensors"))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def _weight_file_of(folder: Path | None, tensor: str) -> str | None:
    """The weight file of ``folder`` that holds ``tensor`` (by the index, or the single file)."""
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text(encoding="utf-8"))["weight_map"].get(tensor)
            return str(folder / name) if name else None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
            return None
    files = sorted(folder.glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else None


def _check_config_json(folder: Path, spec: str, what: str) -> None:
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot load the {what} '{spec}': {config} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"cannot load the {what} '{spec}': {config} is not a JSON object")


def check_model_folder(folder: Path, spec: str, *, what: str = "model") -> None:
    """Before transformers reads a local model folder: pocl's own manifest (sizes and sha256, when
    the folder has a manifest.json), config.json, and the header and size of each .safetensors file.
    Raises ModelError naming the model and the file."""
    from pocl.errors import CheckpointError
    from pocl.training.checkpoint import MANIFEST, verify_folder

    if (folder / MANIFEST).is_file():
        try:
            verify_folder(folder)
        except CheckpointError as exc:
            raise ModelError(f"cannot load the {what} '{spec}': {exc}") from None
    _check_config_json(folder, spec, what)
    for f in _weight_files(folder):
        if not f.is_file():
            raise ModelError(f"cannot load the {what} '{spec}': {f} is missing (listed in "
                             f"{folder / 'model.safetensors.index.json'})")
        problem = _safetensors_problem(f)
        if problem is not None:
            raise ModelError(f"cannot load the {what} '{spec}': {f} is truncated or corrupt: {problem}")


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
            _check_folder(Path(path), spec, what, "model")
            _check_config_json(Path(path), spec, what)
        raise ModelError(f"cannot load a tokenizer from '{spec}'{_who(what)}: {_one_line(exc)}") from None
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
               check_finite: bool = True) -> nn.Module:
    """Load a causal LM. GGUF files are dequantized to ``dtype`` and lose their quantization config.

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
            raise ModelError(f"cannot load a causal LM from '{spec}'{_who(what)} (no local folder of that name; "
                             f"tried {tried}): {_one_line(exc)}") from None
        raise ModelError(f"cannot load the {what} '{spec}': {_one_line(exc)}") from None
    if gguf_file is not None:
        _drop_gguf_quantization(model)
    if check_finite:
        bad = first_nonfinite_tensor(model)
        if bad is not None:
            where = _weight_file_of(folder, bad.name)
            raise NonFiniteWeightsError(
                f"the {what} '{spec}' has non-finite weights: {bad.describe()}"
                + (f" in {where}" if where else "")
                + (f" (after conversion to {str(dtype).replace('torch.', '')})" if dtype != torch.float32 else "")
                + ". A model with NaN or infinite weights cannot be trained or evaluated; use an intact copy.")
    return model


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


def check_tokenizers(teacher_tok, student_tok, *, teacher_name: str = "teacher", student_name: str = "student") -> None:
    """Raise ModelError unless both tokenizers map the same tokens to the same ids with the same EOS."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = [t for t in tv if t not in sv][:5]
        only_s = [t for t in sv if t not in tv][:5]
        moved = [t for t in tv if t in sv and tv[t] != sv[t]][:5]
        detail = []
        if only_t:
            detail.append(f"only in the {teacher_name}'s: {only_t}")
        if only_s:
            detail.append(f"only in the {student_name}'s: {only_s}")
        if moved:
            detail.append(f"different ids for {moved}")
        raise ModelError(
            f"the {teacher_name} and {student_name} tokenizers differ ({len(tv)} vs {len(sv)} tokens; "
            + "; ".join(detail) + "). White-box distillation compares distributions token by token, so both "
            "models must share one tokenizer.")
    if teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise ModelError(f"EOS differs: {teacher_name} {teacher_tok.eos_token!r} (id {teacher_tok.eos_token_id}) vs "
                         f"{student_name} {student_tok.eos_token!r} (id {student_tok.eos_token_id})")


def output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(model).__name__} has no output embedding layer; pocl needs a causal LM head")
    return int(head.weight.shape[0])


def shared_vocab_size(teacher: nn.Module | None, student: nn.Module, tokenizer) -> int:
    """The number of output rows both models share; every token of the tokenizer must be inside it."""
    n_tok = len(tokenizer)
    rows_s = output_rows(student)
    if teacher is None:
        if rows_s < n_tok:
            raise ModelError(f"the student's output layer has {rows_s} rows but the tokenizer has {n_tok} tokens")
        return rows_s
    rows_t = output_rows(teacher)
    shared = min(rows_t, rows_s)
    if shared < n_tok:
        raise ModelError(
            f"vocabulary mismatch: teacher output layer {rows_t} rows, student {rows_s}, tokenizer {n_tok} tokens. "
            "Only padded rows beyond the tokenizer's vocabulary can be trimmed; these models do not share a "
            "vocabulary.")
    if rows_t != rows_s:
        log.warning("teacher has %d output rows and student %d; both are trimmed to the shared %d "
                    "(the extra rows are padding beyond the tokenizer's %d tokens)", rows_t, rows_s, shared, n_tok)
    return shared


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (everything but the output layer)."""
    getter = getattr(model, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ModelError(f"cannot find the transformer body of {type(model).__name__}")
    return body


@dataclasses.dataclass
class LMHead:
    """The output layer as data: ``logits = logit_fn(hidden @ weight.T + bias)[..., :vocab_size]``."""

    weight: torch.Tensor  # [V_rows, H]
    bias: torch.Tensor | None  # [V_rows] or None
    vocab_size: int
    logit_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, vocab_size: int) -> "LMHead":
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ModelError(f"output layer of {type(model).__name__} is {type(head).__name__}, not nn.Linear")
        return cls(head.weight, head.bias, vocab_size, _logit_postprocess(model.config))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(hidden, self.weight, self.bias)[..., : self.vocab_size]
        return self.logit_fn(out) if self.logit_fn is not None else out


def _logit_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Known post-processing of logits after the head (checked numerically by check_fused_head)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    fns = []
    if scale not in (None, 1, 1.0):
        fns.append(lambda x, s=float(scale): x * s)
    if divide not in (None, 1, 1.0):
        fns.append(lambda x, d=float(divide): x / d)
    if cap:
        fns.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not fns:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return apply


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` of the transformer body (no logits are computed)."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_fused_head(model: nn.Module, head: LMHead, *, atol: float = 1e-3) -> tuple[bool, float]:
    """Compare ``head.logits(hidden_states(...))`` with the model's own logits on a probe input."""
    device = head.weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.vocab_size, (2, 8), generator=gen).to(device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., : head.vocab_size].float()
        fused = head.logits(hidden_states(model, ids, mask)).float()
    finally:
        model.train(was_training)
    diff = float((ref - fused).abs().max())
    scale = float(ref.abs().max()) or 1.0
    return diff <= atol * max(1.0, scale), diff


def model_fingerprint(spec: str | None, model: nn.Module | None = None) -> str:
    """A cheap identity of a model for resume checks: its config plus, for local folders, the name,
    size and first/last MiB of each weight file (hashing a many-GB teacher on every resume would
    take minutes)."""
    h = hashlib.sha256()
    if model is not None:
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    if spec:
        path = Path(os.path.expanduser(spec))
        files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in
                                                        (".safetensors", ".bin", ".gguf", ".pt")) if path.is_dir() else []
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 1 << 20:
                    fh.seek(max(0, size - (1 << 20)))
                    h.update(fh.read(1 << 20))
        if not files:
            h.update(spec.encode())
    return h.hexdigest()[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def save_model_folder(model: nn.Module, tokenizer, folder: Path) -> None:
    """A normal Hugging Face model folder that ``from_pretrained`` loads without pocl or peft; for a
    LoRA student the adapters are merged, and also saved separately under ``adapter/``."""
    folder = Path(folder)
    if is_peft_model(model):
        merged_copy(model).save_pretrained(folder, safe_serialization=True)
        model.save_pretrained(folder / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
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
