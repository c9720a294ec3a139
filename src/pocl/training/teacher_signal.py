"""Where the teacher's side of the loss comes from: one interface, three implementations.

The loss needs the teacher at the N response positions of a micro-batch. A :class:`TeacherSignal`
gives it as a :class:`TeacherSide`:

* :class:`LiveTeacher` runs the teacher on the batch (hidden states + LM head on the fused path,
  full logits otherwise). Exact; costs a teacher forward pass per step.
* :class:`CachedHiddenTeacher` (``loss.teacher_cache hidden``, the default) reads the teacher's final
  hidden states from the teacher cache by sample id; the fused loss recomputes the logits through
  the teacher's LM head chunk by chunk. The full-vocabulary divergence at any temperature, without
  the teacher's body. Exact when stored in float32 (the same hidden states as a live pass, up to
  float reordering from other padding); float16 / bfloat16 storage is an approximation.
* :class:`CachedTopKTeacher` (``loss.teacher_cache topk``) reads the teacher's top-k logits plus a
  tail bucket: a lower bound of every divergence whose gap grows with T. A declared approximation.

:func:`measure_signal_error` compares a cached signal with the live one on a sample of the data, at
every temperature of the schedule and with the run's divergence, and reports the teacher's tail
mass outside the cached tokens; :func:`check_signal_error` refuses an approximation whose error
exceeds ``loss.teacher_cache_max_error`` unless the user accepted it by name.

A run's teacher signals (the trainer's glue): :func:`cache_temperatures` says whether a run reads a
cache at all, :func:`open_teacher_caches` reuses, finishes or builds the caches of the training and
dev data and opens their signals, :func:`check_run_signal` measures an approximate one (at every KD
stage: :func:`measure_run_signal`) and refuses it when it is too far off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pocl.errors import ConfigError
from pocl.fingerprints import teacher_fingerprint, tokenized_fingerprint
from pocl.losses import TopKTeacher, select_response_tokens, teacher_top_k
from pocl.models import LMHead, hidden_states
from pocl.training import teacher_cache as tcache
from pocl.training.stages import Stage
from pocl.training.teacher_cache import TeacherCache

log = logging.getLogger("pocl.teacher_signal")

__all__ = ["APPROXIMATIONS", "CachedHiddenTeacher", "CachedTopKTeacher", "LiveTeacher", "SignalError", "TeacherSide",
           "TeacherSignal", "cache_temperatures", "check_run_signal", "check_signal_error", "live_teacher",
           "measure_run_signal", "measure_signal_error", "open_teacher_caches", "to_device"]

#: The approximations a user can accept by name (``loss.accept_approximation``).
APPROXIMATIONS = ("topk-cache", "half-precision-cache")


@dataclass(frozen=True)
class TeacherSide:
    """The teacher at the N selected response positions of a batch (batch-major, then position), in
    exactly one of three forms.

    Attributes:
        hidden: ``[N, H_t]`` final hidden states, with ``head`` (the fused loss makes the logits).
        head: the teacher's LM head (:class:`pocl.models.LMHead`), with ``hidden``.
        logits: ``[N, V]`` logits (the unfused path).
        topk: a :class:`pocl.losses.TopKTeacher` (the top-k cache: an approximation).
    """

    hidden: Tensor | None = None
    head: LMHead | None = None
    logits: Tensor | None = None
    topk: TopKTeacher | None = None

    def __post_init__(self) -> None:
        """ValueError unless exactly one form is given (hidden states with their head)."""
        forms = [self.hidden is not None, self.logits is not None, self.topk is not None]
        if sum(forms) != 1 or (self.hidden is not None) != (self.head is not None):
            raise ValueError("a TeacherSide holds exactly one of hidden (+ head), logits or topk")


class TeacherSignal(Protocol):
    """Gives the teacher side of a collated batch (``ids``, ``input_ids``, ``attention_mask``,
    ``labels`` [B, L], on the training device)."""

    #: ``live``, ``hidden-cache`` or ``topk-cache``.
    name: str
    #: True when the signal is the live teacher's up to float reordering.
    exact: bool

    def side(self, batch: dict[str, Any]) -> TeacherSide:
        """The teacher at the N response positions of ``batch``."""
        ...


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """A collated batch with its tensors moved to ``device`` (other entries, e.g. ``ids``, as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class LiveTeacher:
    """Runs the teacher on every batch. ``head`` given: hidden states (fused loss); else logits."""

    name = "live"
    exact = True

    def __init__(self, teacher: nn.Module, head: LMHead | None, vocab_size: int):
        """``teacher`` on the training device in eval mode; ``head`` its LM head (fused path) or None."""
        self.teacher = teacher
        self.head = head
        self.vocab_size = vocab_size

    @torch.no_grad()
    def side(self, batch: dict[str, Any]) -> TeacherSide:
        """hidden [N, H_t] + head (``head`` given) or logits [N, V] at the response positions of ``batch``."""
        if self.head is not None:
            h = hidden_states(self.teacher, batch["input_ids"], batch["attention_mask"])
            return TeacherSide(hidden=select_response_tokens(h, batch["labels"])[0], head=self.head)
        logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
        return TeacherSide(logits=select_response_tokens(logits[..., : self.vocab_size], batch["labels"])[0])

    # The arrays a cache stores, made from the same side as the live loss (so that they cannot drift).
    def hidden_rows(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{"hidden": [N, H_t]}`` for a ``hidden`` cache (needs the fused head)."""
        side = self.side(batch)
        if side.hidden is None:
            raise ConfigError("a hidden teacher cache needs the fused loss path (the teacher's head as a linear layer)")
        return {"hidden": side.hidden}

    def topk_rows(self, batch: dict[str, Any], *, k: int, temperatures: Sequence[float],
                  chunk_size: int) -> dict[str, Tensor]:
        """``token_ids`` [N, k], ``logits`` [N, k], ``tail_lse`` [N, n_T] for a ``topk`` cache."""
        table = self.topk_table(batch, k=k, temperatures=temperatures, chunk_size=chunk_size)
        return {"token_ids": table.token_ids, "logits": table.logits, "tail_lse": table.tail_lse}

    def topk_table(self, batch: dict[str, Any], *, k: int, temperatures: Sequence[float],
                   chunk_size: int) -> TopKTeacher:
        """The teacher's top-k logits [N, k] (ids [N, k]) and tail log-sum-exp [N, n_T] at ``temperatures``."""
        side = self.side(batch)
        opts = dict(k=k, temperatures=temperatures, vocab_size=self.vocab_size, chunk_size=chunk_size)
        if side.hidden is not None:
            return teacher_top_k(side.hidden, side.head.weight, side.head.bias, teacher_logit_fn=side.head.logit_fn,
                                 **opts)
        return teacher_top_k(side.logits, None, None, **opts)


class CachedHiddenTeacher:
    """The teacher's final hidden states from a ``hidden`` cache, through its live LM head."""

    name = "hidden-cache"

    def __init__(self, cache: TeacherCache, head: LMHead, device: torch.device | str):
        """A ``hidden`` ``cache`` read onto ``device``, through the teacher's ``head``."""
        if cache.kind != "hidden":
            raise ValueError(f"{cache.root} is a {cache.kind} cache, not a hidden cache")
        self.cache = cache
        self.head = head
        self.device = device
        self.exact = cache.stamp["dtype"] == "float32"

    def side(self, batch: dict[str, Any]) -> TeacherSide:
        """The cached hidden states [N, H_t] of ``batch["ids"]`` in the head's dtype, with the head."""
        # Cast to the head's dtype: F.linear needs one dtype, and a float16 store is upcast, not the head.
        hidden = self.cache.rows(batch["ids"])["hidden"].to(device=self.device, dtype=self.head.weight.dtype)
        return TeacherSide(hidden=hidden, head=self.head)


class CachedTopKTeacher:
    """The teacher's top-k logits and tail bucket from a ``topk`` cache (an approximation)."""

    name = "topk-cache"
    exact = False

    def __init__(self, cache: TeacherCache, device: torch.device | str, *, name: str = "topk-cache"):
        """A ``topk`` ``cache`` (or a :class:`pocl.training.teacher_signal_io.SignalFile`: ``name`` topk-file) read
        onto ``device``."""
        if cache.kind != "topk":
            raise ValueError(f"{cache.root} is a {cache.kind} cache, not a topk cache")
        self.name = name
        self.cache = cache
        self.device = device

    def side(self, batch: dict[str, Any]) -> TeacherSide:
        """The cached top-k table (ids and logits [N, k], tail [N, n_T]) of ``batch["ids"]``."""
        return TeacherSide(topk=self.cache.lookup(batch["ids"]).to(self.device))


# ------------------------------------------------------------------------------------ fidelity
@dataclass
class SignalError:
    """A cached signal against the live teacher at one temperature, on a sample of the data.

    Attributes:
        temperature: T of the comparison (a stage's).
        divergence: the divergence's label (registry name, with a stage's skew).
        live: Σ over the sample's tokens of the live divergence (true, not T²-scaled).
        cached: the same with the cached signal.
        relative_error: ``(cached − live) / live`` (0 when both are 0).
        tail_mass: mean over tokens of the teacher's probability at T outside the cached tokens
            (``topk`` only; None for ``hidden``, which keeps every token).
        tokens: response tokens in the sample.
    """

    temperature: float
    divergence: str
    live: float
    cached: float
    relative_error: float
    tail_mass: float | None
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON (``summary.json``'s ``teacher_cache.error_vs_live``)."""
        return {"temperature": self.temperature, "divergence": self.divergence, "live": self.live,
                "cached": self.cached, "relative_error": self.relative_error, "tail_mass": self.tail_mass,
                "tokens": self.tokens}


def _tail_mass(table: TopKTeacher, temperature: float) -> Tensor:
    """``[N]`` the teacher's probability at T outside its cached top k (from the stored tail)."""
    tail = table.tail_at(temperature).float()
    top = table.logits.float() / temperature
    total = torch.logsumexp(torch.cat([top, tail.unsqueeze(-1)], dim=-1), dim=-1)
    return torch.exp(tail - total)


@torch.no_grad()
def measure_signal_error(cached: TeacherSignal, live: TeacherSignal, batches: Iterable[dict[str, Any]], *,
                         checks: Sequence[tuple[float, str]],
                         divergence_sum: Callable[[dict[str, Any], TeacherSide, float, str], tuple[float, int]]
                         ) -> list[SignalError]:
    """Divergence of the student against ``cached`` and ``live`` teachers on ``batches``.

    Args:
        checks: ``(temperature, divergence label)`` pairs to measure (every KD stage's).
        divergence_sum: ``(batch, side, T, label) -> (Σ divergence over the batch's tokens, tokens)``:
            the student's divergence at T from the teacher side, with the labelled divergence.

    Returns:
        one :class:`SignalError` per check, in the order given.
    """
    batches = list(batches)
    live_sides = [live.side(b) for b in batches]
    cached_sides = [cached.side(b) for b in batches]
    out = []
    for temperature, label in checks:
        live_sum = cached_sum = 0.0
        tokens = 0
        masses = []
        for batch, ls, cs in zip(batches, live_sides, cached_sides):
            value, n = divergence_sum(batch, ls, temperature, label)
            live_sum += value
            tokens += n
            cached_sum += divergence_sum(batch, cs, temperature, label)[0]
            if cs.topk is not None:
                masses.append(_tail_mass(cs.topk, temperature))
        rel = 0.0 if live_sum == cached_sum else (cached_sum - live_sum) / abs(live_sum) if live_sum else math.inf
        mass = float(torch.cat(masses).mean()) if masses else None
        out.append(SignalError(float(temperature), label, live_sum, cached_sum, rel, mass, tokens))
    return out


def check_signal_error(signal: TeacherSignal, errors: Sequence[SignalError], *, max_error: float,
                       accepted: Sequence[str]) -> None:
    """Log the measured error of ``signal``; raise :class:`ConfigError` when an approximation's error
    exceeds ``max_error`` at any temperature and the user has not accepted it by name."""
    for e in errors:
        mass = "" if e.tail_mass is None else f", teacher mass outside the cached tokens {100 * e.tail_mass:.1f} %"
        log.info("teacher signal %s vs live, T = %g, %s: divergence %+.3g %% (%.6g vs %.6g over %d tokens)%s",
                 signal.name, e.temperature, e.divergence, 100 * e.relative_error, e.cached, e.live, e.tokens, mass)
    if signal.exact or not errors:
        return
    name = "topk-cache" if signal.name in ("topk-cache", "topk-file") else "half-precision-cache"
    worst = max(errors, key=lambda e: abs(e.relative_error))
    if abs(worst.relative_error) <= max_error:
        log.info("teacher signal %s: an approximation; its largest measured divergence error is %.3g %% "
                 "(<= loss.teacher_cache_max_error %.3g %%)", signal.name, 100 * abs(worst.relative_error),
                 100 * max_error)
        return
    if name in accepted:
        log.warning("teacher signal %s: an APPROXIMATION of the objective, accepted by loss.accept_approximation: "
                    "the divergence differs from the live teacher's by up to %.3g %% (T = %g)", signal.name,
                    100 * worst.relative_error, worst.temperature)
        return
    table = "; ".join(f"T = {e.temperature:g}: {100 * e.relative_error:+.1f} %" for e in errors)
    what = ("loss.teacher_signal_file" if signal.name == "topk-file" else
            f"loss.teacher_cache {signal.name.removesuffix('-cache')}")
    raise ConfigError(
        f"{what}: the cached teacher changes the objective by more "
        f"than loss.teacher_cache_max_error ({100 * max_error:.3g} %): measured on {worst.tokens} response tokens, "
        f"the divergence differs from the live teacher's by {table}. Use the exact cache (--teacher-cache hidden "
        f"--teacher-cache-dtype float32, the default) or the live teacher (--teacher-cache off), or accept the "
        f"approximation by name: --accept-approximation {name}")


# ------------------------------------------------------------------------------------ a run's signals
def live_teacher(teacher: nn.Module | None, *, device, vocab_size: int, fused: bool) -> LiveTeacher | None:
    """``teacher`` frozen on ``device`` in eval mode, as a :class:`LiveTeacher` (hidden states through its
    LM head on the fused path, logits otherwise); None without a teacher."""
    if teacher is None:
        return None
    teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return LiveTeacher(teacher, LMHead.from_model(teacher, vocab_size) if fused else None, vocab_size)


def cache_temperatures(stages: Sequence[Stage], *, live: LiveTeacher | None, teacher_cache: str,
                       on_policy_fraction: Callable[[Stage], float]) -> list[float]:
    """The temperatures of the stages with a KD term (every one is evaluated on the dev set, teacher
    forced); empty when no step would read a cache (no teacher, ``teacher_cache`` off, or no
    teacher-forced KD step at all)."""
    kd = [s for s in stages if s.alpha > 0]
    if live is None or teacher_cache == "off" or all(on_policy_fraction(s) >= 1 for s in kd):
        return []
    return sorted({s.temperature for s in kd})


def open_teacher_caches(live: LiveTeacher, datasets: dict[str, Any], *, root: Path, loss_config,
                        temperatures: Sequence[float], fingerprint: str | None, chunk_size: int, batch_size: int,
                        pad_token_id: int, accelerator, device, progress: bool
                        ) -> tuple[dict[str, TeacherSignal], dict[str, Any]] | None:
    """Reuse, finish or build the teacher cache (``loss_config.teacher_cache``: hidden or topk) of each
    named dataset (``{"train": ..., "dev": ... or None}``) under ``root/NAME``, and open its signal.

    Returns ``({name: signal}, {name: the cache's build info})``; None when the live teacher stays (the
    unfused path cannot recompute logits from a hidden cache). Check the signal with
    :func:`check_run_signal` before training on it."""
    if getattr(loss_config, "teacher_signal_file", None):  # an imported top-k signal replaces the cache
        from pocl.training.teacher_signal_io import open_signal_file

        readers, info = open_signal_file(loss_config, datasets, temperatures=temperatures, vocab_size=live.vocab_size,
                                         teacher_fingerprint=teacher_fingerprint(live.teacher, fingerprint))
        return {name: CachedTopKTeacher(r, device, name="topk-file") for name, r in readers.items()}, {"train": info}
    kind = loss_config.teacher_cache
    if kind == "hidden" and live.head is None:
        log.info("teacher cache hidden: the unfused loss path has no teacher LM head to recompute the logits "
                 "with; the live teacher is used")
        return None
    teacher = teacher_fingerprint(live.teacher, fingerprint)
    dtype = str(next(live.teacher.parameters()).dtype).removeprefix("torch.")
    if kind == "hidden":
        def rows(batch):
            """The cache's rows of a collated batch: hidden [N, H_t]."""
            return live.hidden_rows(to_device(batch, device))
    else:
        def rows(batch):
            """The cache's rows of a collated batch: token ids and logits [N, k], tail [N, n_T]."""
            return live.topk_rows(to_device(batch, device), k=loss_config.teacher_cache_topk,
                                  temperatures=temperatures, chunk_size=chunk_size)
    infos: dict[str, Any] = {}
    signals: dict[str, TeacherSignal] = {}
    for name, data in datasets.items():
        if data is None:
            continue
        stamp = tcache.cache_stamp(kind=kind, teacher_fingerprint=teacher, teacher_dtype=dtype,
                                   data_fingerprint=tokenized_fingerprint(data), dtype=loss_config.teacher_cache_dtype,
                                   vocab_size=live.vocab_size, topk=loss_config.teacher_cache_topk,
                                   temperatures=temperatures)
        cache, infos[name] = tcache.prepare_teacher_cache(
            root / name, data, teacher_fn=rows, stamp=stamp, batch_size=batch_size, pad_token_id=pad_token_id,
            accelerator=accelerator, progress=progress, name=name)
        signals[name] = (CachedHiddenTeacher(cache, live.head, device) if kind == "hidden"
                         else CachedTopKTeacher(cache, device))
    return signals, infos


def check_run_signal(signal: TeacherSignal, infos: dict[str, Any], *, loss_config,
                     measure: Callable[[TeacherSignal], list[SignalError]]) -> None:
    """Record in ``infos`` (summary.json's ``teacher_cache``) which signal the run trains on; an
    approximate one (top-k, or hidden states stored in half precision) is measured against the live
    teacher with ``measure`` and refused above ``loss.teacher_cache_max_error`` unless accepted
    (:func:`check_signal_error`)."""
    infos["signal"] = signal.name
    infos["exact"] = signal.exact
    if not signal.exact:
        errors = measure(signal)
        infos["error_vs_live"] = [e.to_dict() for e in errors]
        check_signal_error(signal, errors, max_error=loss_config.teacher_cache_max_error,
                           accepted=[loss_config.accept_approximation])


def measure_run_signal(signal: TeacherSignal, live: TeacherSignal, batches: Sequence[dict[str, Any]],
                       stages: Sequence[Stage], *, divergence: str,
                       divergence_sum: Callable[[dict[str, Any], TeacherSide, Stage], tuple[float, int]]
                       ) -> list[SignalError]:
    """:func:`measure_signal_error` of ``signal`` against ``live`` on ``batches``, once per distinct
    (temperature, divergence) of the KD stages, labelled as in the log (``divergence`` with the stage's
    skew). ``divergence_sum(batch, side, stage)``: the student's divergence sum over the batch's tokens
    at the stage's temperature and divergence, and the token count."""
    checks: dict[tuple[float, str], Stage] = {}
    for stage in stages:
        if stage.alpha > 0:
            label = divergence + ("" if stage.skew is None else f"(skew={stage.skew:g})")
            checks.setdefault((stage.temperature, label), stage)
    return measure_signal_error(signal, live, batches, checks=sorted(checks),
                                divergence_sum=lambda batch, side, t, label: divergence_sum(batch, side,
                                                                                            checks[t, label]))
