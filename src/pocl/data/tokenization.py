"""Tokenising records with prompt masking, truncation and collation.

A training sample is ``prompt tokens + response tokens + EOS``. The prompt and the response are
tokenised separately (the response without special tokens), so the boundary is exact. Labels are
``-100`` on the prompt and the token id on the response and on the appended EOS. When a record's
output is a list of references, only the first one is the training target.

Truncation: the prompt is cut to ``max_prompt_length`` tokens first (``truncation_side="left"``
drops tokens at the start so that the ``### Response:`` cue stays next to the response; a BOS the
tokenizer added is kept), then the response is cut so that the whole fits ``max_length``. A
sample whose response (or EOS) was cut gets no EOS: the reference did not end there.

Conversation records (:mod:`pocl.data.chat`): the prompt is the chat template's rendering of the
turns before the final assistant turn, with the generation prompt; the response is the final
assistant turn. With ``context_targets`` the earlier trained assistant turns inside the prompt are
targets too (their content, and the EOS when the template ends the turn with it); their labels are
truncated with the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from pocl.errors import ConfigError, DataError, ModelError

from .chat import context_labels, render_prompt
from .records import Record
from .templates import PromptTemplate, get_template

IGNORE_INDEX = -100
TRUNCATION_SIDES = ("left", "right", "error")


@dataclass
class TokenizedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    prompt_truncated: bool = False
    response_truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens that are predicted (labels at positions >= 1 that are not -100)."""
        return count_target_tokens(self.labels)


@dataclass
class TokenizationStats:
    samples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0  # target tokens, the EOS (and earlier assistant turns) included
    total_tokens: int = 0
    max_sample_length: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TokenizedDataset(Sequence[TokenizedSample]):
    """The tokenised samples, in record order, with ``stats`` and a ``by_id`` lookup."""

    def __init__(self, samples: list[TokenizedSample], stats: TokenizationStats):
        self.samples = samples
        self.stats = stats
        self.by_id: dict[str, TokenizedSample] = {s.id: s for s in samples}

    @overload
    def __getitem__(self, index: int) -> TokenizedSample: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedSample]: ...

    def __getitem__(self, index):
        return self.samples[index]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[TokenizedSample]:
        return iter(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def subset(self, ids: Iterable[str]) -> list[TokenizedSample]:
        """The samples with these ids, in the given order (KeyError names a missing id)."""
        return [self.by_id[i] for i in ids]

    def __repr__(self) -> str:
        return f"TokenizedDataset({len(self)} samples, stats={self.stats.as_dict()})"


# ---------------------------------------------------------------------------------------------


def _check_lengths(max_length: int | None, max_prompt_length: int) -> None:
    for name, value in (("max_prompt_length", max_prompt_length), ("max_length", max_length)):
        if value is None and name == "max_length":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if max_length is not None and max_prompt_length >= max_length:
        raise ConfigError(f"max_prompt_length ({max_prompt_length}) must be smaller than "
                          f"max_length ({max_length}) so that some response tokens fit")


def _check_side(truncation_side: str) -> None:
    if truncation_side not in TRUNCATION_SIDES:
        raise ConfigError(f"truncation_side must be one of {', '.join(TRUNCATION_SIDES)}, "
                          f"got {truncation_side!r}")


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def _single_bos(ids: list[int], bos: int | None) -> list[int]:
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        del ids[0]  # a prompt that already began with BOS text: keep a single BOS
    return ids


def _render(template: PromptTemplate, record: Record, tokenizer: Any) -> str:
    if record.conversation is not None:
        return render_prompt(record, tokenizer)
    return template.render(record)


def _encode_prompts(records: Sequence[Record], tokenizer: Any, template: PromptTemplate,
                    texts: list[str] | None = None) -> list[list[int]]:
    """Render and tokenise the prompts (batched per special-token flag)."""
    texts = [_render(template, r, tokenizer) for r in records] if texts is None else texts
    flags = [template.add_special_tokens(r) for r in records]
    result: list[list[int]] = [[] for _ in records]
    for flag in (True, False):
        idx = [i for i, f in enumerate(flags) if f == flag]
        for i, ids in zip(idx, _encode(tokenizer, [texts[i] for i in idx], flag)):
            result[i] = ids
    bos = getattr(tokenizer, "bos_token_id", None)
    for ids in result:
        _single_bos(ids, bos)
    return result


def _prompt_labels(records: Sequence[Record], tokenizer: Any, texts: list[str],
                   prompts: list[list[int]]) -> list[list[int]]:
    """The prompt labels: -100, but for the earlier assistant turns of conversations."""
    bos = getattr(tokenizer, "bos_token_id", None)

    def encode(text: str) -> list[int]:
        return _single_bos(_encode(tokenizer, [text], False)[0], bos)

    out = []
    for record, text, ids in zip(records, texts, prompts):
        if record.conversation is not None and record.conversation.trained:
            out.append(context_labels(record, tokenizer, text, ids, encode))
        else:
            out.append([IGNORE_INDEX] * len(ids))
    return out


def _cut(ids: list[int], record: Record, max_prompt_length: int, side: str,
         bos_token_id: int | None) -> tuple[int, int, int] | None:
    """What truncation keeps of a prompt: ``ids[:head] + ids[start:end]``; None: all of it."""
    if len(ids) <= max_prompt_length:
        return None
    if side == "error":
        raise DataError(f"prompt of sample '{record.id}' has {len(ids)} tokens, more than "
                        f"max_prompt_length={max_prompt_length} (truncation_side='error')",
                        path=record.source, line=record.line, field="prompt")
    if side == "right":
        return 0, 0, max_prompt_length
    # left: keep the end (the response cue); keep a leading BOS when there is one
    if bos_token_id is not None and ids[0] == bos_token_id and max_prompt_length >= 2:
        return 1, len(ids) - (max_prompt_length - 1), len(ids)
    return 0, len(ids) - max_prompt_length, len(ids)


def _apply_cut(seq: list[int], cut: tuple[int, int, int] | None) -> list[int]:
    if cut is None:
        return seq
    head, start, end = cut
    return seq[:head] + seq[start:end]


def _truncate_prompt(ids: list[int], record: Record, max_prompt_length: int, side: str,
                     bos_token_id: int | None) -> tuple[list[int], bool]:
    cut = _cut(ids, record, max_prompt_length, side, bos_token_id)
    return _apply_cut(ids, cut), cut is not None


def _resolve_template(template: PromptTemplate | str | None, tokenizer: Any) -> PromptTemplate:
    return template if isinstance(template, PromptTemplate) else get_template(template, tokenizer)


def tokenize_records(records: Iterable[Record], tokenizer: Any,
                     template: PromptTemplate | str | None = "alpaca", *, max_length: int,
                     max_prompt_length: int, truncation_side: str = "left",
                     add_eos: bool = True, context_targets: bool = True) -> TokenizedDataset:
    """Tokenise training records: prompt (masked) + response + EOS (targets).

    ``context_targets``: the earlier assistant turns of conversation records are targets too
    (False: only the final turn, as the difficulty measurer scores it).

    Raises :class:`DataError` for a record without an output (prompt-only evaluation rows
    cannot be training data), for duplicate ids, and for an over-long prompt with
    ``truncation_side="error"``; :class:`ConfigError` for bad lengths; :class:`ModelError` when
    the tokenizer has no EOS token.
    """
    _check_lengths(max_length, max_prompt_length)
    _check_side(truncation_side)
    records = list(records)
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ModelError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; the EOS "
                         "appended after each response is a training target")
    seen: dict[str, Record] = {}
    for r in records:
        if not r.has_output:
            raise DataError(f"sample '{r.id}' has no output; training data needs one (prompt-"
                            "only rows are for generation: use tokenize_prompts)",
                            path=r.source, line=r.line, field="output")
        if r.id in seen:
            first = seen[r.id]
            raise DataError(f"duplicate sample id '{r.id}' (also {first.source}:{first.line}); "
                            "ids must be unique within a dataset",
                            path=r.source, line=r.line, field="id")
        seen[r.id] = r
    template = _resolve_template(template, tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    texts = [_render(template, r, tokenizer) for r in records]
    prompts = _encode_prompts(records, tokenizer, template, texts)
    if context_targets:
        prompt_labels = _prompt_labels(records, tokenizer, texts, prompts)
    else:
        prompt_labels = [[IGNORE_INDEX] * len(p) for p in prompts]
    responses = _encode(tokenizer, [r.target for r in records], False)

    stats = TokenizationStats()
    samples: list[TokenizedSample] = []
    for record, prompt, plabels, response in zip(records, prompts, prompt_labels, responses):
        cut = _cut(prompt, record, max_prompt_length, truncation_side, bos)
        prompt, plabels, p_cut = _apply_cut(prompt, cut), _apply_cut(plabels, cut), cut is not None
        room = max_length - len(prompt)  # >= 1 since max_prompt_length < max_length
        target = response + [eos] if add_eos else list(response)
        r_cut = len(target) > room
        if r_cut:
            target = response[:room]  # cut: no EOS, the reference did not end here
        input_ids = prompt + target
        labels = plabels + target
        samples.append(TokenizedSample(id=record.id, input_ids=input_ids, labels=labels,
                                       prompt_length=len(prompt), prompt_truncated=p_cut,
                                       response_truncated=r_cut))
        stats.samples += 1
        stats.prompts_truncated += p_cut
        stats.responses_truncated += r_cut
        stats.prompt_tokens += len(prompt)
        stats.response_tokens += len(target) + sum(1 for x in plabels if x != IGNORE_INDEX)
        stats.total_tokens += len(input_ids)
        stats.max_sample_length = max(stats.max_sample_length, len(input_ids))
    return TokenizedDataset(samples, stats)


def tokenize_prompts(records: Iterable[Record], tokenizer: Any,
                     template: PromptTemplate | str | None = "alpaca", *,
                     max_prompt_length: int, truncation_side: str = "left") -> list[list[int]]:
    """Tokenised (and truncated) prompts for generation, in record order."""
    _check_lengths(None, max_prompt_length)
    _check_side(truncation_side)
    records = list(records)
    template = _resolve_template(template, tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    prompts = _encode_prompts(records, tokenizer, template)
    return [_truncate_prompt(p, r, max_prompt_length, truncation_side, bos)[0]
            for r, p in zip(records, prompts)]


def collate(samples: Sequence[TokenizedSample], pad_token_id: int | None, *,
            pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` (``[B, L]`` long
    tensors; labels are -100 on padding) and ``ids`` (list of str)."""
    import torch

    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None: set the tokenizer's pad token (for GPT-2 style "
                          "tokenizers the EOS token is commonly used)")
    if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
        raise ConfigError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
    length = max(len(s.input_ids) for s in samples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        if len(s.labels) != n:
            raise ValueError(f"sample '{s.id}': labels and input_ids differ in length")
        input_ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "ids": [s.id for s in samples]}


def count_target_tokens(labels: Any) -> int:
    """Number of predicted tokens: positions ``i >= 1`` (along the last axis) whose label is
    not -100. Position 0 is never predicted (the loss shifts by one).

    A tensor of any rank >= 1 is counted by :func:`pocl.losses.tokens.count_target_tokens` (the
    count the losses normalise by; it takes ``[B, L]``, so the leading axes are flattened). Token
    lists -- one row, or a list of rows of any lengths, such as ``TokenizedSample.labels`` -- are
    counted here, without building a tensor for each sample.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(labels, torch.Tensor):
        from pocl.losses.tokens import count_target_tokens as count_tensor_targets

        rows = labels.unsqueeze(0) if labels.dim() == 1 else labels.flatten(0, -2)
        return count_tensor_targets(rows, ignore_index=IGNORE_INDEX)
    if len(labels) and isinstance(labels[0], (list, tuple)):
        return sum(count_target_tokens(row) for row in labels)
    return sum(1 for x in list(labels)[1:] if x != IGNORE_INDEX)


def group_by_length(lengths: Sequence[int] | Mapping[int, int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths: indices sorted by length, longest first (so an
    out-of-memory batch shows up at once), ties by index; deterministic. Each index appears once;
    the last batch may be smaller."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    items = list(lengths.items()) if isinstance(lengths, Mapping) else list(enumerate(lengths))
    order = [i for i, _ in sorted(items, key=lambda kv: (-kv[1], kv[0]))]
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_SIDES",
    "TokenizationStats",
    "TokenizedDataset",
    "TokenizedSample",
    "collate",
    "count_target_tokens",
    "group_by_length",
    "tokenize_prompts",
    "tokenize_records",
]
