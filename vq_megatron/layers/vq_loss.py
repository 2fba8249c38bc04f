"""The training loss of a VQOutputLayer under tensor parallelism (TP size T).

Everything that depends on the vocab-sharded bias or refinement is a per-rank partial over this rank's
vocabulary, combined over TP in ONE all-gather (`loss_statistics`). The N·K·d collapse itself runs:

* split (`vq.tensor_parallel_loss: split`, the default): each TP rank computes the loss of 1/T of the tokens
  (with sequence parallelism exactly the slice of the sequence its hidden states hold, no gather), the
  codebook gradient is summed over TP, and the per-token losses are all-gathered so every rank returns
  the full [s, b] loss: the O(N·K·d) work shrinks with T;
* replicated: every rank computes the loss of every token (no communication for the collapse itself; the
  work does not shrink with T).

Gradients follow Megatron's rule: whatever a rank computes from only part of the work (its tokens or its
vocabulary) enters through copy_to_tensor_parallel_region, whose backward sums the partial gradients, and
whatever every rank computes whole is not summed again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vq_megatron.ops import (CollapseOptions, CollapseStatistics, collapsed_cross_entropy, segment_logsumexp,
                             target_refine_score, within_code_logsumexp)
from vq_megatron.parallel import (combine_over_tensor_parallel_region, copy_to_tensor_parallel_region,
                                  gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)

__all__ = ["loss_statistics", "replicated_loss", "split_loss"]


def loss_statistics(layer, labels: torch.Tensor, valid: torch.Tensor, g: torch.Tensor | None, *,
                    sharded_consumer: bool) -> tuple[CollapseStatistics, torch.Tensor | None]:
    """The collapse's statistics for targets `labels` [N] (and the within-code loss term of a two-level head)
    from this rank's vocabulary shard.

    B_k and the within-code log-sum-exp combine by logsumexp, the target's bias and score and Σ_v b_v by sum,
    all in one all-gather; without a bias or refinement nothing is communicated (counts are static).
    g [N, r]: the refinement features this rank's vocabulary is scored against (None without refinement).
    sharded_consumer: each rank goes on to use only part of the result (its tokens), so the result's
    gradient is summed over TP before the combine's backward.
    """
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target_code = layer.global_token_to_code[safe]
    in_range = valid & (safe >= layer.vocab_start) & (safe < layer.vocab_end)
    local_index = torch.where(in_range, safe - layer.vocab_start, torch.zeros_like(safe))
    bias, parts = layer.bias, []
    if bias is not None:
        acc = torch.promote_types(bias.dtype, torch.float32)
        zero = torch.zeros((), dtype=acc, device=bias.device)
        parts += [(segment_logsumexp(bias, layer.token_to_code, layer.num_codes), "logsumexp"),
                  (torch.where(in_range, bias[local_index].to(acc), zero), "sum"),
                  (torch.where(layer.token_to_code >= 0, bias, torch.zeros_like(bias)).sum(dtype=acc), "sum")]
    if g is not None:
        lse_local = within_code_logsumexp(g, layer.refine_weight, bias, layer._members(), target_code, valid)
        score_local = target_refine_score(g, layer.refine_weight, local_index)
        parts += [(lse_local, "logsumexp"), (torch.where(in_range, score_local, torch.zeros_like(score_local)), "sum")]
    combined = combine_over_tensor_parallel_region(parts, layer.tp.group)
    if sharded_consumer:
        combined = [copy_to_tensor_parallel_region(t, layer.tp.group) for t in combined]
    if bias is not None:
        log_mass, target_bias, bias_sum = combined[:3]
    else:
        log_mass, target_bias, bias_sum = torch.log(layer.code_counts.double()), None, None
    stats = CollapseStatistics(log_mass=log_mass, counts=layer.code_counts, target_code=target_code, valid=valid,
                               target_bias=target_bias, bias_sum=bias_sum)
    if g is None:
        return stats, None
    within_lse, target_score = combined[-2:]
    if target_bias is not None:
        target_score = target_score + target_bias
    within = torch.where(valid, within_lse - target_score, torch.zeros_like(target_score))
    # Two-level: the code term's target is z_t + B_t; the target's own score sits in the within term.
    return stats.replace(target_bias=log_mass[target_code]), within


def _refine_features(layer, hidden: torch.Tensor) -> torch.Tensor | None:
    """g = P·h, entering this rank's vocabulary-local scoring (partial gradients summed over TP)."""
    if layer.refine_weight is None:
        return None
    return copy_to_tensor_parallel_region(torch.matmul(hidden, layer.refine_proj.t()), layer.tp.group)


def _collapse(hidden, codebook, stats, within, options) -> torch.Tensor:
    per_token = collapsed_cross_entropy(hidden, codebook, stats, options)
    return per_token if within is None else per_token + within.to(per_token.dtype)


def replicated_loss(layer, hidden: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    options: CollapseOptions) -> torch.Tensor:
    """Per-token loss [N], computed whole on every TP rank (gradients complete everywhere)."""
    if layer.sequence_parallel:   # the loss is computed whole on every rank: backward just splits
        hidden = gather_from_sequence_parallel_region(hidden, layer.tp.group, sharded_consumer=False)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    stats, within = loss_statistics(layer, labels, valid, _refine_features(layer, hidden), sharded_consumer=False)
    return _collapse(hidden, layer.codebook, stats, within, options)


def split_loss(layer, hidden: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, options: CollapseOptions,
               ignore_index: int) -> torch.Tensor:
    """Per-token loss [N] on every rank; each rank computed the collapse for 1/T of the tokens.

    Tokens are split in contiguous chunks of the flattened [s, b] order, which is the order of the sequence
    slices under sequence parallelism; without it, N is padded with ignored targets to a multiple of T.
    """
    tp, group = layer.tp, layer.tp.group
    N, d = labels.shape[0], hidden.shape[-1]
    if layer.sequence_parallel:
        mine = hidden.reshape(-1, d)                         # this rank's slice of the sequence, as it came
        chunk = mine.shape[0]
        pad = 0
        g = None
        if layer.refine_weight is not None:   # every rank scores every token: gather g (r ≪ d), not hidden
            proj = copy_to_tensor_parallel_region(layer.refine_proj, group)
            g = gather_from_sequence_parallel_region(torch.matmul(mine, proj.t()), group, sharded_consumer=True)
    else:
        full = hidden.reshape(-1, d)
        chunk = -(-N // tp.size)
        pad = chunk * tp.size - N
        if pad:
            full = F.pad(full, (0, 0, 0, pad))
        # Backward all-gathers the chunks' gradients, so every rank holds the full input gradient.
        mine = scatter_to_sequence_parallel_region(full, group)
        g = _refine_features(layer, full)
    if pad:
        labels = F.pad(labels, (0, pad), value=ignore_index)
        valid = F.pad(valid, (0, pad), value=False)
    stats, within = loss_statistics(layer, labels, valid, g, sharded_consumer=True)
    rows = slice(tp.rank * chunk, (tp.rank + 1) * chunk)
    stats = stats.replace(target_code=stats.target_code[rows], valid=stats.valid[rows],
                          target_bias=None if stats.target_bias is None else stats.target_bias[rows])
    codebook = copy_to_tensor_parallel_region(layer.codebook, group)   # partial: this rank's tokens only
    per_chunk = _collapse(mine, codebook, stats, None if within is None else within[rows], options)
    return gather_from_sequence_parallel_region(per_chunk, group, sharded_consumer=False)[:N]
