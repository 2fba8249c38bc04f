"""Sampling from materialised logits (the dense head), with the same filtering rules as the VQ sampler.

Top-k keeps the k highest logits, then top-p keeps the smallest prefix of the remaining tokens, by
descending probability, whose mass reaches top_p (at least one token). Ties are ordered by lower token id
first (a stable sort), the rule vq_megatron.ops.sampling uses, so both heads sample the same distribution.
"""

from __future__ import annotations

import torch

__all__ = ["filtered_probs", "sample_from_logits"]


def filtered_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids sorted by descending logit [N, V], their filtered probabilities [N, V])."""
    scaled = logits.float() / temperature
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    if top_k:
        sorted_logits[..., top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    if top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs = torch.where(mass_before < top_p, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return order, probs


def sample_from_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Token ids [N] from logits [N, V] (greedy, or temperature 0: argmax, lowest id among ties)."""
    if greedy or temperature == 0.0:
        return logits.argmax(-1)
    order, probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    pick = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)
