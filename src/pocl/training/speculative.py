"""Speculative KD (SKD) sampling, batched (Xu et al., ICLR 2025, arXiv 2410.11325).

The student drafts a block of ``gamma`` tokens; the teacher scores the block in one forward pass and
keeps the drafted tokens up to the first one that is not among its top-K tokens at that position
(or, with ``top_p``, outside its top-p nucleus). That token is replaced by one sampled from the
teacher and the rest of the block is dropped. The samples interleave student proposals with teacher
corrections: on-policy where the student is good enough, teacher-guided where it is not.

Official code (``google-research/speculative_kd``, ``transformers/utils.py``: ``_speculative_kd_sampling``,
``train/ddp_skd.py``): blocks of ``num_assistant_tokens = 5`` with a constant schedule, ``top_k = 25``
(``config/kd_train.yaml``); no bonus token when the whole block is accepted; the replacement is
sampled from the teacher's (warped) distribution at the first rejected position. Differences here:

* the replacement is drawn from the teacher's full distribution at ``teacher_temperature`` (no
  top-p warping; ``teacher_temperature = 0``: argmax); top-K acceptance does not depend on any
  temperature; top-p acceptance uses the nucleus of the teacher's plain distribution (temperature
  1), the token that crosses ``top_p`` included (the official code drops that token);
* K decays linearly along the response (``top_k_end``) instead of the official per-block step
  (``expected_seq_len``);
* the student drafts from its full distribution at ``temperature`` (the official draft reuses the
  teacher's generation config: its temperature and top-p warpers), and the acceptance test is
  applied to the drafted token itself (the official code tests a second sample of the student's
  distribution and keeps the draft).

**Cost: both KV caches persist across blocks.** Each model keeps one ``DynamicCache`` per batch and
a 2D attention mask over everything it has cached. Every model call feeds all rows the same number
of new positions: a row with fewer pending tokens is left-padded inside the chunk with masked
positions, a row that has finished drafting feeds one masked position. After the verdict the cached
positions of the rejected drafts are not removed but masked out (holes); position ids are always
``cumsum(mask) - 1`` over the whole mask, so a kept token's position is the number of kept tokens
before it (rotary or absolute keys are written with the right positions because rejected drafts only
ever follow a row's kept tokens). A block feeds the student the pending token (the previous block's
replacement, or its last draft when all were accepted; the prompt in the first block) and then
``gamma - 1`` one-token steps; the teacher the pending token and the first ``gamma - 1`` drafts in
one pass (the last draft's logits would only serve a bonus token). Finished rows leave the batch
(their cache rows are dropped). A block adds ``accepted + 1`` tokens (``gamma`` when all are
accepted), so an ``N``-token response costs about ``N / (accepted + 1)`` blocks of ``gamma`` cached
student steps and one teacher pass over ``gamma`` new positions (``benchmarks/skd_sampler.py``). Memory: holes and chunk padding are never reclaimed, so a batch's
cache grows by up to ``gamma`` positions per block while a row gains at least one token per block:
at most ``max_new_tokens * gamma`` positions past the prompt (480 at the official ``gamma = 5`` and
96 new tokens), attended to with the mask. Sliding-window attention would count holes inside its
window: a model whose cache has a sliding layer is refused (``ConfigError``).

**Randomness.** Each prompt owns a CPU ``torch.Generator`` seeded with ``stream_seed("skd", seed,
index)`` (``index``: its position in ``prompts``) and draws one float64 uniform per sample in a fixed
order per block (its draft samples, then the replacement), so its output depends neither on
``batch_size`` nor on its batch neighbours. The global torch RNG is never used. A sample is drawn by
inverse transform (:func:`sample_rows`): the first token whose cumulative probability (float64, on the
models' device) exceeds ``u`` times the row's total. That is an exact draw from the distribution, as
``torch.multinomial`` is, but it costs one random number per row instead of one exponential per
vocabulary entry (``multinomial(p, 1)`` is ``argmax(p / Exp(1))``), and all rows of a step are drawn in
one batched call on the models' device, with no copy of ``[B, V]`` probabilities to the CPU
(``benchmarks/skd_overhead.py``). The uniforms come from CPU generators, so a seed gives the same
samples on a GPU as on the CPU, up to the rounding of the cumulative sums.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from pocl.errors import ConfigError
from pocl.generation import Generation, length_sorted_batches, special_token_ids
from pocl.models import output_rows
from pocl.training.stages import stream_seed

__all__ = ["SpeculativeSettings", "SpeculativeStats", "inverse_cdf", "sample_rows", "speculative_generate"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SpeculativeSettings:
    """Settings of :func:`speculative_generate` (defaults: the official SKD code)."""

    gamma: int = 5  # draft block length (official num_assistant_tokens)
    top_k: int = 25  # a draft is accepted if it is among the teacher's top-K tokens
    top_p: float = 0.0  # > 0: accept inside the teacher's top-p nucleus instead of top-K
    top_k_end: int | None = None  # K decays linearly from top_k to top_k_end along the response
    temperature: float = 1.0  # the student's draft sampling temperature
    teacher_temperature: float = 1.0  # replacement sampling; 0 = greedy (argmax)
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ValueError(f"speculative {field} must be {what} (got {getattr(self, field)!r})")

        check(_is_int(self.gamma) and self.gamma >= 1, "gamma", "an integer >= 1")
        check(_is_int(self.top_k) and self.top_k >= 1, "top_k", "an integer >= 1")
        check(isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0, "top_p", "in [0, 1] (0: top-K)")
        check(self.top_k_end is None or (_is_int(self.top_k_end) and self.top_k_end >= 1), "top_k_end",
              "None or an integer >= 1")
        check(self.top_k_end is None or self.top_p == 0, "top_k_end", "None when top_p > 0 (K decay needs top-K)")
        check(isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf, "temperature",
              "finite and > 0")
        check(isinstance(self.teacher_temperature, (int, float)) and 0 <= self.teacher_temperature < math.inf,
              "teacher_temperature", "finite and >= 0 (0: greedy)")
        check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")

    def k_at(self, position: int) -> int:
        """K at response position ``position`` (0-based): linear from top_k to top_k_end, at least 1."""
        if self.top_k_end is None:
            return self.top_k
        span = max(self.max_new_tokens - 1, 1)
        return max(1, round(self.top_k + (self.top_k_end - self.top_k) * position / span))


@dataclasses.dataclass
class SpeculativeStats:
    """Counts summed over rows: drafted student tokens (all of each block, also those after a
    rejection), accepted drafts, teacher replacements and (row, block) pairs."""

    drafted: int = 0
    accepted: int = 0
    replaced: int = 0
    blocks: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    def add(self, other: SpeculativeStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, ids, mask, positions, *, keep: int, cache=None, params=None):
    """(logits of the last ``keep`` positions ``[B, keep, V]``, the KV cache). ``params``: the names of
    ``model.forward``'s parameters (looked up here when not given)."""
    if params is None:
        params = inspect.signature(model.forward).parameters
    kwargs = {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep
    if cache is not None:  # transformers 5 renamed past_key_values to cache
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -keep:], new_cache


class _Cached:
    """One model's KV cache over the active rows of a batch and the 2D attention mask over every
    cached position (0: left padding of a chunk, a row's idle step, or a rejected draft: a hole)."""

    def __init__(self, model: nn.Module, rows: int, filler: int):
        self.model, self.filler, self.device = model, filler, _device(model)
        self.params = frozenset(inspect.signature(model.forward).parameters)  # once, not per forward pass
        self.cache = None
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self.device)

    def feed(self, chunks: Sequence[Sequence[int]], keep: int) -> tuple[torch.Tensor, list[list[int]]]:
        """Feeds each row's tokens (right-aligned in one chunk; masked padding on the left, an empty
        row is all padding). Returns the logits of the chunk's last ``keep`` positions and, per row,
        the cache columns of its tokens. Position ids count the unmasked positions before each one."""
        width, start = max(len(c) for c in chunks), self.mask.shape[1]
        ids = torch.full((len(chunks), width), self.filler, dtype=torch.long)
        mask = torch.zeros((len(chunks), width), dtype=torch.long)
        columns = []
        for r, chunk in enumerate(chunks):
            ids[r, width - len(chunk):] = torch.tensor(list(chunk), dtype=torch.long)
            mask[r, width - len(chunk):] = 1
            columns.append(list(range(start + width - len(chunk), start + width)))
        self.mask = torch.cat([self.mask, mask.to(self.device)], dim=1)
        positions = (self.mask.cumsum(-1)[:, start:] - 1).clamp(min=0)
        logits, self.cache = _forward(self.model, ids.to(self.device), self.mask, positions, keep=keep,
                                      cache=self.cache, params=self.params)
        if start == 0 and any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", ())):
            # its window spans cache positions, holes included (and it may drop the oldest ones)
            raise ConfigError(f"speculative sampling does not support sliding-window attention "
                              f"({type(self.model).__name__}): rejected drafts stay in the KV cache as masked holes")
        return logits, columns

    def hide(self, row: int, columns: Sequence[int]) -> None:
        self.mask[row, list(columns)] = 0

    def select(self, rows: list[int]) -> None:
        """Keeps only ``rows`` (indices into the current batch) in the cache and the mask."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask = self.mask[index]
        if self.cache is not None:
            self.cache.batch_select_indices(index)


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at ``temperature`` in at least float32, on the logits' device."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(logits / temperature, dim=-1)


def sample_rows(probs: torch.Tensor, gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row of ``probs`` ``[N, V]`` (non-negative, each row with a positive sum; any
    device), row ``i`` drawn with one float64 uniform ``u`` of the CPU generator ``gens[i]``: the
    first token whose cumulative probability exceeds ``u * total``. Cumulative sums are float64. The
    threshold is kept below the total, so a token of probability 0 is never drawn."""
    if len(gens) != probs.shape[0]:
        raise ValueError(f"sample_rows: {probs.shape[0]} rows but {len(gens)} generators")
    if not gens:
        return []
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    return inverse_cdf(probs, u.to(probs.device)).tolist()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` ``[N, V]``, the first token whose float64 cumulative probability exceeds
    ``u * total`` (``u`` ``[N]`` in [0, 1)): ``[N]`` token ids. The threshold is clamped below the total
    (``u * total`` can round up to it), so the drawn token always has a positive probability."""
    cdf = probs.to(torch.float64).cumsum(-1)  # [N, V]
    total = cdf[:, -1:]
    threshold = torch.minimum(u.to(torch.float64)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True)[:, 0]


def _draft(student: _Cached, pending, budgets, gens, s: SpeculativeSettings, vocab: int, eos):
    """Each row's drafted tokens (``budgets[r]`` samples, fewer when the student drafts EOS) and the
    student's cache columns of the drafts it fed (all but the last: no draft follows it)."""
    drafts: list[list[int]] = [[] for _ in pending]
    fed: list[list[int]] = [[] for _ in pending]
    logits, _ = student.feed(pending, keep=1)
    for step in range(max(budgets)):
        rows = [r for r in range(len(gens)) if len(drafts[r]) < budgets[r] and (not drafts[r] or drafts[r][-1] != eos)]
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        tokens = sample_rows(_probs(logits[index, -1, :vocab], s.temperature), [gens[r] for r in rows])
        for r, token in zip(rows, tokens):
            drafts[r].append(token)
        going = [len(d) < b and d[-1] != eos for d, b in zip(drafts, budgets)]
        if not any(going):
            break
        logits, columns = student.feed([[d[-1]] if g else [] for d, g in zip(drafts, going)], keep=1)
        for r, g in enumerate(going):
            fed[r] += columns[r] if g else []
    return drafts, fed


def _judge(teacher: _Cached, pending, drafts, s: SpeculativeSettings, vocab: int, starts: list[int]):
    """Per row: the accepted flags of its drafts, the teacher's logits at its draft positions and the
    teacher's cache columns of the drafts it fed (all but the last)."""
    width = max(len(d) for d in drafts)
    # the last draft token is not fed: its logits would only serve a bonus token (none in SKD)
    logits, columns = teacher.feed([list(p) + d[:-1] for p, d in zip(pending, drafts)], keep=width)
    logits = logits[..., :vocab]  # [B, width, V]: row r's draft j sits at width - len(d_r) + j
    tokens = torch.full(logits.shape[:2], teacher.filler, dtype=torch.long)
    for r, d in enumerate(drafts):
        tokens[r, width - len(d):] = torch.tensor(d, dtype=torch.long)
    tokens = tokens.to(logits.device)
    if s.top_p > 0:
        # nucleus: tokens whose more probable tokens hold less than top_p (the crossing one included)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        ok = (probs * (probs > probs.gather(-1, tokens[..., None]))).sum(-1) < s.top_p
    else:
        ks = torch.ones(logits.shape[:2], dtype=torch.long)
        for r, d in enumerate(drafts):
            ks[r, width - len(d):] = torch.tensor([s.k_at(starts[r] + j) for j in range(len(d))])
        # rank of the draft = number of tokens the teacher prefers to it
        ok = (logits > logits.gather(-1, tokens[..., None])).sum(-1) < ks.to(logits.device)
    ok = ok.tolist()
    return ([ok[r][width - len(d):] for r, d in enumerate(drafts)],
            [logits[r, width - len(d):] for r, d in enumerate(drafts)],
            [c[len(c) - len(d) + 1:] for c, d in zip(columns, drafts)])


def _replacements(logits, drafts, kept, gens, s: SpeculativeSettings) -> dict[int, int]:
    """The teacher's token for each row ``r`` whose draft ``kept[r]`` was rejected, from its logits
    there (``logits[r][kept[r]]``): argmax at ``teacher_temperature`` 0, else one batched draw."""
    rows = [r for r, (d, n) in enumerate(zip(drafts, kept)) if n < len(d)]
    if not rows:
        return {}
    at = torch.stack([logits[r][kept[r]] for r in rows])  # [R, V]
    if s.teacher_temperature == 0:
        return dict(zip(rows, at.argmax(-1).tolist()))
    return dict(zip(rows, sample_rows(_probs(at, s.teacher_temperature), [gens[r] for r in rows])))


@dataclasses.dataclass
class _Row:
    prompt: list[int]
    gen: torch.Generator
    tokens: list[int] = dataclasses.field(default_factory=list)
    stopped_at_eos: bool = False
    done: bool = False


def _run_batch(student, teacher, rows: list[_Row], s: SpeculativeSettings, vocab: int, eos, filler: int,
               stats: SpeculativeStats) -> None:
    active = [row for row in rows if not row.done]
    # tokens of each row that neither model has seen yet: the prompt, then the replacement or the
    # last draft of the previous block (the other kept drafts are cached already)
    pending = [row.prompt for row in active]
    caches = _Cached(student, len(active), filler), _Cached(teacher, len(active), filler)
    while active:
        budgets = [min(s.gamma, s.max_new_tokens - len(row.tokens)) for row in active]
        drafts, fed_s = _draft(caches[0], pending, budgets, [row.gen for row in active], s, vocab, eos)
        accepted, logits, fed_t = _judge(caches[1], pending, drafts, s, vocab, [len(row.tokens) for row in active])
        kept = [next((j for j, flag in enumerate(ok) if not flag), len(d)) for ok, d in zip(accepted, drafts)]
        replacements = _replacements(logits, drafts, kept, [row.gen for row in active], s)
        for r, (row, draft, n) in enumerate(zip(active, drafts, kept)):
            row.tokens += draft[:n]
            stats.drafted += len(draft)
            stats.accepted += n
            stats.blocks += 1
            pending[r] = [draft[-1]]
            if n < len(draft):  # first rejection: the teacher's token replaces the draft, the rest is dropped
                token = replacements[r]
                row.tokens.append(token)
                stats.replaced += 1
                pending[r] = [token]
                caches[0].hide(r, fed_s[r][n:])  # the fed drafts from the rejected one on become holes
                caches[1].hide(r, fed_t[r][n:])
            if eos is not None and eos in row.tokens:
                row.tokens = row.tokens[:row.tokens.index(eos)]
                row.stopped_at_eos = row.done = True
            elif len(row.tokens) >= s.max_new_tokens:  # drafts never exceed the budget: exactly max_new_tokens
                row.done = True
        keep = [r for r, row in enumerate(active) if not row.done]
        if keep and len(keep) < len(active):
            for cache in caches:
                cache.select(keep)
        active, pending = [active[r] for r in keep], [pending[r] for r in keep]


@torch.no_grad()
def speculative_generate(student: nn.Module, teacher: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                         settings: SpeculativeSettings, *, seed: int,
                         batch_size: int) -> tuple[list[Generation], SpeculativeStats]:
    """One SKD sample per prompt (results in the order of ``prompts``) and the summed counts.

    Prompts are grouped by length (:func:`pocl.generation.length_sorted_batches`) and left-padded;
    both models see ``attention_mask`` and ``position_ids`` (cumsum of the mask - 1), so a padded row
    scores like the unpadded sequence. Logits are cut to the shared vocabulary (the smaller output
    layer). A row stops at EOS (removed from ``token_ids``, ``stopped_at_eos``) or after exactly
    ``max_new_tokens`` tokens. Both models run in eval mode; their training modes are restored.
    """
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(f"speculative batch_size must be an integer > 0 (got {batch_size!r})")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("cannot generate from an empty prompt")
    eos, pad = special_token_ids(tokenizer)
    filler = pad if pad is not None else 0
    vocab = min(output_rows(student), output_rows(teacher))
    modes = (student.training, teacher.training)
    rows = [_Row(list(p), torch.Generator().manual_seed(stream_seed("skd", seed, i)))
            for i, p in enumerate(prompts)]
    stats = SpeculativeStats()
    student.eval()
    teacher.eval()
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            _run_batch(student, teacher, [rows[i] for i in batch], settings, vocab, eos, filler, stats)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    out = [Generation(row.tokens, tokenizer.decode(row.tokens, skip_special_tokens=True), row.stopped_at_eos)
           for row in rows]
    return out, stats
