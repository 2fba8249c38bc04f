"""The within-code refinement of the two-level VQ head: p(v | k, h) = softmax_{v∈S_k}(b_v + u_v·g), g = P·h.

VQ-Logits alone gives p(v|h) = p(k|h)·p(v|k) with p(v|k) ∝ exp(b_v) fixed, so tokens that share a code can
never be told apart by context. The refinement gives every token a rank-r vector u_v (U [V, r]) and the
model a projection P [r, d]; within its code a token scores b_v + u_v·g. The code marginal stays
p(k|h) = softmax_k(z_k + B_k) (the collapse), so the full distribution is exactly normalised:

    log p(v|h) = (z_k + B_k - lse_k(z + B)) + (b_v + u_v·g - L_k(g)),   L_k(g) = log Σ_{w∈S_k} exp(b_w + u_w·g).

The training loss only needs L at each target's own code. `target_code_pairs` lists, for every target row n,
the members of its code: P = Σ_n n_{code(y_n)} pairs, about N·V/K for a count-balanced map (frequency maps
balance mass, so frequent targets sit in small codes), never N×V. `within_code_logsumexp` is one autograd
Function over those pairs that saves one probability per pair. With U = 0, L_k = B_k, so the head starts
exactly as VQ-Logits.
"""

from __future__ import annotations

import torch

from vq_megatron.ops.clusters import CodeMembers, accumulation_dtype
from vq_megatron.ops.scatter import scatter_code_logits

__all__ = ["member_positions", "target_code_pairs", "within_code_logsumexp", "target_refine_score", "refine_scores",
           "refined_logits"]


@torch.no_grad()
def member_positions(members: CodeMembers, codes: torch.Tensor, valid: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [P], positions [P]): for every valid row n, the position in `members.tokens` of each member
    of code codes[n]. Rows come out grouped and ascending. One host sync reads P (the output size)."""
    counts = torch.where(valid, members.counts[codes], torch.zeros_like(codes))
    total = int(counts.sum())
    rows = torch.repeat_interleave(torch.arange(codes.shape[0], device=codes.device), counts, output_size=total)
    # position of each pair inside its row's group, then offset into the code's member list
    group_start = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, device=codes.device) - group_start[rows]
    return rows, members.offsets[codes[rows]] + within


def target_code_pairs(members: CodeMembers, target_code: torch.Tensor, valid: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [P], tokens [P]): for every valid row n, each member token of code target_code[n]."""
    rows, positions = member_positions(members, target_code, valid)
    return rows, members.tokens[positions]


class _PairLogSumExp(torch.autograd.Function):
    """L_n = log Σ_{p: rows[p]=n} exp(s_p), s_p = b_{t_p} + u_{t_p}·g_n; -inf for rows without pairs.

    forward keeps the pair softmax and the two gathered [P, r] operands (P·(2r+1) numbers: a few MB where the
    N×K code logits are tens); backward: ∂s_p = softmax_p·∂L_{row p}, then ∂g_n = Σ_p ∂s_p u_{t_p},
    ∂U_t = Σ_p ∂s_p g_{row p}, ∂b_t = Σ_p ∂s_p (index_add, no N×V).
    """

    @staticmethod
    def forward(ctx, g, weight, bias, rows, tokens, num_rows: int):
        acc = accumulation_dtype(g.dtype)
        pair_weight, pair_g = weight[tokens].to(acc), g[rows].to(acc)
        scores = (pair_weight * pair_g).sum(-1)
        if bias is not None:
            scores = scores + bias[tokens].to(acc)
        row_max = torch.full((num_rows,), float("-inf"), dtype=acc, device=g.device)
        row_max = row_max.scatter_reduce(0, rows, scores, reduce="amax", include_self=True)
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        probs = torch.exp(scores - safe_max[rows])
        row_sum = torch.zeros(num_rows, dtype=acc, device=g.device).index_add_(0, rows, probs)
        has_pairs = row_sum > 0
        lse = torch.where(has_pairs, torch.log(torch.where(has_pairs, row_sum, torch.ones_like(row_sum))) + safe_max,
                          torch.full_like(row_sum, float("-inf")))
        probs.div_(row_sum.clamp(min=torch.finfo(acc).tiny)[rows])
        ctx.save_for_backward(rows, tokens, probs, pair_weight, pair_g)
        ctx.shapes = (g.shape, g.dtype, weight.shape, weight.dtype)
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        rows, tokens, probs, pair_weight, pair_g = ctx.saved_tensors
        g_shape, g_dtype, weight_shape, weight_dtype = ctx.shapes
        grad_s = probs * grad_lse.to(probs.dtype)[rows]                  # [P]
        grad_g = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_g = torch.zeros(g_shape, dtype=probs.dtype, device=probs.device).index_add_(
                0, rows, grad_s.unsqueeze(1) * pair_weight).to(g_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight_shape, dtype=probs.dtype, device=probs.device).index_add_(
                0, tokens, grad_s.unsqueeze(1) * pair_g).to(weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            shape, dtype = ctx.bias_shape
            grad_bias = torch.zeros(shape, dtype=probs.dtype, device=probs.device).index_add_(0, tokens, grad_s).to(dtype)
        return grad_g, grad_weight, grad_bias, None, None, None


def within_code_logsumexp(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          members: CodeMembers, target_code: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_{code(y_n)}(g_n) for every row n [N] (fp32), over the members listed in `members`.

    g [N, r], weight U [V, r] and bias [V] index the same (local) vocabulary as `members`. Rows that are
    not valid, or whose code has no member here (a tensor-parallel rank holds part of the vocabulary),
    get -inf.
    """
    rows, tokens = target_code_pairs(members, target_code, valid)
    return _PairLogSumExp.apply(g, weight, bias, rows, tokens, g.shape[0])



def target_refine_score(g: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u_{y_n}·g_n for every row [N] (fp32), y indexing the rows of `weight`: O(N·r)."""
    acc = accumulation_dtype(g.dtype)
    return (weight[token_ids].to(acc) * g.to(acc)).sum(-1)


def refine_scores(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """s[..., v] = b_v + u_v·g for every token of `weight` [V, r]: O(N·V·r), the materialised path only."""
    scores = torch.matmul(g, weight.t()).to(accumulation_dtype(g.dtype))
    return scores if bias is None else scores + bias.to(scores.dtype)


def refined_logits(z: torch.Tensor, token_to_code: torch.Tensor, log_mass: torch.Tensor,
                   within_lse: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of the two-level head: l_v = z_k + B_k - L_k(g) + b_v + u_v·g, k = M(v).

    Their log-partition over V equals logsumexp_k(z_k + B_k) (each code's tokens sum to exp(z_k + B_k)),
    so softmax(l) is the two-level distribution and, with U = 0 (L = B), l is exactly VQ-Logits' z_k + b_v.
    z [..., K], log_mass B [K], within_lse L [..., K], scores b + u·g [..., V]; padded slots (map < 0) -inf.
    """
    offsets = z.to(scores.dtype) + log_mass.to(scores.dtype) - within_lse
    return scatter_code_logits(offsets, token_to_code) + scores

