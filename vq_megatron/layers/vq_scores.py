"""Per-token log-probabilities and entropy of a VQOutputLayer's distribution under tensor parallelism, for RL
and evaluation, without the V logits (ops/entropy.py has the math).

The bias (and the refinement U of a two-level head) is vocab-sharded: each rank sums its part of every
per-code quantity and the parts are combined over TP (logsumexp, then sums weighted by the combined
normalisers: two small all-gathers). Everything else is computed whole on every rank, so gradients are
complete everywhere and every rank returns the same [s, b] result.
"""

from __future__ import annotations

import torch

from vq_megatron.ops import (code_entropy, code_logits, refine_scores, segment_logsumexp, vq_logits_entropy)
from vq_megatron.parallel import (combine_over_tensor_parallel_region, copy_to_tensor_parallel_region,
                                  gather_from_sequence_parallel_region)

__all__ = ["log_probs", "entropy"]


def log_probs(layer, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens | h) [s, b] through the collapsed loss (exact; every entry of tokens is a token id)."""
    return -layer.loss(hidden, tokens, ignore_index=-(2 ** 62), label_smoothing=0.0, z_loss=0.0, reduction="none")


def _weighted_sums(values: torch.Tensor, token_to_code: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Σ_{v∈k, this shard} exp(values_v - lse_k)·values_v per code [..., K] (lse: the combined normaliser)."""
    real = token_to_code >= 0
    codes = token_to_code[real]
    vals = values[..., real].to(lse.dtype)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.zeros_like(lse).index_add(-1, codes, torch.exp(vals - safe[..., codes]) * vals)


def _within_entropy(layer, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-mass L_k, entropy H_k) over every code of softmax within each code of `values` [..., V/T shard]."""
    group, m, K = layer.tp.group, layer.token_to_code, layer.num_codes
    (lse,) = combine_over_tensor_parallel_region([(segment_logsumexp(values, m, K), "logsumexp")], group)
    # Each rank weighs only its shard with the combined normaliser: sum those partial gradients over TP.
    partial = _weighted_sums(values, m, copy_to_tensor_parallel_region(lse, group))
    (mean,) = combine_over_tensor_parallel_region([(partial, "sum")], group)
    return lse, torch.where(torch.isfinite(lse), lse - mean, torch.zeros_like(lse))


def entropy(layer, hidden: torch.Tensor, *, max_entries: int = 1 << 24) -> torch.Tensor:
    """Entropy of p(·|h) over the real vocabulary, [s, b] (fp32). hidden [s(/T), b, d]."""
    if layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, layer.tp.group, sharded_consumer=False)
    flat = hidden.reshape(-1, hidden.shape[-1])
    z = code_logits(flat, layer.codebook)
    if layer.bias is None:
        log_mass = torch.log(layer.code_counts.double()).to(torch.promote_types(z.dtype, torch.float32))
        static_within = log_mass
    else:
        log_mass, static_within = _within_entropy(layer, layer.bias)
    if layer.refine_weight is None:
        return vq_logits_entropy(z, log_mass, static_within).view(hidden.shape[:-1])
    rows = max(1, max_entries // layer.partition_size)
    pieces = []
    for start in range(0, flat.shape[0], rows):
        # This rank scores only its vocabulary shard: the partial gradients of g are summed over TP.
        g = copy_to_tensor_parallel_region(torch.matmul(flat[start:start + rows], layer.refine_proj.t()),
                                           layer.tp.group)
        _, h_within = _within_entropy(layer, refine_scores(g, layer.refine_weight, layer.bias))
        h_code, q = code_entropy(z[start:start + rows], log_mass)
        pieces.append(h_code + (q * h_within).sum(-1))
    return torch.cat(pieces).view(hidden.shape[:-1])
