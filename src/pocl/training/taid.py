"""TAID's interpolation time ``t`` (Shing et al., ICLR 2025; official code SakanaAI/TAID,
``src/distil_losses/taid.py``): the schedule and its adaptive update, kept in the training state.

Per optimizer step ``s`` of ``S`` (the run's, or the stage's with ``loss.taid_scope stage``):

* the step's loss is computed at the current ``t`` (:func:`pocl.losses.divergences.taid_interpolated_kl`);
* then, from the step's loss ``L`` (the window's token mean of the TAID term, all processes):
  the first step only records ``L``; later steps take the relative change ``r = (prev − L) / prev``, the
  momentum ``m ← β m + (1 − β) r`` and ``t ← min(t_end, max(t_linear(s), t + α · sigmoid(m) · (1 − t)))``
  with ``t_linear(s) = t_start + (t_end − t_start) · s / S``. ``t`` never decreases. Without the adaptive
  update, ``t = t_linear(s)``.

Two choices differ from the official code, which updates ``t`` after every forward pass with that
micro-batch's loss, the cross-entropy ``−Σ p_t log q``: pocl updates once per optimizer step with the
window's mean, so ``t`` does not depend on how a window is split into micro-batches or processes; and the
loss it reads is the KL ``Σ p_t (log p_t − log q)`` it trains and logs (the issue's formula; the same
gradient, a value smaller by the entropy of ``p_t``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["TaidSchedule", "TaidState"]


@dataclasses.dataclass
class TaidState:
    """Where TAID stands: ``t``, the momentum ``m`` and the previous step's loss (None before the first)."""

    t: float
    momentum: float = 0.0
    prev_loss: float | None = None


class TaidSchedule:
    """The ``t`` of a run of ``loss.method taid`` (``loss_config``: its :class:`pocl.config.LossConfig`)."""

    def __init__(self, loss_config):
        self.t_start = loss_config.taid_t_start
        self.t_end = loss_config.taid_t_end
        self.alpha = loss_config.taid_alpha
        self.beta = loss_config.taid_beta
        self.adaptive = loss_config.taid_adaptive
        self.scope = loss_config.taid_scope
        self.state = TaidState(t=self.t_start)

    @property
    def t(self) -> float:
        """The interpolation time of the next step's loss."""
        return self.state.t

    def linear(self, step: int, total: int) -> float:
        """``t_linear`` before step ``step`` (0-based) of ``total``."""
        return self.t_start + (self.t_end - self.t_start) * step / max(total, 1)

    def start_stage(self, *, first: bool) -> None:
        """A stage starts (not on a resume inside it): with ``taid_scope stage`` t, its momentum and the
        previous loss restart; with ``run`` only the first stage starts them."""
        if first or self.scope == "stage":
            self.state = TaidState(t=self.t_start)

    def update(self, loss: float, *, step: int, total: int) -> None:
        """After step ``step`` (0-based, of ``total`` in the schedule's scope) whose loss was ``loss``.
        A non-finite loss (a skipped step) changes nothing."""
        if not math.isfinite(loss):
            return
        st = self.state
        if st.prev_loss is None:
            st.prev_loss = loss
            return
        relative = (st.prev_loss - loss) / (st.prev_loss + 1e-15)
        st.momentum = self.beta * st.momentum + (1.0 - self.beta) * relative
        target = self.linear(step, total)
        if self.adaptive:
            sigmoid = 0.5 * (1.0 + math.tanh(0.5 * st.momentum))  # = 1 / (1 + e^-m), without overflow
            delta = self.alpha * sigmoid * (1.0 - st.t)
            st.t = min(self.t_end, max(target, st.t + delta))
        else:
            st.t = target
        st.prev_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = TaidState(**state)
