"""Entropy of the VQ head's distribution over the vocabulary, without the N×V logits of VQ-Logits.

With p(v|h) = q_k·π_{v|k}, q = softmax_k(z_k + B_k) and a within-code distribution π of entropy H_k:

    H(p) = H(q) + Σ_k q_k H_k,      H(q) = lse - Σ_k q_k (z_k + B_k),   lse = logsumexp_k(z_k + B_k).

VQ-Logits (π_{v|k} = exp(b_v - B_k), fixed): H_k = B_k - m_k with m_k = Σ_{v∈k} π_{v|k} b_v, so
H(p) = lse - Σ_k q_k (z_k + m_k): O(N·K + V). Without a bias H_k = log n_k.
The two-level head (π_{v|k} = softmax_{v∈k}(s_v), s = b + u·g): H_k(g) = L_k - Σ_{v∈k} π_v s_v depends on the
row, so every code's within-code distribution is needed: O(N·V·r) work, never N×V×d, done in row chunks so
that at most `max_entries` scores exist at once.
"""

from __future__ import annotations

import torch

from vq_megatron.ops.clusters import accumulation_dtype, segment_logsumexp

__all__ = ["code_mean_bias", "code_entropy", "vq_logits_entropy", "within_code_entropy"]


def code_mean_bias(bias: torch.Tensor, token_to_code: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """m_k = Σ_{v∈k} exp(b_v - B_k)·b_v [K] (0 for an empty code), given B_k = log Σ_{v∈k} exp(b_v)."""
    real = token_to_code >= 0
    codes, b = token_to_code[real], bias[real].to(log_mass.dtype)
    safe_mass = torch.where(torch.isfinite(log_mass), log_mass, torch.zeros_like(log_mass))
    return torch.zeros_like(log_mass).index_add(0, codes, torch.exp(b - safe_mass[codes]) * b)


def code_entropy(z: torch.Tensor, log_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(q) [N], q [N, K]) of the code distribution q = softmax(z + B); empty codes have q = 0."""
    logits = z.to(accumulation_dtype(z.dtype)) + log_mass.to(accumulation_dtype(z.dtype))
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    return -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1), q


def vq_logits_entropy(z: torch.Tensor, log_mass: torch.Tensor, within_entropy: torch.Tensor) -> torch.Tensor:
    """H(p) [N] = H(q) + Σ_k q_k H_k for a static within-code entropy H_k [K] (VQ-Logits: B_k - m_k)."""
    h_code, q = code_entropy(z, log_mass)
    safe = torch.where(q > 0, within_entropy.to(q.dtype).expand_as(q), torch.zeros_like(q))
    return h_code + (q * safe).sum(-1)


def within_code_entropy(scores: torch.Tensor, token_to_code: torch.Tensor, num_codes: int) -> torch.Tensor:
    """H_k [..., K] of softmax over each code's tokens of `scores` [..., V] (0 for an empty code)."""
    lse = segment_logsumexp(scores, token_to_code, num_codes)
    real = token_to_code >= 0
    codes = token_to_code[real]
    s = scores[..., real].to(lse.dtype)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    pi = torch.exp(s - safe_lse[..., codes])
    mean_score = torch.zeros_like(lse).index_add(-1, codes, pi * s)
    return torch.where(torch.isfinite(lse), lse - mean_score, torch.zeros_like(lse))
