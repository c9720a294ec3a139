"""Run an experiment matrix: {divergence} x {plain KD, KD + POCL} x seeds, plus the ablations of the
spec's section 7, evaluate every run and write one results table in the layout of the spec's section 6.

    python examples/experiments/run_matrix.py examples/experiments/smollm2_dolly.yaml --dry-run
    python examples/experiments/run_matrix.py examples/experiments/smollm2_dolly.yaml

One YAML spec describes the whole experiment (see ``smollm2_dolly.yaml`` and ``docs/experiments.md``).
The steps, each skipped when its result is already there:

1. models: a ``.gguf`` teacher is saved once as a normal checkpoint (``OUTPUT/models/teacher``); a
   student given as ``pocl init-student`` options is made from the teacher (``OUTPUT/models/student``);
2. ranking: ``pocl rank`` scores the training set once with the initial student
   (``OUTPUT/ranking``); every POCL run starts from a copy of it, which pocl reuses only while its
   stamp (student, data, measurer settings) matches, and re-orders from the stored signals for the
   ``random``/``reverse``/``rouge``/``loss`` measurers;
3. training: every run is one ``pocl distill --config OUTPUT/configs/RUN.yaml`` with output folder
   ``OUTPUT/runs/RUN``, started as a subprocess (log: ``OUTPUT/logs/RUN.log``). A finished run
   (``summary.json`` status completed, same training config) is skipped; an unfinished one resumes
   from its last checkpoint (pocl's own resume); a finished run whose config has changed stops the
   runner with the list of changes (``--rerun-changed`` retrains it);
4. evaluation: every run's final model (``checkpoint: best`` for best/) plus the teacher and the
   initial student go through ``pocl eval``'s ``run_eval`` (``OUTPUT/eval/RUN``), cached by a stamp
   of the evaluation settings and the model's fingerprint;
5. tables: ``results.md`` (ROUGE-L and exact-match tables, rows = methods, columns = sets + Avg,
   ``mean ± std`` over the training seeds of each run's score, itself the mean over the evaluation
   seeds; a cost table with the sample budget and the ranking vs training time of every row),
   ``results.json`` (every run with its config, summary figures and scores), and bar charts.

Same sample budget: plain KD trains ``base.train.epochs`` epochs over all N samples; POCL's
stage s trains on a fraction f_s of them, so its stage epochs are ``epochs / sum(f_s)``
(``epochs * 2 / (n + 1)`` for n equal cumulative slices, as ``pocl distill``'s built-in default
does). The samples each run actually trained on are counted from its ``summary.json`` and compared
with its KD counterpart's in ``results.md``.

Why subprocesses for training: each run is exactly the command a user would type (its config file
and log are in the output folder), memory is returned to the system after every run, a run that
crashes or is killed does not take down the matrix, and pocl's own Ctrl-C/SIGTERM handling (save a
checkpoint, exit 130) applies per run. ``--in-process`` runs the same command lines through
``pocl.cli.main`` in this process instead (faster to start; used by the tests). Evaluations run in
this process through ``pocl.evaluation.runner.run_eval``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pocl.errors import ConfigError, PoclError

log = logging.getLogger("pocl.matrix")
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


# ------------------------------------------------------------------------------------------ spec
def _fail(spec_path: Path, field: str, message: str) -> ConfigError:
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
        raise _fail(spec_path, where, f"environment variable {m.group(1)} is not set (and has no ${{...:-default}})")

    return _VAR.sub(sub, value)


def _package_file(spec: dict, spec_path: Path, field: str) -> str:
    """``{package: NAME, file: FILE}`` -> the path of FILE inside the installed package (not imported)."""
    import importlib.util

    unknown = set(spec) - {"package", "file"}
    if unknown or "package" not in spec or "file" not in spec:
        raise _fail(spec_path, field, "a model given as a mapping needs exactly 'package' and 'file'")
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise _fail(spec_path, field, f"package '{spec['package']}' is not installed (pip install --no-deps "
                                      f"{spec['package'].replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.is_file():
        raise _fail(spec_path, field, f"package '{spec['package']}' has no file '{spec['file']}'")
    return str(path)


@dataclasses.dataclass
class Spec:
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
    """Read and check a matrix spec; every error names the spec file and the field."""
    from pocl.config.schema import load_yaml

    path = Path(path)
    raw = _expand(load_yaml(path), path, "")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        from pocl.errors import suggest

        raise _fail(path, unknown[0], f"unknown key{suggest(unknown[0], SPEC_KEYS)}; valid: {', '.join(SPEC_KEYS)}")
    for key in ("output_dir", "models", "base", "divergences", "seeds", "eval"):
        if key not in raw or raw[key] in (None, "", [], {}):
            raise _fail(path, key, "is required")
    models = raw["models"]
    if not isinstance(models, dict) or set(models) - {"teacher", "student", "heal"} or "teacher" not in models \
            or "student" not in models:
        raise _fail(path, "models", "must be a mapping with 'teacher', 'student' and optionally 'heal'")
    heal = models.get("heal")
    if heal is not None:
        if not isinstance(heal, dict) or not heal:
            raise _fail(path, "models.heal", "must be a pocl distill config (sections) for the healing run")
        for section, key in (("model", "teacher"), ("model", "student"), ("train", "output_dir"),
                             ("curriculum", "curriculum")):
            if key in (heal.get(section) or {}):
                raise _fail(path, f"models.heal.{section}.{key}", "must not be given (set by the runner)")
    teacher = models["teacher"]
    teacher = _package_file(teacher, path, "models.teacher") if isinstance(teacher, dict) else str(teacher)
    student = models["student"]
    if isinstance(student, dict):
        allowed = {"keep_layers", "keep_every", "num_layers", "keep_last"}
        bad = set(student) - allowed
        if bad:
            raise _fail(path, "models.student", f"unknown init-student option {sorted(bad)[0]!r}; valid: "
                                                f"{', '.join(sorted(allowed))}")
    else:
        student = str(student)
    base = copy.deepcopy(raw["base"])
    if not isinstance(base, dict):
        raise _fail(path, "base", "must be a pocl distill config (sections model, data, loss, optim, train, curriculum)")
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
            raise _fail(path, f"base.{section}.{key}", f"must not be given ({why})")
    for i, st in enumerate((base.get("curriculum") or {}).get("stages") or []):
        for key in ("epochs", "max_steps", "plateau_patience"):
            if isinstance(st, dict) and key in st:
                raise _fail(path, f"base.curriculum.stages[{i}].{key}", "must not be given (stage lengths follow "
                                                                       "from train.epochs: same sample budget)")
    if not (base.get("data") or {}).get("train_file"):
        raise _fail(path, "base.data.train_file", "is required")
    divergences = _str_list(raw["divergences"], path, "divergences")
    methods = _str_list(raw.get("methods", list(METHODS)), path, "methods", allowed=METHODS)
    baselines = _str_list(raw.get("baselines", []) or [], path, "baselines", allowed=BASELINES, empty_ok=True)
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(path, "seeds", "must be a list of distinct whole numbers")
    ablations = _ablations(raw.get("ablations"), path, divergences, seeds, base)
    ev = dict(raw["eval"])
    for key in ("models", "output_dir"):
        if key in ev:
            raise _fail(path, f"eval.{key}", "must not be given (the runner sets it per model)")
    if not ev.get("data"):
        raise _fail(path, "eval.data", "is required: the evaluation sets, each [NAME=]PATH")
    checkpoint = raw.get("checkpoint", "final")
    if checkpoint not in ("final", "best"):
        raise _fail(path, "checkpoint", f"must be final or best (got {checkpoint!r})")
    refs = _str_list(raw.get("reference_models", list(REFERENCES)) or [], path, "reference_models",
                     allowed=REFERENCES, empty_ok=True)
    estimate = raw.get("estimate") or {}
    bad = [k for k in estimate if k not in ESTIMATE_KEYS]
    if bad:
        raise _fail(path, f"estimate.{bad[0]}", f"unknown key; valid: {', '.join(ESTIMATE_KEYS)}")
    return Spec(path=path, output_dir=Path(str(raw["output_dir"])), teacher=teacher, student=student, heal=heal,
                base=base,
                divergences=divergences, methods=methods, baselines=baselines, seeds=seeds, ablations=ablations,
                eval=ev, checkpoint=checkpoint, reference_models=refs, estimate=estimate)


def _str_list(value: Any, path: Path, field: str, *, allowed=None, empty_ok: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (not value and not empty_ok) or not all(isinstance(v, str) for v in value):
        raise _fail(path, field, "must be a non-empty list of names" if not empty_ok else "must be a list of names")
    if len(set(value)) != len(value):
        raise _fail(path, field, "has repeated entries")
    if allowed is not None:
        for v in value:
            if v not in allowed:
                raise _fail(path, field, f"unknown entry {v!r}; valid: {', '.join(allowed)}")
    return list(value)


def _ablations(raw: Any, path: Path, divergences: list[str], seeds: list[int], base: dict) -> list[dict]:
    """The ablation runs: ``{divergences, seeds, runs}``; a run is a preset name of ABLATIONS or a mapping
    ``{name, label, curriculum: {...}}`` of curriculum overrides."""
    if not raw:
        return []
    if isinstance(raw, list):
        raw = {"runs": raw}
    if not isinstance(raw, dict) or set(raw) - {"divergences", "seeds", "runs"}:
        raise _fail(path, "ablations", "must be a mapping with runs (and optional divergences, seeds)")
    divs = _str_list(raw.get("divergences", divergences[:1]), path, "ablations.divergences")
    abl_seeds = raw.get("seeds", seeds)
    if not isinstance(abl_seeds, list) or not all(isinstance(s, int) for s in abl_seeds) or not abl_seeds:
        raise _fail(path, "ablations.seeds", "must be a non-empty list of whole numbers")
    defaults = {"t_start": 1.0}
    defaults.update(base.get("curriculum") or {})
    out, names = [], set()
    for i, run in enumerate(raw.get("runs") or []):
        where = f"ablations.runs[{i}]"
        if isinstance(run, str):
            if run not in ABLATIONS:
                from pocl.errors import suggest

                raise _fail(path, where, f"unknown ablation {run!r}{suggest(run, ABLATIONS)}; presets: "
                                         f"{', '.join(ABLATIONS)} (or a mapping {{name, label, curriculum}})")
            label, over = ABLATIONS[run]
            name, over = run, (over(defaults) if callable(over) else dict(over))
        elif isinstance(run, dict) and set(run) <= {"name", "label", "curriculum"} and run.get("name") \
                and isinstance(run.get("curriculum"), dict):
            name, label, over = str(run["name"]), str(run.get("label", run["name"])), dict(run["curriculum"])
        else:
            raise _fail(path, where, "must be a preset name or a mapping {name, label, curriculum: {...}}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise _fail(path, where, f"name {name!r} must be unique and use only letters, digits, _ . -")
        names.add(name)
        for key in ("curriculum", "stage_epochs", "ranking_file", "plateau_patience"):
            if key in over:
                raise _fail(path, f"{where}.curriculum.{key}", "must not be given (set by the runner)")
        for div in divs:
            for seed in abl_seeds:
                out.append({"name": name, "label": label, "divergence": div, "seed": seed, "overrides": over})
    return out


# ------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class Run:
    """One training run of the matrix (or a reference model with ``config=None``)."""

    name: str
    row: str  # the table row it belongs to
    group: str  # main | ablation | baseline | reference
    seed: int | None
    method: str  # kd | pocl | sft | seqkd | reference
    divergence: str | None
    config: dict | None  # the pocl distill config (sections), None for reference models
    model_path: str | None = None  # reference models

    @property
    def is_pocl(self) -> bool:
        return self.method == "pocl"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, items in extra.items():
        out.setdefault(section, {})
        out[section] = {**(out[section] or {}), **items}
    return out


def _stages_and_fractions(curriculum: dict) -> tuple[int, list[float | None]]:
    n = int(curriculum.get("num_stages", 4))
    return n, [o.get("fraction") for o in (curriculum.get("stages") or [])[:n]]


def stage_fractions(curriculum: dict) -> list[float]:
    """The fraction of the training set of each stage: s/n for n equal cumulative slices, or the
    stages[i].fraction overrides (:func:`pocl.curriculum.nominal_fractions`)."""
    from pocl.curriculum.schedule import nominal_fractions

    return nominal_fractions(*_stages_and_fractions(curriculum))


def same_budget_stage_epochs(epochs: float, curriculum: dict) -> float:
    """POCL's epochs per stage so that its sample passes equal ``epochs`` over the whole set:
    ``epochs / sum(fractions)`` (= ``epochs * 2 / (n + 1)`` for n equal slices), by
    :func:`pocl.curriculum.same_budget_stage_epochs`."""
    from pocl.curriculum import schedule

    return schedule.same_budget_stage_epochs(epochs, *_stages_and_fractions(curriculum))


def model_dirs(spec: Spec, *, healed: bool = True) -> tuple[str, str]:
    """(teacher, initial student) as the runs see them: after the GGUF conversion, init-student and,
    with ``healed``, the healing run (its final/)."""
    teacher = str(spec.output_dir / "models" / "teacher") if spec.teacher.endswith(".gguf") else spec.teacher
    student = str(spec.output_dir / "models" / "student") if isinstance(spec.student, dict) else spec.student
    if healed and spec.heal:
        student = str(spec.output_dir / "models" / "heal" / "final")
    return teacher, student


HEAL_OWN_DATA_KEYS = ("train_file", "dev_file", "train_split", "dev_split", "max_train_samples", "max_dev_samples")


def heal_run(spec: Spec) -> Run | None:
    """The healing run: ``pocl distill`` of the new student with ``base`` overridden by ``models.heal``
    (default ``loss.method: sft``), into OUTPUT/models/heal; its final/ is every run's initial student.
    Which rows it trains on (``HEAL_OWN_DATA_KEYS``) comes from ``models.heal.data`` only; the other data
    settings (template, lengths) are the matrix's."""
    if not spec.heal:
        return None
    from pocl.config import DistillConfig

    teacher, student = model_dirs(spec, healed=False)
    if not (spec.heal.get("data") or {}).get("train_file"):
        raise _fail(spec.path, "models.heal.data.train_file", "is required (rows the matrix does not train or "
                                                              "evaluate on, e.g. the dev split)")
    base = copy.deepcopy(spec.base)  # the data to heal on is the heal section's own, not the matrix's
    base["data"] = {k: v for k, v in (base.get("data") or {}).items() if k not in HEAL_OWN_DATA_KEYS}
    config = _merge(_merge(base, {"model": {"teacher": teacher, "student": student}, "loss": {"method": "sft"},
                                  "curriculum": {"curriculum": "none"}}), spec.heal)
    config = _merge(config, {"train": {"output_dir": str(spec.output_dir / "models" / "heal")}})
    try:
        DistillConfig.from_dict(config)
    except PoclError as exc:
        raise ConfigError(f"{spec.path}: models.heal: {exc}") from None
    return Run("heal", "-", "prepare", config["train"].get("seed"), config["loss"]["method"], None, config)


def build_plan(spec: Spec) -> list[Run]:
    """Every run of the matrix, in the order they are run: main matrix by seed, baselines, ablations."""
    from pocl.config import DistillConfig

    teacher, student = model_dirs(spec)
    base = _merge(spec.base, {"model": {"teacher": teacher, "student": student}})
    epochs = float((base.get("train") or {}).get("epochs", 20))
    cur = base.get("curriculum") or {}
    stage_epochs = same_budget_stage_epochs(epochs, cur)
    runs: list[Run] = []

    def add(name, row, group, seed, method, divergence, extra):
        extra = _merge(extra, {"train": {"seed": seed, "output_dir": str(spec.output_dir / "runs" / name)}})
        if method == "pocl":
            extra = _merge(extra, {"curriculum": {"curriculum": "pocl", "stage_epochs": stage_epochs}})
        else:
            extra = _merge(extra, {"curriculum": {"curriculum": "none"}})
        config = _merge(base, extra)
        if method == "pocl":
            # The stages carry their own length (stage_epochs: the same budget), alpha and T; the plain-KD
            # values of the base would be refused (epochs) or override every stage (alpha, temperature).
            config["train"] = {k: v for k, v in (config.get("train") or {}).items() if k != "epochs"}
            config["loss"] = {k: v for k, v in (config.get("loss") or {}).items() if k not in ("alpha", "temperature")}
        try:
            DistillConfig.from_dict(config)  # pocl's own checks, with its messages
        except PoclError as exc:
            raise ConfigError(f"{spec.path}: run {name}: {exc}") from None
        runs.append(Run(name, row, group, seed, method, divergence, config))

    for seed in spec.seeds:
        for div in spec.divergences:
            for method in spec.methods:
                row = div.upper() + ("+POCL" if method == "pocl" else "")
                add(f"{method}-{div}-s{seed}", row, "main", seed, method, div, {"loss": {"divergence": div}})
        for b in spec.baselines:
            add(f"{b}-s{seed}", b.upper() if b == "sft" else "SeqKD", "baseline", seed, b, None,
                {"loss": {"method": b}})
    for a in spec.ablations:
        div = a["divergence"]
        add(f"pocl-{div}-{a['name']}-s{a['seed']}", f"{div.upper()}+POCL, {a['label']}", "ablation", a["seed"], "pocl",
            div, {"loss": {"divergence": div}, "curriculum": a["overrides"]})
    refs = {"teacher": ("teacher", teacher), "student": ("student (initial)", student)}
    runs += [Run(r, refs[r][0], "reference", None, "reference", None, None, refs[r][1]) for r in spec.reference_models]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{spec.path}: two runs are both named {dupes[0]} (check divergences and ablations)")
    return runs


# ------------------------------------------------------------------------------------------ state
def run_dir(spec: Spec, run: Run) -> Path:
    return Path(run.config["train"]["output_dir"]) if run.config is not None else spec.output_dir / "runs" / run.name


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_status(spec: Spec, run: Run) -> tuple[str, list[str]]:
    """(done | partial | todo | changed, differences): done = completed with the same training config."""
    from pocl.config import DistillConfig

    folder = run_dir(spec, run)
    summary = _read_json(folder / "summary.json")
    if summary is None or summary.get("status") != "completed" or not (folder / "final").is_dir():
        return ("partial" if (folder / "checkpoints").is_dir() else "todo"), []
    try:
        old = DistillConfig.from_yaml(folder / "config.yaml")
    except PoclError:
        return "changed", ["config.yaml of the finished run cannot be read"]
    new = DistillConfig.from_dict(run.config)
    if old.training_hash() == new.training_hash():
        return "done", []
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    skip = ("train.output_dir", "train.progress", "train.tensorboard", "train.log_every")
    return "changed", [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                       if a.get(k) != b.get(k) and k not in skip]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def samples_trained(summary: dict, batch_size: int) -> int:
    """The number of samples the run's optimizer steps trained on, from ``summary.json``'s stages: an
    epoch of a stage with n samples is ceil(n / batch_size) windows, the last one n mod batch_size."""
    total = 0
    for st in summary.get("stages", []):
        n, steps = int(st["num_samples"]), int(st["steps"])
        spe = max(1, math.ceil(n / batch_size))
        sizes = [min(batch_size, n - k * batch_size) for k in range(spe)]
        full, rest = divmod(steps, spe)
        total += full * n + sum(sizes[:rest])
    return total


# ------------------------------------------------------------------------------------------ execution
class Interrupted(Exception):
    pass


def _command(kind: str, config_path: Path, extra: list[str]) -> list[str]:
    return ["distill" if kind == "distill" else "rank", "--config", str(config_path), *extra]


def run_pocl(argv: list[str], log_path: Path, *, in_process: bool) -> int:
    """``pocl ARGV`` as a subprocess (output appended to ``log_path``) or through ``pocl.cli.main``.
    Ctrl-C / SIGTERM are passed on to the run (it saves a checkpoint) and raise Interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("$ pocl %s   (log: %s)", " ".join(argv), log_path)
    if in_process:
        from pocl.cli import main

        code = main(argv)
    else:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ pocl {' '.join(argv)}\n")
            fh.flush()
            # Its own session: a Ctrl-C in the terminal reaches the run once, through this loop (pocl stops
            # at the second signal without saving, so it must not get the terminal's copy as well).
            proc = subprocess.Popen([sys.executable, "-m", "pocl", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
            try:
                while True:
                    try:
                        code = proc.wait()
                        break
                    except KeyboardInterrupt:
                        proc.send_signal(signal.SIGINT)
            finally:
                signal.signal(signal.SIGTERM, previous)
    if code == 130:
        raise Interrupted(f"pocl {argv[0]} was interrupted; run the same command again to resume")
    return code


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(data, sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def prepare_models(spec: Spec, *, in_process: bool = False) -> None:
    """Convert a .gguf teacher once; make the student with init-student once; heal it once."""
    from pocl.student_init import init_student

    teacher, student = model_dirs(spec, healed=False)

    def done(folder: str, source: str, options: dict) -> bool:
        info = _read_json(Path(folder) / "init_student.json")
        return info is not None and info.get("teacher") == source and info.get("options") == options

    if spec.teacher.endswith(".gguf") and not done(teacher, spec.teacher, {"keep_every": 1}):
        log.info("converting the GGUF teacher %s -> %s", spec.teacher, teacher)
        init_student(spec.teacher, teacher, keep_every=1)
        _add_options(teacher, {"keep_every": 1})
    if isinstance(spec.student, dict) and not done(student, teacher, spec.student):
        log.info("making the student from %s with %s -> %s", teacher, spec.student, student)
        opts = dict(spec.student)
        init_student(teacher, student, keep_layers=opts.get("keep_layers"), keep_every=opts.get("keep_every"),
                     num_layers=opts.get("num_layers"), keep_last=opts.get("keep_last", True))
        _add_options(student, spec.student)
    heal = heal_run(spec)
    if heal is not None:
        status, diff = training_status(spec, heal)
        if status == "changed":
            raise ConfigError(f"{spec.path}: models.heal: the healing run in {run_dir(spec, heal)} was made with "
                              f"another config ({'; '.join(diff[:6])}); delete that folder to heal again (every run "
                              "starts from it)")
        if status != "done":
            cfg = _write_yaml(spec.output_dir / "configs" / "heal.yaml", heal.config)
            if run_pocl(_command("distill", cfg, []), spec.output_dir / "logs" / "heal.log", in_process=in_process):
                raise PoclError(f"the healing run failed; see {spec.output_dir / 'logs' / 'heal.log'}")


def _add_options(folder: str, options: dict) -> None:
    path = Path(folder) / "init_student.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    info["options"] = options
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def rank_config(spec: Spec, plan: list[Run]) -> dict:
    """The ``pocl rank`` config: the first POCL run's of ``plan``, with the paper's measurer (both signals).
    Only the model, data and measurer settings matter for the ranking (they are its stamp)."""
    first = next(r for r in plan if r.is_pocl)
    config = _merge(first.config, {"train": {"output_dir": str(spec.output_dir / "ranking")},
                                   "curriculum": {"measurer": "rrf"}})
    return config


def seed_ranking(spec: Spec, run: Run) -> None:
    """Start a POCL run from the shared ranking (pocl checks its stamp and re-orders for its measurer)."""
    src = spec.output_dir / "ranking" / "ranking.jsonl"
    dst = run_dir(spec, run) / "ranking.jsonl"
    if dst.exists() or not src.is_file():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    for name in ("ranking.jsonl", "ranking.meta.json"):
        shutil.copyfile(src.with_name(name), dst.with_name(name))


def train_all(spec: Spec, plan: list[Run], *, in_process: bool, rerun_changed: bool) -> dict[str, str]:
    """Rank once, then every training run that is not done. Returns run name -> status."""
    statuses = {r.name: training_status(spec, r) for r in plan if r.config is not None}
    changed = [(n, d) for n, (s, d) in statuses.items() if s == "changed"]
    if changed and not rerun_changed:
        lines = "\n".join(f"  {n}: " + "; ".join(d[:6]) for n, d in changed)
        raise ConfigError(f"{len(changed)} finished runs were made with another config (spec {spec.path}):\n{lines}\n"
                          "Delete their folders under " + str(spec.output_dir / "runs") + " or pass --rerun-changed.")
    todo = [r for r in plan if r.config is not None and statuses[r.name][0] != "done"]
    if any(r.is_pocl for r in todo):
        # from the whole matrix, not this --only selection: ranking.yaml is then the same file on every call
        cfg = _write_yaml(spec.output_dir / "configs" / "ranking.yaml", rank_config(spec, build_plan(spec)))
        if run_pocl(_command("rank", cfg, []), spec.output_dir / "logs" / "ranking.log", in_process=in_process):
            raise PoclError(f"pocl rank failed; see {spec.output_dir / 'logs' / 'ranking.log'}")
    result = {n: s for n, (s, _) in statuses.items()}
    for i, run in enumerate(todo, 1):
        log.info("[%d/%d] %s (%s)", i, len(todo), run.name, statuses[run.name][0])
        cfg = _write_yaml(spec.output_dir / "configs" / f"{run.name}.yaml", run.config)
        if run.is_pocl:
            seed_ranking(spec, run)
        extra = ["--overwrite"] if statuses[run.name][0] == "changed" else []
        t0 = time.perf_counter()
        code = run_pocl(_command("distill", cfg, extra), spec.output_dir / "logs" / f"{run.name}.log",
                        in_process=in_process)
        result[run.name] = "done" if code == 0 else f"failed (exit {code})"
        log.info("%s: %s in %.0f s", run.name, result[run.name], time.perf_counter() - t0)
    return result


# ------------------------------------------------------------------------------------------ evaluation
def eval_config_dict(spec: Spec, name: str, model_path: str) -> dict:
    return {**spec.eval, "models": [f"{name}={model_path}"], "output_dir": str(spec.output_dir / "eval" / name)}


def model_path_of(spec: Spec, run: Run) -> Path | str:
    return run.model_path if run.config is None else run_dir(spec, run) / spec.checkpoint


def evaluate(spec: Spec, run: Run, *, progress: bool = True) -> dict | None:
    """The run's ``pocl eval`` results.json, from the cache when its stamp still matches. None when the
    model does not exist (the run is not finished)."""
    from pocl.config.eval import EvalConfig
    from pocl.evaluation.runner import run_eval
    from pocl.fingerprints import model_fingerprint, stable_hash

    path = model_path_of(spec, run)
    if run.config is not None and not Path(path).is_dir():
        return None
    values = eval_config_dict(spec, run.name, str(path))
    config = EvalConfig.from_dict({**values, "progress": progress and values.get("progress", True)})
    settings = {k: v for k, v in config.to_dict().items() if k not in ("output_dir", "progress")}
    stamp = {"settings": stable_hash(settings), "model": model_fingerprint(str(path))}
    out = Path(config.output_dir)
    cached = _read_json(out / "results.json")
    if cached is not None and _read_json(out / "stamp.json") == stamp:
        return cached
    log.info("evaluating %s (%s)", run.name, path)
    report = run_eval(config)
    (out / "stamp.json").write_text(json.dumps(stamp) + "\n", encoding="utf-8")
    return report.data


# ------------------------------------------------------------------------------------------ tables
def _entry(values: list[float], seeds: list) -> dict:
    from pocl.evaluation.metrics import mean_std

    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "seeds": list(seeds), "per_seed": list(values)}


def run_record(spec: Spec, run: Run, evaluation: dict | None) -> dict:
    """One run's line of results.json: config essentials, budget, times, scores per set and Avg."""
    rec: dict[str, Any] = {"name": run.name, "row": run.row, "group": run.group, "seed": run.seed,
                           "method": run.method, "divergence": run.divergence}
    if run.config is not None:
        folder = run_dir(spec, run)
        rec["output_dir"] = str(folder)
        rec["command"] = f"pocl distill --config {spec.output_dir / 'configs' / (run.name + '.yaml')}"
        summary = _read_json(folder / "summary.json") or {}
        rec["status"] = summary.get("status", "not started")
        if summary.get("status") == "completed":
            bs = int(run.config["train"].get("batch_size", 64))
            n_all = max(int(st["num_samples"]) for st in summary["stages"])
            seen = samples_trained(summary, bs)
            rank = summary.get("ranking") or {}
            rec.update(
                train_samples=n_all, samples_trained=seen, sample_passes=seen / n_all,
                planned_passes=sum(float(st["epochs"]) * int(st["num_samples"]) for st in summary["stages"]) / n_all,
                steps=summary["global_steps"], train_seconds=summary["train_seconds"],
                ranking_seconds=rank.get("measure_seconds") if run.is_pocl else None,
                ranking_action=rank.get("action") if run.is_pocl else None,
                stages=[{k: st.get(k) for k in ("name", "num_samples", "epochs", "steps", "temperature", "alpha",
                                                "skew", "train_seconds")} for st in summary["stages"]],
                best_metric=summary.get("best_metric"), selection_metric=summary.get("selection_metric"))
            if run.is_pocl:
                rec["measurer"] = summary.get("measurer")
    else:
        rec.update(status="reference", output_dir=str(run.model_path))
    if evaluation is not None:
        m = evaluation["models"][run.name]
        rec["eval_dir"] = str(spec.output_dir / "eval" / run.name)
        rec["eval_seeds"] = evaluation["seeds"]
        rec["scores"] = {metric: {s: m["sets"][s][metric]["mean"] for s in evaluation["sets"]}
                         | {"Avg": m["avg"][metric]["mean"]} for metric in ("rouge_l", "exact_match")}
        rec["scores_eval_seed_std"] = {metric: {s: m["sets"][s][metric]["std"] for s in evaluation["sets"]}
                                       | {"Avg": m["avg"][metric]["std"]} for metric in ("rouge_l", "exact_match")}
        rec["eval_seconds"] = sum(m["sets"][s]["seconds"]["total"] for s in evaluation["sets"])
    return rec


def build_table(records: list[dict], sets: list[str], rows: list[str], seeds: list[int]) -> dict:
    """The table in ``pocl eval``'s results.json layout (so its Markdown and plot code apply): one
    "model" per method row; per set and Avg the mean ± std over the row's training seeds of each run's
    score (a reference model, trained once, shows the std over the evaluation seeds)."""
    table = {"schema": SCHEMA, "sets": {s: {} for s in sets}, "seeds": seeds, "std": "sample", "models": {}}
    for row in rows:
        recs = sorted((r for r in records if r["row"] == row and "scores" in r), key=lambda r: r["seed"] or 0)
        if not recs:
            continue
        entry: dict[str, Any] = {"sets": {s: {} for s in sets}, "avg": {}, "runs": [r["name"] for r in recs]}
        for metric in ("rouge_l", "exact_match"):
            for col in sets + ["Avg"]:
                if recs[0]["group"] == "reference":
                    cell = {"mean": recs[0]["scores"][metric][col],
                            "std": recs[0]["scores_eval_seed_std"][metric][col], "seeds": recs[0]["eval_seeds"],
                            "per_seed": None}
                else:
                    cell = _entry([r["scores"][metric][col] for r in recs], [r["seed"] for r in recs])
                (entry["avg"] if col == "Avg" else entry["sets"][col])[metric] = cell
        table["models"][row] = entry
    return table


def _cost_rows(records: list[dict], rows: list[str]) -> list[list[str]]:
    out = []
    kd = {(r["divergence"], r["seed"]): r for r in records if r["method"] == "kd" and "samples_trained" in r}
    for row in rows:
        recs = [r for r in records if r["row"] == row and "samples_trained" in r]
        if not recs:
            continue
        mean = lambda k: sum(r[k] for r in recs) / len(recs)  # noqa: E731
        rank = [r["ranking_seconds"] for r in recs if r.get("ranking_seconds") is not None]
        rank_s = sum(rank) / len(rank) if rank else None
        share = "–" if rank_s is None else f"{100 * rank_s / (rank_s + mean('train_seconds')):.1f}%"
        same = []
        for r in recs:
            ref = kd.get((r["divergence"], r["seed"]))
            if r["method"] == "pocl" and ref is not None:
                same.append(r["samples_trained"] == ref["samples_trained"])
        budget = "–" if not same else ("yes" if all(same) else f"NO ({sum(same)}/{len(same)})")
        out.append([row, str(len(recs)), f"{mean('samples_trained'):.0f}", f"{mean('sample_passes'):.3g}", budget,
                    f"{mean('train_seconds'):.1f}", "–" if rank_s is None else f"{rank_s:.1f}", share])
    return out


def paired_differences(records: list[dict], sets: list[str], metric: str = "rouge_l") -> list[dict]:
    """KD + POCL minus plain KD, paired by divergence and training seed: per set and Avg the mean and
    sample std of the per-seed differences and the number of seeds on which POCL scored higher. (All runs
    start from the same initial student and use the same evaluation seeds; the training seed sets the
    shuffling, so the pairing is a convention and the win count says whether the sign is consistent.)"""
    from pocl.evaluation.metrics import mean_std

    kd = {(r["divergence"], r["seed"]): r for r in records
          if r["group"] == "main" and r["method"] == "kd" and "scores" in r}
    out = []
    for div in dict.fromkeys(r["divergence"] for r in records if r["group"] == "main"):
        pairs = [(r, kd[(div, r["seed"])]) for r in records
                 if r["group"] == "main" and r["method"] == "pocl" and r["divergence"] == div and "scores" in r
                 and (div, r["seed"]) in kd]
        if not pairs:
            continue
        row = {"divergence": div, "seeds": [r["seed"] for r, _ in pairs], "cols": {}}
        for col in sets + ["Avg"]:
            d = [p["scores"][metric][col] - k["scores"][metric][col] for p, k in pairs]
            mean, std = mean_std(d)
            std = std if len(d) > 1 else float("nan")  # one pair: no spread (not 0)
            row["cols"][col] = {"mean": mean, "std": std, "wins": sum(x > 0 for x in d), "n": len(d), "per_seed": d}
        out.append(row)
    return out


def _paired_lines(records: list[dict], sets: list[str]) -> list[str]:
    lines = []
    for metric, title in (("rouge_l", "ROUGE-L"), ("exact_match", "exact match")):
        rows = paired_differences(records, sets, metric)
        if not rows:
            continue
        lines += [f"## KD + POCL minus KD, paired by seed ({title})", "",
                  "Per divergence and set: mean ± sample std over the training seeds of (POCL run − KD run of the "
                  "same seed), and on how many seeds POCL scored higher.", "",
                  "| divergence | " + " | ".join(sets + ["Avg"]) + " |", "|" + "---|" * (len(sets) + 2)]
        for r in rows:
            cells = []
            for col in sets + ["Avg"]:
                c = r["cols"][col]
                std = "" if math.isnan(c["std"]) else f" ± {c['std']:.2f}"
                cells.append(f"{c['mean']:+.2f}{std} ({c['wins']}/{c['n']})")
            lines.append(f"| {r['divergence'].upper()} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(spec: Spec, table: dict, records: list[dict], rows: list[str]) -> str:
    from pocl.evaluation.report import results_table

    train = [r for r in records if r["group"] != "reference"]
    done = sum(1 for r in train if "scores" in r)
    ev = next((r for r in records if "eval_seeds" in r), {})
    lines = [f"# Experiment matrix `{spec.path.name}`", "",
             f"{done} of {len(train)} training runs evaluated. Each run's score is the mean over the evaluation "
             f"seeds {ev.get('eval_seeds', '?')} (`pocl eval` protocol of `{spec.path.name}`); a cell is the mean ± "
             f"sample std of that score over the training seeds {spec.seeds} (teacher and initial student: one model, "
             "± = std over the evaluation seeds). Avg = mean over the sets. Scores × 100.", ""]
    for metric, title in (("rouge_l", "ROUGE-L"), ("exact_match", "Exact match")):
        text = results_table(table, metric)
        lines += [f"## {title}", "", text.replace("| model |", "| method |", 1), ""]
    lines += _paired_lines(records, list(table["sets"]))
    header = ["method", "runs", "samples trained", "passes", "same budget as KD", "train s", "ranking s",
              "ranking share"]
    body = _cost_rows(records, rows)
    lines += ["## Budget and cost", "",
              "Samples trained = optimizer steps × their batches, from each run's summary.json; passes = that / "
              "training-set size; same budget: equal to the KD run of the same divergence and seed. Ranking s = the "
              "measurement pass of the initial student (made once, shared by every POCL run); share = ranking / "
              "(ranking + training).", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def row_order(plan: list[Run]) -> list[str]:
    rows = []
    for group in ("reference", "baseline", "main", "ablation"):
        for r in plan:
            if r.group == group and r.row not in rows:
                rows.append(r.row)
    return rows


def write_results(spec: Spec, plan: list[Run], evaluations: dict[str, dict | None], *, plots: bool = True) -> dict:
    from pocl.evaluation.runner import atomic_write_text

    records = [run_record(spec, r, evaluations.get(r.name)) for r in plan]
    sets = next((list(e["sets"]) for e in evaluations.values() if e), [])
    rows = row_order(plan)
    table = build_table(records, sets, rows, spec.seeds)
    out = spec.output_dir
    teacher, student = model_dirs(spec)
    models: dict[str, Any] = {"teacher": teacher, "teacher_source": spec.teacher, "initial_student": student,
                              "student_init": _read_json(Path(model_dirs(spec, healed=False)[1]) / "init_student.json")}
    heal = heal_run(spec)
    if heal is not None:
        hs = _read_json(run_dir(spec, heal) / "summary.json") or {}
        models["heal"] = {"command": f"pocl distill --config {spec.output_dir / 'configs' / 'heal.yaml'}",
                          "status": hs.get("status"), "steps": hs.get("global_steps"),
                          "train_seconds": hs.get("train_seconds"), "method": heal.method}
    data = {"schema": SCHEMA, "spec": str(spec.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "models": models, "table": table, "runs": records}
    atomic_write_text(out / "results.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "results.md", markdown(spec, table, records, rows))
    if plots and table["models"]:
        from pocl.reporting.plots import plot_eval_comparison

        groups = {r.row: r.group for r in plan}
        for part, keep in (("main", ("reference", "baseline", "main")), ("ablations", ("ablation",))):
            chosen = [row for row in table["models"] if groups[row] in keep]
            if part == "ablations" and chosen:  # next to the full POCL and KD rows of the same divergences
                divs = {r.divergence.upper() for r in plan if r.group == "ablation"}
                chosen = [row for row in table["models"] if row in {d for d in divs} | {d + "+POCL" for d in divs}] \
                    + chosen
            if not chosen:
                continue
            sub = dict(table, models={row: table["models"][row] for row in chosen})
            atomic_write_text(out / "tables" / f"{part}.json", json.dumps(sub, indent=2, ensure_ascii=False) + "\n")
            plot_eval_comparison([out / "tables" / f"{part}.json"], out / "plots" / f"{part}_rouge_l.png",
                                 title=f"ROUGE-L, {part} (error bars: std over training seeds)")
    return data


def export_results(spec: Spec, dest: Path) -> list[Path]:
    """Copy the matrix's results (tables, JSON, plots) into ``dest``, e.g. a documentation folder."""
    written = []
    for rel in ["results.md", "results.json"] + sorted(
            str(p.relative_to(spec.output_dir)) for sub in ("tables", "plots")
            for p in (spec.output_dir / sub).glob("*") if p.is_file()):
        src, dst = spec.output_dir / rel, dest / rel
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(dst)
    return written


# ------------------------------------------------------------------------------------------ dry run
def _count_rows(path: str) -> int | None:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return None


def estimate_seconds(spec: Spec, plan: list[Run]) -> dict[str, float] | None:
    """Rough wall time from the spec's measured per-sample figures (``estimate:``), or None."""
    est = spec.estimate
    if not est:
        return None
    data = spec.base.get("data") or {}
    n = data.get("max_train_samples") or _count_rows(data["train_file"]) or 0
    epochs = float((spec.base.get("train") or {}).get("epochs", 20))
    train_runs = [r for r in plan if r.config is not None]
    train = len(train_runs) * (n * epochs * est.get("seconds_per_train_sample", 0)
                               + est.get("seconds_per_run_overhead", 0))
    rank = n * est.get("seconds_per_rank_sample", 0) if any(r.is_pocl for r in plan) else 0.0
    prompts = 0
    from pocl.config.eval import default_set_name, named_specs

    for _, path in named_specs(list(spec.eval["data"]), kind="data", default_name=default_set_name):
        rows = _count_rows(path) or 0
        prompts += min(rows, spec.eval.get("max_samples") or rows)
    seeds = 1 if spec.eval.get("greedy") else len(spec.eval.get("seeds", [10, 20, 30, 40, 50]))
    student_evals = len(train_runs) + ("student" in spec.reference_models)
    ev = prompts * seeds * (student_evals * est.get("seconds_per_eval_prompt", 0)
                            + ("teacher" in spec.reference_models) * est.get("seconds_per_teacher_eval_prompt", 0))
    heal = heal_run(spec)
    healing = 0.0
    if heal is not None:
        hd = heal.config["data"]
        hn = hd.get("max_train_samples") or _count_rows(hd["train_file"]) or 0
        healing = hn * float(heal.config["train"].get("epochs", 20)) * est.get("seconds_per_heal_sample", 0)
    return {"train": train, "ranking": rank, "eval": ev, "heal": healing, "total": train + rank + ev + healing,
            "train_samples": n, "eval_prompts_per_model": prompts * seeds}


def print_plan(spec: Spec, plan: list[Run]) -> None:
    teacher, student = model_dirs(spec)
    print(f"spec: {spec.path}\noutput: {spec.output_dir}")
    if spec.teacher.endswith(".gguf"):
        print(f"teacher: {spec.teacher} -> converted once to {teacher}")
    else:
        print(f"teacher: {teacher}")
    raw_student = model_dirs(spec, healed=False)[1]
    print(f"student: {raw_student}" + (f" (pocl init-student {spec.student} of the teacher)"
                                       if isinstance(spec.student, dict) else ""))
    heal = heal_run(spec)
    if heal is not None:
        d = heal.config["data"]
        print(f"healing: pocl distill --config {spec.output_dir / 'configs' / 'heal.yaml'} ({heal.method} on "
              f"{d['train_file']}, {d.get('max_train_samples') or 'all'} samples, "
              f"{heal.config['train'].get('epochs', 20)} epochs; {training_status(spec, heal)[0]}) -> initial student "
              f"{student}")
    train = [r for r in plan if r.config is not None]
    if any(r.is_pocl for r in train):
        print(f"ranking: pocl rank --config {spec.output_dir / 'configs' / 'ranking.yaml'} (once, shared)")
    print(f"\n{'run':<34} {'row':<30} {'seed':>5} {'epochs':>14} {'passes':>7} {'status':<9} eval")
    for r in plan:
        if r.config is None:
            status, epochs, passes, seed = "-", "-", "-", "-"
        else:
            status = training_status(spec, r)[0]
            tr, cur = r.config["train"], r.config["curriculum"]
            if r.is_pocl:
                fr = stage_fractions(cur)
                epochs = f"{cur['stage_epochs']:.3g}/stage x{len(fr)}"
                passes = f"{cur['stage_epochs'] * sum(fr):.3g}"
            else:
                epochs = f"{float(tr.get('epochs', 20)):.3g}"
                passes = epochs
            seed = str(r.seed)
        ev = "cached" if (spec.output_dir / "eval" / r.name / "stamp.json").is_file() else "todo"
        print(f"{r.name:<34} {r.row:<30} {seed:>5} {epochs:>14} {passes:>7} {status:<9} {ev}")
    print(f"\n{len(train)} training runs, {len(plan)} evaluations; each run: python -m pocl distill --config "
          f"{spec.output_dir / 'configs' / 'RUN.yaml'}")
    est = estimate_seconds(spec, plan)
    if est:
        print(f"estimate ({est['train_samples']} training samples, {est['eval_prompts_per_model']} generations per "
              f"model): healing {est['heal'] / 3600:.2f} h, training {est['train'] / 3600:.2f} h, ranking "
              f"{est['ranking'] / 3600:.2f} h, evaluation {est['eval'] / 3600:.2f} h, total {est['total'] / 3600:.2f} h")


# ------------------------------------------------------------------------------------------ main
def run_matrix(spec: Spec, *, only: list[str] | None = None, in_process: bool = False, rerun_changed: bool = False,
               evaluate_runs: bool = True, train: bool = True, progress: bool = True, plots: bool = True) -> dict:
    """The whole matrix (or the runs matching the ``only`` glob patterns); returns results.json's content."""
    plan = build_plan(spec)
    selected = [r for r in plan if not only or any(fnmatch.fnmatch(r.name, p) for p in only)]
    if not selected:
        raise ConfigError(f"--only {' '.join(only or [])} matches no run of {spec.path}")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    if train:
        prepare_models(spec, in_process=in_process)
        statuses = train_all(spec, selected, in_process=in_process, rerun_changed=rerun_changed)
        failed = {n: s for n, s in statuses.items() if s.startswith("failed")}
    else:
        failed = {}
    evaluations: dict[str, dict | None] = {}
    for r in plan:
        if r in selected and evaluate_runs and r.name not in failed:
            evaluations[r.name] = evaluate(spec, r, progress=progress)
        else:  # runs outside --only still appear in the table when their evaluation is cached
            cached = spec.output_dir / "eval" / r.name / "results.json"
            evaluations[r.name] = _read_json(cached) if (cached.parent / "stamp.json").is_file() else None
    data = write_results(spec, plan, evaluations, plots=plots)
    if failed:
        raise PoclError("runs failed: " + ", ".join(f"{n} ({s})" for n, s in failed.items())
                        + f"; logs in {spec.output_dir / 'logs'}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="The matrix spec (YAML), e.g. examples/experiments/smollm2_dolly.yaml.")
    p.add_argument("--dry-run", action="store_true", help="Print the plan (runs, budgets, status, estimate) only.")
    p.add_argument("--only", nargs="+", metavar="GLOB", help="Run only the runs whose name matches (e.g. 'kd-*').")
    p.add_argument("--in-process", action="store_true", help="Run pocl in this process instead of subprocesses.")
    p.add_argument("--rerun-changed", action="store_true",
                   help="Retrain finished runs whose config differs from the spec (default: stop and list them).")
    p.add_argument("--no-eval", action="store_true", help="Train only; the table shows cached evaluations.")
    p.add_argument("--table-only", action="store_true", help="No training or evaluation: rebuild the tables.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars in the evaluations.")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="Afterwards copy results.md, results.json, tables/ and plots/ into DIR (e.g. docs/results/).")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[%(name)s] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        spec = load_spec(args.spec)
        if args.dry_run:
            print_plan(spec, build_plan(spec))
            return 0
        run_matrix(spec, only=args.only, in_process=args.in_process, rerun_changed=args.rerun_changed,
                   evaluate_runs=not (args.no_eval or args.table_only), train=not args.table_only,
                   progress=not args.no_progress)
    except Interrupted as exc:
        print(f"run_matrix: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("run_matrix: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except PoclError as exc:
        print(f"run_matrix: error: {exc}", file=sys.stderr)
        return 2
    print(f"results: {spec.output_dir / 'results.md'}, {spec.output_dir / 'results.json'}")
    if args.export:
        for path in export_results(spec, Path(args.export)):
            print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
