"""Materialised VQ logits: scatter code logits to the vocabulary, l_v = z_{M(v)} + b_v.

This is the path for generation / returning logits, and the reference the collapsed loss is tested
against. Map entries < 0 are padded vocabulary slots: their logit is -inf so they never receive
probability mass under any softmax (Megatron pads V to a multiple of the tensor-parallel size).
"""

from __future__ import annotations

import torch

__all__ = ["code_logits", "scatter_code_logits"]


def code_logits(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z = h·Cᵀ over any leading shape: [..., d] x [K, d] -> [..., K]."""
    return torch.matmul(hidden, codebook.t())


def scatter_code_logits(
    z: torch.Tensor, token_to_code: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., K] code logits -> [..., V_local] vocab logits (autograd: index_add back onto codes)."""
    # Padded slots index an extra -inf column: one gather, no data-dependent branch (no GPU sync).
    num_codes = z.shape[-1]
    neg_inf = torch.full((*z.shape[:-1], 1), float("-inf"), dtype=z.dtype, device=z.device)
    index = torch.where(token_to_code < 0, num_codes, token_to_code)
    logits = torch.cat([z, neg_inf], dim=-1).index_select(-1, index)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits
