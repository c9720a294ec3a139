"""Model paths and files, checked before and after loading: what the user meant, what is on disk.

* :func:`split_model_spec` resolves a model argument (a folder, a ``.gguf`` file or a hub name). A path
  that looks local and does not exist is refused at once, with the closest existing folder and no hub
  access (``RUN`` given, ``RUN/final`` meant); a folder without ``config.json`` says what it is instead.
* :func:`check_model_folder` checks a local folder before transformers reads it: pocl's own
  ``manifest.json`` and checksums when present, a readable ``config.json``, and every ``.safetensors``
  header and size, each failure one line naming the model and the file.
* :func:`first_nonfinite_tensor` finds NaN or infinite weights (on load, and before ``final/`` and
  ``best/`` are written), named by tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path

import torch
from torch import nn

from pocl.errors import ModelError


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
    return first_nonfinite_in(list(model.named_parameters()) + list(model.named_buffers()), chunk=chunk)


def first_nonfinite_in(named, *, chunk: int = 1 << 24) -> NonFiniteTensor | None:
    """The first floating-point tensor of ``named`` (``(name, tensor)`` pairs, e.g. a state dict's
    items) holding NaN or inf, or None; a tensor listed twice (tied weights) is checked once."""
    seen: set[int] = set()
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


def role_suffix(what: str) -> str:
    """`` (the teacher)`` for a named role in messages; nothing for a plain model."""
    return "" if what == "model" else f" (the {what})"


def _missing_path_message(spec: str, what: str) -> str:
    guess, deepest, missing = _closest_existing(spec)
    message = f"model path not found: {spec}{role_suffix(what)}: no local file or folder of that name"
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


def check_folder_kind(folder: Path, spec: str, what: str, kind: str) -> None:
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
            raise ModelError(f"GGUF file not found: {spec}{role_suffix(what)}" + (f"; did you mean '{guess}'?" if guess else ""))
        return str(path.parent), path.name
    path = Path(expanded)
    if path.exists():
        if path.is_dir():
            check_folder_kind(path, spec, what, kind)
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


def weight_file_of(folder: Path | None, tensor: str) -> str | None:
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


def check_config_json(folder: Path, spec: str, what: str) -> None:
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
    check_config_json(folder, spec, what)
    for f in _weight_files(folder):
        if not f.is_file():
            raise ModelError(f"cannot load the {what} '{spec}': {f} is missing (listed in "
                             f"{folder / 'model.safetensors.index.json'})")
        problem = _safetensors_problem(f)
        if problem is not None:
            raise ModelError(f"cannot load the {what} '{spec}': {f} is truncated or corrupt: {problem}")
