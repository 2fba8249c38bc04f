"""Sampling from materialised logits (the dense head) with the VQ sampler's exact filtering rules.

Tie rule (vq_megatron.ops.sampling): top-k keeps every token whose logit is >= the k-th largest
(megatron-core's / HF's `logits < topk(...).values[..., -1]` removal), so tokens tied with the k-th are
all kept; top-p then keeps a token iff the renormalised mass of tokens with a strictly larger logit is
< top_p (at least one token). Both heads therefore sample the same distribution from the same logits.
"""

from __future__ import annotations

import torch

from vq_megatron.checks import check_sampling_args

__all__ = ["filtered_probs", "sample_from_logits"]


def _tie_group_start(sorted_logits: torch.Tensor) -> torch.Tensor:
    """For each position of a descending row, the first position holding the same logit."""
    new_group = torch.ones_like(sorted_logits, dtype=torch.bool)
    new_group[..., 1:] = sorted_logits[..., 1:] != sorted_logits[..., :-1]
    positions = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device).expand_as(sorted_logits)
    starts = torch.where(new_group, positions, torch.zeros_like(positions))
    return starts.cummax(dim=-1).values


def filtered_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids sorted by descending logit [N, V], their filtered probabilities [N, V])."""
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if top_k and top_k < sorted_logits.shape[-1]:
        kth = sorted_logits[..., top_k - 1: top_k]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    if top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        strictly_larger = mass_before.gather(-1, _tie_group_start(sorted_logits))
        probs = torch.where(strictly_larger < top_p, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return order, probs


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Token ids [N] from logits [N, V] (greedy, or temperature 0: argmax, lowest id among ties)."""
    check_sampling_args(temperature, top_k, top_p)
    if greedy or temperature == 0.0:
        return logits.argmax(-1)
    order, probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    pick = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)
