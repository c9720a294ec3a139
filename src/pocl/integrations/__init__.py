"""POCL as a plug-in curriculum for ``transformers.Trainer`` and TRL trainers (GKDTrainer, SFTTrainer):
rank a dataset with the initial student (:func:`rank_dataset`), then ``PoclCurriculum(ranking, dataset)
.attach(trainer)``. See ``docs/integrations.md``."""

from .collate import PoclCollator
from .ranking import dataset_records, rank_dataset
from .sampler import CurriculumSampler, dataset_ids, stage_indices
from .trainer import (
           ADVANCE,
           GKD_KNOBS,
           LOSS_KNOBS,
           PoclCurriculum,
           PoclCurriculumCallback,
           stage_table,
)

__all__ = ["ADVANCE", "GKD_KNOBS", "LOSS_KNOBS", "CurriculumSampler", "PoclCollator", "PoclCurriculum",
           "PoclCurriculumCallback", "dataset_ids", "dataset_records", "rank_dataset", "stage_indices", "stage_table"]
