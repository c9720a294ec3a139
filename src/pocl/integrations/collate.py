"""A data collator that tokenises raw instruction rows as pocl does (prompt template, prompt masked,
response + EOS as targets), for a ``transformers.Trainer`` or TRL's GKDTrainer fed with a dataset in
pocl's field spellings (set ``remove_unused_columns=False``; GKDTrainer sets it itself)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["PoclCollator"]


class PoclCollator:
    """Rows (dicts with ``instruction``, ``input``, ``output`` ...) -> ``input_ids``, ``attention_mask``,
    ``labels`` (right-padded, -100 on the prompt and padding), ``prompts`` and ``prompt_attention_mask``
    (left-padded prompts, what GKDTrainer's on-policy generation reads; ``with_prompts=False`` leaves them
    out) and ``pocl_ids`` (a list of the rows' pocl ids; dropped by ``transformers`` before the model's
    forward only if the loss pops it -- :meth:`pop_ids`)."""

    def __init__(self, tokenizer, *, template: str = "alpaca", max_length: int = 512, max_prompt_length: int = 256,
                 truncation_side: str = "left", with_prompts: bool = True, id_field: str | None = None):
        from pocl.data import get_template

        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_side = truncation_side
        self.with_prompts = with_prompts
        self.id_field = id_field

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from pocl.data import collate, tokenize_prompts, tokenize_records
        from pocl.data.records import parse_row

        records = [parse_row(row, index=i, line=i + 1, source="<batch>", id_key=self.id_field or "id",
                             explicit_id=self.id_field is not None, require_output=True) for i, row in enumerate(rows)]
        # A step that spans two epochs of a stage may hold a sample twice (once from each): tokenise by position.
        by_position = [dataclasses.replace(r, id=str(i)) for i, r in enumerate(records)]
        samples = tokenize_records(by_position, self.tokenizer, self.template, max_length=self.max_length,
                                   max_prompt_length=self.max_prompt_length, truncation_side=self.truncation_side)
        batch = collate(list(samples), self.tokenizer.pad_token_id)
        batch.pop("ids")
        batch["pocl_ids"] = [r.id for r in records]
        if self.with_prompts:
            prompts = tokenize_prompts(records, self.tokenizer, self.template, max_prompt_length=self.max_prompt_length,
                                       truncation_side=self.truncation_side)
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), int(self.tokenizer.pad_token_id), dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                if p:
                    ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[i, width - len(p):] = 1
            batch["prompts"], batch["prompt_attention_mask"] = ids, mask
        return batch

    @staticmethod
    def pop_ids(inputs: dict[str, Any]) -> list[str] | None:
        """Remove and return the batch's ``pocl_ids`` (call it in ``compute_loss`` before the forward)."""
        return inputs.pop("pocl_ids", None)
