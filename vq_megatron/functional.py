"""Functional entry points of the VQ head (single process; tensor parallelism lives in `layers`).

    logits = vq_logits(hidden, codebook, token_to_code, bias=None)                       # [..., V]
    logp = vq_log_softmax(hidden, codebook, token_to_code, bias=None,
                          refine_weight=None, refine_proj=None)                          # [..., V]
    loss = vq_cross_entropy(hidden, codebook, token_to_code, labels, bias=None,
                            refine_weight=None, refine_proj=None, ignore_index=-100,
                            label_smoothing=0.0, z_loss=0.0, reduction="mean")
    logp_y = vq_log_probs(hidden, codebook, token_to_code, tokens, ...)                  # [...]
    entropy = vq_entropy(hidden, codebook, token_to_code, ...)                           # [...]

Without the refinement this is VQ-Logits: `vq_cross_entropy` equals F.cross_entropy(vq_logits(...), labels)
(+ z_loss·lse²) in value and gradient, through the exact collapse in O(N·K·d + V), never building N×V.
With refine_weight U [V, r] and refine_proj P [r, d] it is the two-level head (ops/within_code.py):
log p(v|h) = log softmax_k(z + B)_{M(v)} + log softmax_{w∈S_{M(v)}}(b_w + u_w·P h)_v; the loss adds the
within-code term at each target's own code, O(N·r·|code|). Maps must be codes in [0, K) (padding is the
tensor-parallel layer's business).
"""

from __future__ import annotations

import torch

from vq_megatron.checks import (check_loss_options, check_map, check_reduction, check_refine_shapes,
                                check_token_ids, check_vq_shapes)
from vq_megatron.ops import (CodeMembers, CollapseOptions, accumulation_dtype, code_entropy, code_log_mass,
                             code_logits, code_mean_bias, collapse_statistics, collapsed_cross_entropy, reduce_loss,
                             refine_scores, refined_logits, scatter_code_logits, segment_logsumexp,
                             target_refine_score, vq_logits_entropy, within_code_entropy, within_code_logsumexp)

__all__ = ["vq_logits", "vq_log_softmax", "vq_cross_entropy", "vq_log_probs", "vq_entropy"]


def vq_logits(hidden, codebook, token_to_code, bias=None) -> torch.Tensor:
    """Materialised VQ-Logits vocabulary logits l_v = (h·Cᵀ)_{M(v)} + b_v, shape [..., V]."""
    check_vq_shapes(hidden, codebook, token_to_code, bias)
    check_map(token_to_code, codebook.shape[0])
    return scatter_code_logits(code_logits(hidden, codebook), token_to_code.long(), bias)


def vq_log_softmax(hidden, codebook, token_to_code, bias=None, refine_weight=None,
                   refine_proj=None) -> torch.Tensor:
    """Normalised log p(v|h) over the vocabulary [..., V] (fp32; fp64 for fp64 inputs).

    The reference and generation path: O(N·(K·d + V·r)), never N×V×d.
    """
    check_vq_shapes(hidden, codebook, token_to_code, bias)
    check_map(token_to_code, codebook.shape[0])
    check_refine_shapes(hidden, token_to_code.shape[0], refine_weight, refine_proj)
    token_to_code, num_codes = token_to_code.long(), codebook.shape[0]
    z = code_logits(hidden, codebook)
    if refine_weight is None:
        logits = scatter_code_logits(z, token_to_code, bias)
    else:
        scores = refine_scores(torch.matmul(hidden, refine_proj.t()), refine_weight, bias)
        log_mass = code_log_mass(token_to_code, num_codes, bias)
        logits = refined_logits(z, token_to_code, log_mass, segment_logsumexp(scores, token_to_code, num_codes),
                                scores)
    return torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=-1)


def vq_cross_entropy(hidden, codebook, token_to_code, labels, bias=None, refine_weight=None,
                     refine_proj=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                     z_loss: float = 0.0, reduction: str = "mean", validate: bool = True) -> torch.Tensor:
    """Cross-entropy of the VQ head through the exact collapse (plus the within-code term when refined).

    hidden [..., d], codebook [K, d], token_to_code [V] (ints in [0, K)), labels [...] int64,
    bias [V] or None, refine_weight U [V, r] and refine_proj P [r, d] or None (both or neither).
    Returns a scalar ('mean'/'sum') or per-token loss shaped like labels ('none'). z_loss adds ζ·lse²
    with lse the log-partition of the code softmax (which is also that of the refined logits, see
    ops/within_code.py); label smoothing is rejected with a refinement. `validate` checks map and label
    ranges (one device sync each); turn it off in hot loops with trusted data.
    """
    check_vq_shapes(hidden, codebook, token_to_code, bias)
    check_refine_shapes(hidden, token_to_code.shape[0], refine_weight, refine_proj)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden leading shape {tuple(hidden.shape[:-1])}")
    check_reduction(reduction)
    refined = refine_weight is not None
    check_loss_options(label_smoothing, z_loss, refine_weight.shape[1] if refined else 0)
    num_codes, vocab_size = codebook.shape[0], token_to_code.shape[0]
    token_to_code = token_to_code.long()
    labels_flat = labels.reshape(-1).long()
    if validate:
        check_map(token_to_code, num_codes)
        check_token_ids(labels_flat, vocab_size, ignore_index=ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    stats = collapse_statistics(token_to_code, labels_flat, num_codes, bias, ignore_index)
    within = None
    if refined:
        # Two-level: -log p(k_y|h) uses B_{k_y} as the target's additive term; -log p(y|k_y, h) is separate.
        g = torch.matmul(flat_hidden, refine_proj.t())
        safe = torch.where(stats.valid, labels_flat, torch.zeros_like(labels_flat))
        target_score = target_refine_score(g, refine_weight, safe)
        if stats.target_bias is not None:
            target_score = target_score + stats.target_bias.to(target_score.dtype)
        members = CodeMembers.build(token_to_code, num_codes)
        lse_within = within_code_logsumexp(g, refine_weight, bias, members, stats.target_code, stats.valid)
        within = torch.where(stats.valid, lse_within - target_score, torch.zeros_like(target_score))
        stats = stats.replace(target_bias=stats.log_mass[stats.target_code])
    per_token = collapsed_cross_entropy(flat_hidden, codebook, stats,
                                        CollapseOptions(vocab_size, label_smoothing, z_loss))
    if within is not None:
        per_token = per_token + within.to(per_token.dtype)
    out = reduce_loss(per_token, stats.valid, reduction)
    return out.view(labels.shape) if reduction == "none" else out


def vq_log_probs(hidden, codebook, token_to_code, tokens, bias=None, refine_weight=None,
                 refine_proj=None) -> torch.Tensor:
    """log p(tokens | h), shaped like tokens: exact, through the collapse (the per-token log-probabilities RL
    frameworks ask for), never the V logits. Every entry of tokens must be a token id."""
    return -vq_cross_entropy(hidden, codebook, token_to_code, tokens, bias, refine_weight, refine_proj,
                             ignore_index=-(2 ** 62), reduction="none")


def vq_entropy(hidden, codebook, token_to_code, bias=None, refine_weight=None, refine_proj=None, *,
               max_entries: int = 1 << 24) -> torch.Tensor:
    """Entropy of p(·|h) over the vocabulary, [...] (fp32), differentiable (ops/entropy.py).

    VQ-Logits: O(N·K·d + V). The two-level head: O(N·(K·d + V·r)), computed in row chunks of at most
    `max_entries` scores, never N×V at once.
    """
    check_vq_shapes(hidden, codebook, token_to_code, bias)
    check_map(token_to_code, codebook.shape[0])
    check_refine_shapes(hidden, token_to_code.shape[0], refine_weight, refine_proj)
    token_to_code, num_codes = token_to_code.long(), codebook.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    z = code_logits(flat, codebook)
    log_mass = code_log_mass(token_to_code, num_codes, bias).to(accumulation_dtype(z.dtype))
    if refine_weight is None:
        within = log_mass if bias is None else log_mass - code_mean_bias(bias, token_to_code, log_mass)
        return vq_logits_entropy(z, log_mass, within).view(hidden.shape[:-1])
    rows = max(1, max_entries // token_to_code.shape[0])
    pieces = []
    for start in range(0, flat.shape[0], rows):
        g = torch.matmul(flat[start:start + rows], refine_proj.t())
        h_code, q = code_entropy(z[start:start + rows], log_mass)
        h_within = within_code_entropy(refine_scores(g, refine_weight, bias), token_to_code, num_codes)
        pieces.append(h_code + (q * h_within).sum(-1))
    return torch.cat(pieces).view(hidden.shape[:-1])
