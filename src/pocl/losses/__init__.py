"""KD losses: divergences (a registry of pure functions) and the chunked loss engine.

See ``docs/losses.md`` for the formulas, the T² rule, normalisation and memory behaviour.
"""

from pocl.losses.divergences import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    Divergence,
    DivergenceSpec,
    make_divergence,
    register_divergence,
)
from pocl.losses.engine import (
    TEMPERATURE_SCALINGS,
    KDLossOutput,
    TopKTeacher,
    auto_chunk_size,
    chunked_kd_loss_from_logits,
    dense_kd_loss,
    fused_kd_loss,
    teacher_top_k,
    temperature_scale,
)
from pocl.losses.tokens import count_target_tokens, select_response_tokens

__all__ = [
    "DIVERGENCES",
    "LOG_PROB_FLOOR",
    "TEMPERATURE_SCALINGS",
    "Divergence",
    "DivergenceSpec",
    "KDLossOutput",
    "TopKTeacher",
    "auto_chunk_size",
    "chunked_kd_loss_from_logits",
    "count_target_tokens",
    "dense_kd_loss",
    "fused_kd_loss",
    "make_divergence",
    "register_divergence",
    "select_response_tokens",
    "teacher_top_k",
    "temperature_scale",
]
