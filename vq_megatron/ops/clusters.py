"""Per-code statistics of the token→code map, shared by the collapsed and materialised paths.

Every code k stands for the set of tokens S_k = {v : M(v) = k}. The collapse rests on one quantity,
the code's log-mass B_k = log Σ_{v∈S_k} exp(b_v): log n_k without a bias, -inf for an empty code
(so an empty code contributes exp(-inf) = 0 to every softmax, exactly as it should).
Map entries < 0 mark padded vocabulary slots (Megatron pads V to a multiple of the TP size); they
belong to no code. Only the tensor-parallel layer produces such maps; the public functional API
rejects them (vq_megatron.checks.check_map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["code_counts", "code_log_mass", "segment_logsumexp", "gather_target", "CodeMembers",
           "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (so gradcheck can run in double precision)."""
    return torch.promote_types(dtype, torch.float32)


def _real_entries(token_to_code: torch.Tensor) -> torch.Tensor:
    return token_to_code >= 0


def code_counts(token_to_code: torch.Tensor, num_codes: int) -> torch.Tensor:
    """n_k: number of (non-padded) tokens mapped to each code, int64 [K].

    index_add instead of mask-indexing + bincount: neither makes the host wait for a GPU."""
    real = _real_entries(token_to_code)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=token_to_code.device)
    return counts.index_add_(0, token_to_code.clamp(min=0), real.to(torch.int64))


def segment_logsumexp(values: torch.Tensor, token_to_code: torch.Tensor, num_codes: int) -> torch.Tensor:
    """log Σ_{v: M(v)=k} exp(values[..., v]) for every code k: [..., V] -> [..., K]; -inf for empty codes.

    Accumulates in fp32 (fp64 for fp64 input). Differentiable through plain autograd: every op is
    O(size of values). Padded slots (map < 0) are left out.
    """
    real = _real_entries(token_to_code)
    codes = token_to_code[real]
    vals = values[..., real].to(accumulation_dtype(values.dtype))
    lead = vals.shape[:-1]
    index = codes.expand(*lead, codes.shape[0])
    # Shift by the per-code max so exp never overflows; empty codes keep max = -inf.
    seg_max = torch.full((*lead, num_codes), float("-inf"), dtype=vals.dtype, device=vals.device)
    seg_max = seg_max.scatter_reduce(-1, index, vals.detach(), reduce="amax", include_self=True)
    safe_max = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    shifted = torch.exp(vals - safe_max.gather(-1, index))
    seg_sum = torch.zeros((*lead, num_codes), dtype=vals.dtype, device=vals.device).scatter_add(-1, index, shifted)
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


@dataclass(frozen=True)
class CodeMembers:
    """The tokens of a map grouped by code (CSR): the tokens of code k are tokens[offsets[k]:offsets[k+1]],
    in ascending id order. Padded slots (map < 0) belong to no code. Built once per map, O(V log V)."""

    offsets: torch.Tensor   # int64 [K+1]
    tokens: torch.Tensor    # int64 [R], R = number of real tokens

    @classmethod
    @torch.no_grad()
    def build(cls, token_to_code: torch.Tensor, num_codes: int) -> "CodeMembers":
        ids = torch.nonzero(_real_entries(token_to_code)).squeeze(1)
        order = torch.sort(token_to_code[ids], stable=True).indices
        counts = code_counts(token_to_code, num_codes)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(offsets=offsets, tokens=ids[order])

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]
