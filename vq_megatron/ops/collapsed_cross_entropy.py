"""Cross-entropy over V scattered VQ logits, computed exactly in O(N·K).

With vocab logits l_v = z_{M(v)} + b_v, the partition function collapses per code:
    lse_V(l) = log Σ_k Σ_{v∈S_k} exp(z_k + b_v) = logsumexp_k(z_k + B_k),   B_k = log Σ_{v∈S_k} exp(b_v).
Label smoothing (torch semantics: ε/V on every class) needs the mean vocab logit, which collapses too:
    mean_v l_v = (Σ_k n_k z_k + Σ_v b_v) / V.
So neither the forward nor the backward ever forms an N×V tensor.

The autograd Function below owns only the N×K part. B (when it depends on the bias), the target's bias and
Σ_v b_v are inputs produced by O(V) / O(N) autograd ops, so their gradients flow back to the bias through
ordinary autograd, and so that tensor parallelism can assemble them with collectives before the call.
"""

from __future__ import annotations

import torch

__all__ = ["collapsed_cross_entropy", "CollapsedCrossEntropy", "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (so gradcheck can run in double precision)."""
    return torch.promote_types(dtype, torch.float32)


def _code_logits_accum(hidden: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # The matmul runs in the input dtype (bf16 tensor cores on GPU); every reduction after it is fp32.
    return torch.matmul(hidden, codebook.t()).to(accumulation_dtype(hidden.dtype))


class CollapsedCrossEntropy(torch.autograd.Function):
    """Per-token VQ cross-entropy.

    forward: z = h·Cᵀ, lse = logsumexp_k(z_k + B_k), loss = (1-ε)(lse - z_t - b_t) + ε(lse - mean_l) + ζ·lse²
    backward: ∂z = q·(1 + 2ζ·lse) - (1-ε)·onehot(t) - ε·n/V with q = softmax(z + B), scaled by the
              upstream gradient; ∂B = Σ_n of the first term; ∂b_t = -(1-ε); ∂Σb = -ε/V.
    """

    @staticmethod
    def forward(ctx, hidden, codebook, log_mass, target_code, target_bias, bias_sum, counts, valid,
                vocab_size: int, label_smoothing: float, z_loss: float):
        z = _code_logits_accum(hidden, codebook)                    # [N, K]
        target_logit = z.gather(1, target_code.unsqueeze(1)).squeeze(1)
        if target_bias is not None:
            target_logit = target_logit + target_bias
        mean_logit = None
        if label_smoothing > 0:
            mean_logit = z @ counts
            if bias_sum is not None:
                mean_logit = mean_logit + bias_sum
            mean_logit = mean_logit / vocab_size

        z.add_(log_mass)                                           # z_k + B_k, in place: no second N×K
        # One exp pass gives both lse and the code softmax q (torch.logsumexp would need a second one).
        z_max = z.amax(dim=1, keepdim=True)
        z_max = torch.where(torch.isfinite(z_max), z_max, torch.zeros_like(z_max))
        probs = z.sub_(z_max).exp_()
        sum_exp = probs.sum(dim=1)
        lse = sum_exp.log() + z_max.squeeze(1)
        probs.div_(sum_exp.unsqueeze(1))
        loss = (1.0 - label_smoothing) * (lse - target_logit)
        if mean_logit is not None:
            loss = loss + label_smoothing * (lse - mean_logit)
        if z_loss > 0:
            loss = loss + z_loss * lse.square()
        loss = torch.where(valid, loss, torch.zeros_like(loss))

        ctx.save_for_backward(hidden, codebook, probs, lse, target_code, counts, valid)
        ctx.vocab_size, ctx.label_smoothing, ctx.z_loss = vocab_size, label_smoothing, z_loss
        ctx.has_bias_terms = (target_bias is not None, bias_sum is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, codebook, probs, lse, target_code, counts, valid = ctx.saved_tensors
        eps, zeta = ctx.label_smoothing, ctx.z_loss
        g = torch.where(valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))

        coef = g * (1.0 + 2.0 * zeta * lse) if zeta > 0 else g
        # Out of place: the saved probabilities must survive a retain_graph=True second backward.
        grad_z = probs * coef.unsqueeze(1)
        grad_log_mass = grad_z.sum(0) if ctx.needs_input_grad[2] else None
        grad_z.scatter_add_(1, target_code.unsqueeze(1), (-(1.0 - eps) * g).unsqueeze(1))
        if eps > 0:
            grad_z.sub_(torch.outer(g, counts) * (eps / ctx.vocab_size))

        grad_hidden = grad_codebook = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.matmul(grad_z.to(hidden.dtype), codebook)
        if ctx.needs_input_grad[1]:
            grad_codebook = torch.matmul(grad_z.t().to(hidden.dtype), hidden).to(codebook.dtype)

        has_target_bias, has_bias_sum = ctx.has_bias_terms
        grad_target_bias = -(1.0 - eps) * g if has_target_bias else None
        grad_bias_sum = (-(eps / ctx.vocab_size) * g.sum()) if has_bias_sum else None
        return (grad_hidden, grad_codebook, grad_log_mass, None, grad_target_bias, grad_bias_sum,
                None, None, None, None, None)


def collapsed_cross_entropy(
    hidden: torch.Tensor,
    codebook: torch.Tensor,
    log_mass: torch.Tensor,
    counts: torch.Tensor,
    target_code: torch.Tensor,
    valid: torch.Tensor,
    vocab_size: int,
    *,
    target_bias: torch.Tensor | None = None,
    bias_sum: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-token loss [N] (0 where not `valid`) from 2-D hidden [N, d] and precomputed code statistics.

    log_mass: B [K] fp32 (-inf for empty codes); counts: n [K] (float); target_code: [N] int64;
    target_bias: b at each target [N] or None; bias_sum: Σ_v b_v (scalar) or None.
    """
    acc = accumulation_dtype(hidden.dtype)
    if target_bias is not None:
        target_bias = target_bias.to(acc)
    if bias_sum is not None:
        bias_sum = bias_sum.to(acc)
    return CollapsedCrossEntropy.apply(
        hidden, codebook, log_mass.to(acc), target_code, target_bias, bias_sum,
        counts.to(acc), valid, vocab_size, float(label_smoothing), float(z_loss),
    )
