"""Cross-entropy over V scattered VQ logits, computed exactly in O(N·K).

With vocab logits l_v = z_{M(v)} + b_v, the partition function collapses per code:
    lse_V(l) = log Σ_k Σ_{v∈S_k} exp(z_k + b_v) = logsumexp_k(z_k + B_k),   B_k = log Σ_{v∈S_k} exp(b_v).
Label smoothing (torch semantics: ε/V on every class) needs the mean vocab logit, which collapses too:
    mean_v l_v = (Σ_k n_k z_k + Σ_v b_v) / V.
So neither the forward nor the backward ever forms an N×V tensor.

The inputs of the collapse for one batch are one `CollapseStatistics` object: per-code B and n, and per
target its code, its additive term and validity. `collapse_statistics` builds it in one process; the
tensor-parallel layer assembles the same object from vocabulary shards with one all-gather. The autograd
Function owns only the N×K part. B (when it depends on the bias), the target's additive term and Σ_v b_v
are produced by O(V) / O(N) autograd ops, so their gradients reach the bias through ordinary autograd.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vq_megatron.ops.clusters import accumulation_dtype, code_counts, code_log_mass, gather_target

__all__ = ["CollapseStatistics", "CollapseOptions", "collapse_statistics", "collapsed_cross_entropy",
           "CollapsedCrossEntropy", "reduce_loss"]


@dataclass(frozen=True)
class CollapseStatistics:
    """What the collapsed loss needs to know about the map, the bias and the targets of one batch.

    log_mass: B [K] (-inf for empty codes); counts: n [K]; target_code: [N] int64 (0 where ignored);
    valid: [N] bool; target_bias: the additive term of the target logit next to z_t ([N] or None):
    b_y for VQ-Logits, B_{code(y)} for the two-level head whose within-code term is separate;
    bias_sum: Σ_v b_v (scalar or None; only label smoothing reads it).
    """

    log_mass: torch.Tensor
    counts: torch.Tensor
    target_code: torch.Tensor
    valid: torch.Tensor
    target_bias: torch.Tensor | None = None
    bias_sum: torch.Tensor | None = None

    def replace(self, **changes) -> "CollapseStatistics":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CollapseOptions:
    """The non-tensor options of the loss: V (the smoothing denominator), ε and ζ (z-loss weight)."""

    vocab_size: int
    label_smoothing: float = 0.0
    z_loss: float = 0.0


def collapse_statistics(token_to_code: torch.Tensor, labels: torch.Tensor, num_codes: int,
                        bias: torch.Tensor | None = None, ignore_index: int = -100) -> CollapseStatistics:
    """The statistics of one process holding the whole map [V] (and bias [V]); labels flat [N]."""
    valid = labels != ignore_index
    counts = code_counts(token_to_code, num_codes)
    target_code, target_bias = gather_target(token_to_code, labels, valid, bias)
    acc = accumulation_dtype(bias.dtype) if bias is not None else torch.float32
    return CollapseStatistics(
        log_mass=code_log_mass(token_to_code, num_codes, bias, counts=counts), counts=counts,
        target_code=target_code, valid=valid, target_bias=target_bias,
        bias_sum=None if bias is None else bias.sum(dtype=acc))


def _code_logits_accum(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # The matmul runs in the input dtype (bf16 tensor cores on GPU); every reduction after it is fp32.
    return torch.matmul(hidden, codebook.t()).to(accumulation_dtype(hidden.dtype))


class CollapsedCrossEntropy(torch.autograd.Function):
    """Per-token VQ cross-entropy.

    forward: z = h·Cᵀ, lse = logsumexp_k(z_k + B_k), loss = (1-ε)(lse - z_t - b_t) + ε(lse - mean_l) + ζ·lse²
    backward: ∂z = q·(1 + 2ζ·lse) - (1-ε)·onehot(t) - ε·n/V with q = softmax(z + B), scaled by the
              upstream gradient; ∂B = Σ_n of the first term; ∂b_t = -(1-ε); ∂Σb = -ε/V.
    Differentiable inputs are arguments; everything else arrives in `stats` and `options`.
    """

    @staticmethod
    def forward(ctx, hidden, codebook, log_mass, target_bias, bias_sum, stats: CollapseStatistics,
                options: CollapseOptions):
        eps, zeta = options.label_smoothing, options.z_loss
        counts, target_code, valid = stats.counts, stats.target_code, stats.valid
        z = _code_logits_accum(hidden, codebook)                    # [N, K]
        target_logit = z.gather(1, target_code.unsqueeze(1)).squeeze(1)
        if target_bias is not None:
            target_logit = target_logit + target_bias
        mean_logit = None
        if eps > 0:
            mean_logit = z @ counts
            if bias_sum is not None:
                mean_logit = mean_logit + bias_sum
            mean_logit = mean_logit / options.vocab_size

        z.add_(log_mass)                                           # z_k + B_k, in place: no second N×K
        # One exp pass gives both lse and the code softmax q (torch.logsumexp would need a second one).
        z_max = z.amax(dim=1, keepdim=True)
        z_max = torch.where(torch.isfinite(z_max), z_max, torch.zeros_like(z_max))
        probs = z.sub_(z_max).exp_()
        sum_exp = probs.sum(dim=1)
        lse = sum_exp.log() + z_max.squeeze(1)
        probs.div_(sum_exp.unsqueeze(1))
        loss = (1.0 - eps) * (lse - target_logit)
        if mean_logit is not None:
            loss = loss + eps * (lse - mean_logit)
        if zeta > 0:
            loss = loss + zeta * lse.square()
        loss = torch.where(valid, loss, torch.zeros_like(loss))

        ctx.save_for_backward(hidden, codebook, probs, lse, target_code, counts, valid)
        ctx.options = options
        ctx.has_bias_terms = (target_bias is not None, bias_sum is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, codebook, probs, lse, target_code, counts, valid = ctx.saved_tensors
        eps, zeta, vocab_size = ctx.options.label_smoothing, ctx.options.z_loss, ctx.options.vocab_size
        g = torch.where(valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))

        coef = g * (1.0 + 2.0 * zeta * lse) if zeta > 0 else g
        # Out of place: the saved probabilities must survive a retain_graph=True second backward.
        grad_z = probs * coef.unsqueeze(1)
        grad_log_mass = grad_z.sum(0) if ctx.needs_input_grad[2] else None
        grad_z.scatter_add_(1, target_code.unsqueeze(1), (-(1.0 - eps) * g).unsqueeze(1))
        if eps > 0:
            grad_z.sub_(torch.outer(g, counts) * (eps / vocab_size))

        grad_hidden = grad_codebook = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.matmul(grad_z.to(hidden.dtype), codebook)
        if ctx.needs_input_grad[1]:
            grad_codebook = torch.matmul(grad_z.t().to(hidden.dtype), hidden).to(codebook.dtype)

        has_target_bias, has_bias_sum = ctx.has_bias_terms
        grad_target_bias = -(1.0 - eps) * g if has_target_bias else None
        grad_bias_sum = (-(eps / vocab_size) * g.sum()) if has_bias_sum else None
        return grad_hidden, grad_codebook, grad_log_mass, grad_target_bias, grad_bias_sum, None, None


def collapsed_cross_entropy(hidden: torch.Tensor, codebook: torch.Tensor, stats: CollapseStatistics,
                            options: CollapseOptions) -> torch.Tensor:
    """Per-token loss [N] (0 where not `stats.valid`) from 2-D hidden [N, d] and the batch's statistics."""
    acc = accumulation_dtype(hidden.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    params = stats.replace(counts=stats.counts.to(acc))
    return CollapsedCrossEntropy.apply(hidden, codebook, stats.log_mass.to(acc), cast(stats.target_bias),
                                       cast(stats.bias_sum), params, options)


def reduce_loss(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch semantics: 'mean' divides by the number of non-ignored targets."""
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()
