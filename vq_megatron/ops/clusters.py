"""Per-code statistics of the token→code map, shared by the collapsed and materialised paths.

Every code k stands for the set of tokens S_k = {v : M(v) = k}. The collapse rests on one quantity,
the code's log-mass B_k = log Σ_{v∈S_k} exp(b_v): log n_k without a bias, -inf for an empty code
(so an empty code contributes exp(-inf) = 0 to every softmax, exactly as it should).
Map entries < 0 mark padded vocabulary slots (Megatron pads V to a multiple of the TP size); they
belong to no code.
"""

from __future__ import annotations

import torch

__all__ = ["code_counts", "code_log_mass", "segment_logsumexp", "gather_target"]


def _real_entries(token_to_code: torch.Tensor) -> torch.Tensor:
    return token_to_code >= 0


def code_counts(token_to_code: torch.Tensor, num_codes: int) -> torch.Tensor:
    """n_k: number of (non-padded) tokens mapped to each code, int64 [K].

    index_add instead of mask-indexing + bincount: neither makes the host wait for a GPU."""
    real = _real_entries(token_to_code)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=token_to_code.device)
    return counts.index_add_(0, token_to_code.clamp(min=0), real.to(torch.int64))


def segment_logsumexp(values: torch.Tensor, token_to_code: torch.Tensor, num_codes: int) -> torch.Tensor:
    """log Σ_{v: M(v)=k} exp(values_v) for every code k, fp32 [K]; -inf for empty codes.

    Differentiable through plain autograd: every op here is O(V), never O(N·V).
    """
    real = _real_entries(token_to_code)
    codes = token_to_code[real]
    vals = values[real].to(torch.promote_types(values.dtype, torch.float32))
    # Shift by the per-code max so exp never overflows; empty codes keep max = -inf.
    seg_max = torch.full((num_codes,), float("-inf"), dtype=vals.dtype, device=vals.device)
    seg_max = seg_max.scatter_reduce(0, codes, vals.detach(), reduce="amax", include_self=True)
    safe_max = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    seg_sum = torch.zeros(num_codes, dtype=vals.dtype, device=vals.device)
    seg_sum = seg_sum.index_add(0, codes, torch.exp(vals - safe_max[codes]))
    return torch.log(seg_sum) + safe_max


def code_log_mass(
    token_to_code: torch.Tensor, num_codes: int, bias: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """B_k = log Σ_{v∈S_k} exp(b_v) (log n_k without bias; pass `counts` if already known), -inf for
    empty codes. Without bias the result is fp64 (K numbers); callers cast to their accumulation dtype."""
    if bias is None:
        counts = code_counts(token_to_code, num_codes) if counts is None else counts
        return torch.log(counts.double())
    return segment_logsumexp(bias, token_to_code, num_codes)


def gather_target(
    token_to_code: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Code (and bias) of each target token; ignored positions point at code 0 with bias 0."""
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    target_code = token_to_code[safe_labels]
    target_bias = None
    if bias is not None:
        target_bias = torch.where(valid, bias[safe_labels], torch.zeros((), dtype=bias.dtype, device=bias.device))
    return target_code, target_bias
