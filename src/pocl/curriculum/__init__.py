"""The POCL curriculum: a difficulty measurer (the initial student's ROUGE-L and loss per sample,
fused by reciprocal rank fusion; optionally also the teacher's signals) and the Baby Step scheduler
(growing easy-to-hard subsets with rising temperature and KD weight). See ``docs/curriculum.md``."""

from .difficulty import (
    MEASURERS,
    SIGNALS,
    STUDENT_SIGNALS,
    TEACHER_SIGNALS,
    Measurer,
    RankedSample,
    SampleDifficulty,
    difficulties_from_ranking,
    measure_difficulty,
    measurer_needs,
    measurer_needs_teacher,
    rank_samples,
    ranking_decoding,
    summarize_quartiles,
)
from .ranking import (
    FORMAT_VERSION,
    GENERATION_SEED,
    load_or_compute_ranking,
    meta_path,
    order_inputs,
    prepare_curriculum,
    ranked_ids,
    ranking_data_settings,
    ranking_path,
    read_ranking,
    signals_inputs,
    write_ranking,
)
from .rrf import order_by_score, ordinal_ranks, rrf_order, rrf_scores
from .schedule import (
    baby_step_stages,
    budget_passes,
    format_schedule,
    nominal_fractions,
    same_budget_epochs,
    same_budget_stage_epochs,
    schedule_table,
    stage_sizes,
)

__all__ = [
    "FORMAT_VERSION", "GENERATION_SEED", "MEASURERS", "Measurer", "RankedSample", "SIGNALS", "STUDENT_SIGNALS",
    "SampleDifficulty", "TEACHER_SIGNALS", "baby_step_stages", "budget_passes", "difficulties_from_ranking",
    "format_schedule", "load_or_compute_ranking", "measure_difficulty", "measurer_needs", "measurer_needs_teacher",
    "meta_path", "nominal_fractions", "order_by_score", "order_inputs", "ordinal_ranks", "prepare_curriculum",
    "rank_samples", "ranked_ids", "ranking_data_settings", "ranking_decoding", "ranking_path", "read_ranking",
    "rrf_order", "rrf_scores", "same_budget_epochs", "same_budget_stage_epochs", "schedule_table", "signals_inputs",
    "stage_sizes", "summarize_quartiles", "write_ranking",
]
