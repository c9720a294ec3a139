"""The ``curriculum:`` section of a distillation run: the POCL difficulty measurer and Baby Step
scheduler (see ``docs/curriculum.md``), read by ``pocl distill`` and ``pocl rank``. The other sections
are in :mod:`pocl.config.sections`. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from pocl.config.schema import ConfigSection, option
from pocl.errors import suggest

#: The difficulty measurers of the curriculum. Their registry
#: (:data:`pocl.curriculum.difficulty.MEASURERS`) imports torch, which this module must not; a test
#: asserts that the two name the same measurers.
MeasurerName = Literal["rrf", "rouge", "loss", "random", "reverse", "teacher_kl", "teacher_entropy", "rrf_teacher"]
MEASURER_NAMES: tuple[str, ...] = typing.get_args(MeasurerName)


@dataclasses.dataclass
class CurriculumConfig(ConfigSection):
    """The POCL curriculum: difficulty measurer and Baby Step scheduler (see docs/curriculum.md)."""

    section_name = "curriculum"

    curriculum: Literal["none", "pocl"] = option(
        "none", "none: plain KD over the whole training set; pocl: rank the training samples with the initial "
        "student, then train on growing easy-to-hard subsets with rising temperature and alpha.")
    measurer: MeasurerName = option(
        "rrf", "Difficulty order: rrf (reciprocal rank fusion of ROUGE-L and loss ranks, the paper's), rouge or "
        "loss alone, random (a seeded shuffle), reverse (rrf order, hardest first). random and reverse are "
        "ablations with the same stage sizes. With the teacher (an extension; one extra teacher forward pass "
        "over the training set): teacher_kl (KL(teacher || student) on the reference), teacher_entropy (the "
        "teacher's entropy), rrf_teacher (RRF of rouge, loss, teacher_kl and teacher_entropy ranks).")
    rrf_k: int = option(60, "k of reciprocal rank fusion: score = 1/(k + rank_rouge) + 1/(k + rank_loss).")
    ranking_file: str | None = option(None, "Where the ranking is written and reused (default: "
                                      "OUTPUT_DIR/ranking.jsonl). Reused only when its stamp matches the model, "
                                      "data and settings.", metavar="PATH")
    num_stages: int = option(4, "Number of stages n: the ranked data is cut into n equal slices and stage s "
                             "trains on the easiest s slices.")
    stage_epochs: float = option(8, "Epochs per stage (over that stage's subset); --epochs is refused with the "
                                 "curriculum.")
    t_start: float = option(1.0, "Distillation temperature of the first stage. (--temperature given with the "
                            "curriculum: that temperature in every stage instead, logged.)")
    t_max: float = option(2.0, "Distillation temperature of the last stage (linear in between).")
    alpha_start: float = option(0.7, "KD weight alpha of the first stage. (--alpha given with the curriculum: "
                                "that alpha in every stage instead, logged.)")
    alpha_end: float = option(1.0, "KD weight alpha of the last stage (linear in between).")
    skew_last_stage: float | None = option(0.12, "Skew coefficient of skl/srkl in the last stage (the authors' "
                                           "scripts: 0.12; the others use --skew). Empty: --skew everywhere.")
    plateau_patience: int | None = option(None, "Advance to the next stage when the selection metric "
                                          "(--selection-metric, dev ROUGE-L by default) has not improved for this "
                                          "many dev evaluations (empty: fixed epochs per stage).")
    on_policy_fraction_start: float | None = option(
        None, "GKD inside the curriculum: on-policy fraction lambda_on of the first stage, rising linearly to "
        "--on-policy-fraction-end (empty: --on-policy-fraction in every stage).")
    on_policy_fraction_end: float | None = option(
        None, "On-policy fraction of the last stage (empty: the same as --on-policy-fraction-start).")
    restart_optimizer: bool = option(True, "Start every stage with a fresh AdamW state and cosine schedule "
                                     "(only the weights carry over), as in POCL.")
    stages: list[dict] = option(default_factory=list, help="Per-stage overrides (YAML only): a list aligned with "
                                "the stages, each a mapping of fraction, epochs, max_steps, temperature, alpha, "
                                "skew, lr, plateau_patience, on_policy_fraction, name, teacher.", cli=False)
    remeasure: bool = option(
        False, "Before every stage after the first, rank the samples not yet trained on again with the current "
        "student (same measurer) and take the stage's new samples from the easiest of them; the stage sizes stay. "
        "Costs (n - 1) / 2 extra rankings over n stages (1.5 for 4). The paper ranks once (off).")
    stage_teachers: list[str] = option(
        default_factory=list, help="Progressive distillation: the teacher of each stage in order, a model path or - "
        "for --teacher (fewer entries than stages: the later ones use --teacher), e.g. a layer-subset assistant made "
        "by `pocl init-student` for the early stages. Every teacher must share the student's tokenizer; each gets its "
        "own teacher cache. YAML: curriculum.stages[i].teacher.", metavar="PATH")
    rank_temperature: float = option(0.01, "Sampling temperature of the measurer's generations (near-greedy, "
                                     "as the authors).")
    rank_max_new_tokens: int = option(256, "Maximum new tokens of the measurer's generations.")
    rank_no_repeat_ngram_size: int = option(6, "no_repeat_ngram_size of the measurer's generations.")
    rank_batch_size: int = option(32, "Prompts per generation batch of the measurer.")

    STAGE_KEYS: typing.ClassVar[tuple[str, ...]] = ("fraction", "epochs", "max_steps", "temperature", "alpha",
                                                    "skew", "lr", "plateau_patience", "on_policy_fraction",
                                                    "name", "teacher")

    def __post_init__(self) -> None:
        for name in ("curriculum", "measurer"):
            self._check_literal(name)
        self._check(self.rrf_k >= 0, "rrf_k", "must be >= 0")
        self._check(self.num_stages >= 1, "num_stages", "must be >= 1")
        self._check(self.stage_epochs > 0, "stage_epochs", "must be > 0")
        self._check(self.t_start > 0, "t_start", "must be > 0")
        self._check(self.t_max >= self.t_start, "t_max", f"must be >= t_start ({self.t_start})")
        self._check(0 <= self.alpha_start <= 1, "alpha_start", "must be in [0, 1]")
        self._check(0 <= self.alpha_end <= 1, "alpha_end", "must be in [0, 1]")
        self._check(self.skew_last_stage is None or 0 <= self.skew_last_stage <= 1, "skew_last_stage",
                    "must be in [0, 1]")
        self._check(self.plateau_patience is None or self.plateau_patience >= 1, "plateau_patience", "must be >= 1")
        for name in ("on_policy_fraction_start", "on_policy_fraction_end"):
            value = getattr(self, name)
            self._check(value is None or 0 <= value <= 1, name, "must be in [0, 1]")
        self._check(self.on_policy_fraction_end is None or self.on_policy_fraction_start is not None,
                    "on_policy_fraction_end", "needs on_policy_fraction_start")
        self._check(self.rank_temperature > 0, "rank_temperature", "must be > 0")
        self._check(self.rank_max_new_tokens > 0, "rank_max_new_tokens", "must be > 0")
        self._check(self.rank_no_repeat_ngram_size >= 0, "rank_no_repeat_ngram_size", "must be >= 0")
        self._check(self.rank_batch_size > 0, "rank_batch_size", "must be > 0")
        self._check(len(self.stages) <= self.num_stages, "stages",
                    f"has {len(self.stages)} entries but there are only num_stages={self.num_stages} stages")
        previous = 0.0
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if not isinstance(stage, dict):
                self._fail("stages", f"{where} must be a mapping")
            unknown = [k for k in stage if k not in self.STAGE_KEYS]
            if unknown:
                self._fail("stages", f"{where} has unknown keys {unknown}{suggest(unknown[0], self.STAGE_KEYS)}; "
                           f"valid: {', '.join(self.STAGE_KEYS)}")
            if "fraction" in stage:
                frac = stage["fraction"]
                if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                    self._fail("stages", f"{where}.fraction must be in (0, 1]")
                if frac <= previous:
                    self._fail("stages", f"{where}.fraction must be larger than the previous stage's ({previous})")
                previous = float(frac)
            for key in ("epochs", "temperature", "lr"):
                if key in stage and not (_is_number(stage[key]) and math.isfinite(stage[key]) and stage[key] > 0):
                    self._fail("stages", f"{where}.{key} must be a finite number > 0 (got {stage[key]!r})")
            for key in ("max_steps", "plateau_patience"):
                value = stage.get(key)
                if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                    self._fail("stages", f"{where}.{key} must be a whole number >= 1 (got {value!r})")
            for key in ("alpha", "skew", "on_policy_fraction"):
                if key in stage and not (_is_number(stage[key]) and 0 <= stage[key] <= 1):
                    self._fail("stages", f"{where}.{key} must be in [0, 1] (got {stage[key]!r})")
            if "name" in stage and not (isinstance(stage["name"], str) and stage["name"].strip()):
                self._fail("stages", f"{where}.name must be a non-empty string (got {stage['name']!r})")
            if "teacher" in stage and not (isinstance(stage["teacher"], str) and stage["teacher"].strip()):
                self._fail("stages", f"{where}.teacher must be a model path (got {stage['teacher']!r})")
            if "teacher" in stage and i < len(self.stage_teachers) and self.stage_teachers[i] != "-":
                self._fail("stages", f"{where}.teacher and stage_teachers[{i}] both name stage {i + 1}'s teacher")
        self._check(len(self.stage_teachers) <= self.num_stages, "stage_teachers",
                    f"has {len(self.stage_teachers)} entries but there are only num_stages={self.num_stages} stages")
        for i, spec in enumerate(self.stage_teachers):
            self._check(isinstance(spec, str) and bool(spec.strip()), "stage_teachers",
                        f"entry {i} must be a model path or - (got {spec!r})")

    def stage_teacher(self, index: int) -> str | None:
        """The teacher that stage ``index`` names (``stages[i].teacher`` or ``stage_teachers[i]``); None: --teacher."""
        entry = self.stages[index] if index < len(self.stages) else {}
        if "teacher" in entry:
            return entry["teacher"]
        spec = self.stage_teachers[index] if index < len(self.stage_teachers) else "-"
        return None if spec == "-" else spec


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["MEASURER_NAMES", "CurriculumConfig", "MeasurerName"]
