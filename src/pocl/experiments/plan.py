"""The plan of a matrix: every run (``Run``) with its pocl distill config, the same-sample-budget
stage lengths, the healing run, where each run lives on disk and whether it is already trained."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from pocl.config import DistillConfig
from pocl.errors import ConfigError, PoclError
from pocl.experiments.spec import POCL_METHODS, Spec, spec_error


@dataclasses.dataclass
class Run:
    """One training run of the matrix (or a reference model with ``config=None``)."""

    name: str
    row: str  # the table row it belongs to
    group: str  # main | ablation | baseline | reference
    seed: int | None
    method: str  # one of spec.METHODS (main matrix; ablations: pocl) | sft | seqkd | reference
    divergence: str | None
    config: dict | None  # the pocl distill config (sections), None for reference models
    model_path: str | None = None  # reference models

    @property
    def is_pocl(self) -> bool:
        """True for a run with the POCL curriculum (pocl, taid-pocl, skd-pocl, pocl-assistant, the ablations)."""
        return self.method in POCL_METHODS


def merge(base: dict, extra: dict) -> dict:
    """A deep copy of the config ``base`` with the sections of ``extra`` merged in key by key."""
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
    stages[i].fraction overrides (:func:`pocl.curriculum.schedule.nominal_fractions`)."""
    # imported here: the pocl.curriculum package loads torch (importing pocl.experiments does not)
    from pocl.curriculum.schedule import nominal_fractions

    return nominal_fractions(*_stages_and_fractions(curriculum))


def same_budget_stage_epochs(epochs: float, curriculum: dict) -> float:
    """POCL's epochs per stage so that its sample passes equal ``epochs`` over the whole set:
    :func:`pocl.curriculum.schedule.same_budget_stage_epochs` for the stages of the curriculum section
    ``curriculum`` (``epochs / sum(fractions)``, ``epochs * 2 / (n + 1)`` for n equal slices)."""
    from pocl.curriculum import schedule  # imported here: it loads torch

    return schedule.same_budget_stage_epochs(epochs, *_stages_and_fractions(curriculum))


def model_dirs(spec: Spec, *, healed: bool = True) -> tuple[str, str]:
    """(teacher, initial student) as the runs see them: after the GGUF conversion, init-student and,
    with ``healed``, the healing run (its final/)."""
    teacher = str(spec.output_dir / "models" / "teacher") if spec.teacher.endswith(".gguf") else spec.teacher
    student = str(spec.output_dir / "models" / "student") if isinstance(spec.student, dict) else spec.student
    if healed and spec.heal:
        student = str(spec.output_dir / "models" / "heal" / "final")
    return teacher, student


def assistant_dir(spec: Spec, *, healed: bool = True) -> str | None:
    """The assistant teacher of pocl-assistant as its runs see it (None without ``models.assistant``): made by
    init-student of the teacher (OUTPUT/models/assistant) or the given path, healed like the student
    (OUTPUT/models/heal-assistant/final) when the spec has ``models.heal`` and ``healed``."""
    if spec.assistant is None:
        return None
    if healed and spec.heal:
        return str(spec.output_dir / "models" / "heal-assistant" / "final")
    return str(spec.output_dir / "models" / "assistant") if isinstance(spec.assistant, dict) else spec.assistant


HEAL_OWN_DATA_KEYS = ("train_file", "dev_file", "train_split", "dev_split", "max_train_samples", "max_dev_samples")


def heal_run(spec: Spec, role: str = "student") -> Run | None:
    """The healing run of the new student (``role`` student) or of the assistant teacher (``role`` assistant):
    ``pocl distill`` of it with ``base`` overridden by ``models.heal`` (default ``loss.method: sft``), into
    OUTPUT/models/heal (or heal-assistant); its final/ is every run's initial student (or the assistant). Which
    rows it trains on (``HEAL_OWN_DATA_KEYS``) comes from ``models.heal.data`` only; the other data settings
    (template, lengths) are the matrix's. Returns None when the spec has no ``models.heal`` (or, for the
    assistant, no ``models.assistant``). The assistant's healing takes ``models.assistant_heal`` over ``models.heal``."""
    if not spec.heal or (role == "assistant" and spec.assistant is None):
        return None
    teacher = model_dirs(spec, healed=False)[0]
    model = assistant_dir(spec, healed=False) if role == "assistant" else model_dirs(spec, healed=False)[1]
    name = "heal" if role == "student" else f"heal-{role}"
    if not (spec.heal.get("data") or {}).get("train_file"):
        raise spec_error(spec.path, "models.heal.data.train_file", "is required (rows the matrix does not train or "
                                                                   "evaluate on, e.g. the dev split)")
    base = copy.deepcopy(spec.base)  # the data to heal on is the heal section's own, not the matrix's
    base["data"] = {k: v for k, v in (base.get("data") or {}).items() if k not in HEAL_OWN_DATA_KEYS}
    heal = merge(spec.heal, spec.assistant_heal or {}) if role == "assistant" else spec.heal
    config = merge(merge(base, {"model": {"teacher": teacher, "student": model}, "loss": {"method": "sft"},
                                "curriculum": {"curriculum": "none"}}), heal)
    config = merge(config, {"train": {"output_dir": str(spec.output_dir / "models" / name)}})
    try:
        DistillConfig.from_dict(config)
    except PoclError as exc:
        raise ConfigError(f"{spec.path}: models.heal: {exc}") from None
    return Run(name, "-", "prepare", config["train"].get("seed"), config["loss"]["method"], None, config)


def main_run(method: str, divergence: str | None) -> tuple[str, str]:
    """(run name without the seed, table row) of a main-matrix run: ``kd-fkl`` FKL, ``pocl-fkl`` FKL+POCL,
    ``taid`` TAID, ``taid-pocl`` TAID+POCL (TAID has no divergence), ``skd-fkl`` SKD-FKL, ``skd-pocl-fkl``
    SKD-FKL+POCL, ``pocl-assistant-fkl`` "FKL+POCL, assistant teacher"."""
    if method in ("taid", "taid-pocl"):
        return method, method.upper().replace("-", "+")
    div = divergence.upper()
    return {"kd": (f"kd-{divergence}", div), "pocl": (f"pocl-{divergence}", f"{div}+POCL"),
            "skd": (f"skd-{divergence}", f"SKD-{div}"), "skd-pocl": (f"skd-pocl-{divergence}", f"SKD-{div}+POCL"),
            "pocl-assistant": (f"pocl-assistant-{divergence}", f"{div}+POCL, assistant teacher")}[method]


def method_settings(spec: Spec, method: str, divergence: str | None, base_curriculum: dict) -> dict:
    """The config sections a main-matrix method sets (merged into base): the divergence, loss.method and the
    spec's ``method_loss`` for TAID and SKD, the assistant as the teacher of the first stages for pocl-assistant."""
    family = method.removesuffix("-pocl")
    if family == "taid":
        return {"loss": {"method": "taid", **spec.method_loss.get("taid", {})}}
    if family == "skd":
        return {"loss": {"method": "skd", "divergence": divergence, **spec.method_loss.get("skd", {})}}
    extra: dict[str, Any] = {"loss": {"divergence": divergence}}
    if method == "pocl-assistant":
        own = [dict(st) for st in base_curriculum.get("stages") or []]
        stages = own + [{} for _ in range(spec.assistant_stages - len(own))]
        for st in stages[:spec.assistant_stages]:
            st["teacher"] = assistant_dir(spec)
        extra["curriculum"] = {"stages": stages}
    return extra


def build_plan(spec: Spec) -> list[Run]:
    """Every run of the matrix, in the order they are run: main matrix by seed (per divergence the spec's
    methods, TAID's without a divergence with the first: :func:`main_run`), baselines, ablations,
    then the reference models. Each run's config is checked by pocl's DistillConfig (errors name the
    spec and the run)."""
    teacher, student = model_dirs(spec)
    base = merge(spec.base, {"model": {"teacher": teacher, "student": student}})
    epochs = float((base.get("train") or {}).get("epochs", 20))
    cur = base.get("curriculum") or {}
    stage_epochs = same_budget_stage_epochs(epochs, cur)
    runs: list[Run] = []

    def add(name, row, group, seed, method, divergence, extra):
        extra = merge(extra, {"train": {"seed": seed, "output_dir": str(spec.output_dir / "runs" / name)}})
        pocl = method in POCL_METHODS
        extra = merge(extra, {"curriculum": {"curriculum": "pocl", "stage_epochs": stage_epochs} if pocl else
                              {"curriculum": "none"}})
        config = merge(base, extra)
        if method.startswith("taid"):  # TAID has no temperature (pocl distill forces the stages' to 1)
            config["loss"] = {k: v for k, v in config["loss"].items() if k != "temperature"}
        if pocl:
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
        for i, div in enumerate(spec.divergences):
            for method in spec.methods:
                if method.startswith("taid") and i:
                    continue  # no divergence: one run per seed
                d = None if method.startswith("taid") else div
                stem, row = main_run(method, d)
                add(f"{stem}-s{seed}", row, "main", seed, method, d, method_settings(spec, method, d, cur))
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


def row_order(plan: list[Run]) -> list[str]:
    """The table rows of ``plan``, once each: reference models, baselines, main matrix, ablations."""
    rows = []
    for group in ("reference", "baseline", "main", "ablation"):
        for r in plan:
            if r.group == group and r.row not in rows:
                rows.append(r.row)
    return rows


# ------------------------------------------------------------------------------------------ state
def run_dir(spec: Spec, run: Run) -> Path:
    """The run's output folder (its train.output_dir; OUTPUT/runs/NAME for a reference model)."""
    return Path(run.config["train"]["output_dir"]) if run.config is not None else spec.output_dir / "runs" / run.name


def read_json(path: Path) -> dict | None:
    """The JSON content of ``path``, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_status(spec: Spec, run: Run) -> tuple[str, list[str]]:
    """(done | partial | todo | changed, differences): done = completed with the same training config;
    for changed, the differing settings as ``section.key: old -> new``."""
    folder = run_dir(spec, run)
    summary = read_json(folder / "summary.json")
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
    skip = ("train.output_dir", "train.progress", "train.tensorboard", "train.report_to", "train.log_every")
    return "changed", [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                       if a.get(k) != b.get(k) and k not in skip]
