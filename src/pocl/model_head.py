"""The output layer and the transformer body of a causal LM, as the loss engine and the difficulty
measurer use them.

:class:`LMHead` exposes the output layer as (weight, bias, logit transform) so the loss engine can
compute logits chunk by chunk from :func:`hidden_states`; :func:`check_fused_head` verifies at start
that this reproduces the model's own logits (architectures that post-process logits in a way pocl
does not know fall back to the model's full logits). Re-exported by :mod:`pocl.models`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from pocl.errors import ModelError

__all__ = ["LMHead", "check_fused_head", "decoder_of", "hidden_states", "output_rows"]


def output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(model).__name__} has no output embedding layer; pocl needs a causal LM head")
    return int(head.weight.shape[0])


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (everything but the output layer)."""
    getter = getattr(model, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None:
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ModelError(f"cannot find the transformer body of {type(model).__name__}")
    return body


@dataclasses.dataclass
class LMHead:
    """The output layer as data: ``logits = logit_fn(hidden @ weight.T + bias)[..., :vocab_size]``."""

    weight: torch.Tensor  # [V_rows, H]
    bias: torch.Tensor | None  # [V_rows] or None
    vocab_size: int
    logit_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_model(cls, model: nn.Module, vocab_size: int) -> "LMHead":
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ModelError(f"output layer of {type(model).__name__} is {type(head).__name__}, not nn.Linear")
        return cls(head.weight, head.bias, vocab_size, _logit_postprocess(model.config))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(hidden, self.weight, self.bias)[..., : self.vocab_size]
        return self.logit_fn(out) if self.logit_fn is not None else out


def _logit_postprocess(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Known post-processing of logits after the head (checked numerically by check_fused_head)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    fns = []
    if scale not in (None, 1, 1.0):
        fns.append(lambda x, s=float(scale): x * s)
    if divide not in (None, 1, 1.0):
        fns.append(lambda x, d=float(divide): x / d)
    if cap:
        fns.append(lambda x, c=float(cap): torch.tanh(x / c) * c)
    if not fns:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return apply


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, L, H]`` of the transformer body (no logits are computed)."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def check_fused_head(model: nn.Module, head: LMHead, *, atol: float = 1e-3) -> tuple[bool, float]:
    """Compare ``head.logits(hidden_states(...))`` with the model's own logits on a probe input."""
    device = head.weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.vocab_size, (2, 8), generator=gen).to(device)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., : head.vocab_size].float()
        fused = head.logits(hidden_states(model, ids, mask)).float()
    finally:
        model.train(was_training)
    diff = float((ref - fused).abs().max())
    scale = float(ref.abs().max()) or 1.0
    return diff <= atol * max(1.0, scale), diff
