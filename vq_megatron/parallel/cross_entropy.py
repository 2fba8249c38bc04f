"""Vocab-parallel cross-entropy over materialised logit shards, label smoothing over the global vocab.

megatron-core's vocab_parallel_cross_entropy smooths over the *local* shard (with label_smoothing > 0 and
TP > 1 its loss differs between TP ranks) and uses NeMo's K/(K-1) convention. This one keeps
Megatron's reductions (max, target logit, sum-exp) via its VocabParallelCrossEntropy steps but smooths
with torch semantics (ε/V on every real class) over the global vocabulary, so every rank gets the same
loss and it equals F.cross_entropy. Padded vocab slots must hold -inf logits: they are excluded from
the smoothing mean and get zero gradient. Also supports ignore_index and z-loss, as the collapsed path does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as Steps

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(tensor, op, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """forward: 2 all-reduces over TP (max; then target logit, sum-exp and real-logit sum packed in one).
    backward: softmax·(1+2ζ·lse) − (1−ε)·onehot − ε/V on real slots, times the upstream gradient; no comm.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_size, label_smoothing, z_loss, ignore_index, group):
        rank = 0 if group is None else dist.get_rank(group)
        logits = logits.float().clone()  # Megatron's steps work in place; keep the caller's tensor intact
        real = torch.isfinite(logits)
        real_logit_sum = torch.where(real, logits, torch.zeros_like(logits)).sum(-1)
        logits, logits_max = Steps.calculate_logits_max(logits)
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)

        valid = target != ignore_index
        part = logits.shape[-1]
        start, end = rank * part, (rank + 1) * part
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = Steps.calculate_predicted_logits(
            logits, torch.where(valid, target, -1), logits_max, start, end)
        packed = _all_reduce(torch.stack([predicted, sum_exp, real_logit_sum]), dist.ReduceOp.SUM, group)
        predicted, sum_exp, real_logit_sum = packed.unbind(0)

        softmax, nll = Steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        lse = torch.log(sum_exp) + logits_max
        loss = (1.0 - label_smoothing) * nll
        if label_smoothing > 0:
            loss = loss + label_smoothing * (lse - real_logit_sum / vocab_size)
        if z_loss > 0:
            loss = loss + z_loss * lse.square()
        loss = torch.where(valid, loss, torch.zeros_like(loss))

        ctx.save_for_backward(softmax, target_mask, masked_target_1d, real, valid, lse)
        ctx.vocab_size, ctx.label_smoothing, ctx.z_loss = vocab_size, label_smoothing, z_loss
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d, real, valid, lse = ctx.saved_tensors
        eps, zeta = ctx.label_smoothing, ctx.z_loss
        g = torch.where(valid, grad_output.float(), torch.zeros_like(lse))
        grad = softmax * (1.0 + 2.0 * zeta * lse).unsqueeze(-1) if zeta > 0 else softmax.clone()
        grad_2d = grad.view(-1, grad.shape[-1])
        rows = torch.arange(grad_2d.shape[0], device=grad.device)
        grad_2d[rows, masked_target_1d] -= (1.0 - eps) * (1.0 - target_mask.view(-1).float())
        if eps > 0:
            grad.sub_(real.float() * (eps / ctx.vocab_size))
        grad.mul_(g.unsqueeze(-1))
        return grad, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int,
                                 group=None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [...] from this rank's logit shard [..., V_pad/T] (fp32 math, grad in logits' dtype).

    vocab_size: the real (unpadded) vocabulary size V, the denominator of the smoothing term.
    """
    loss = _VocabParallelCrossEntropy.apply(logits, target, vocab_size, float(label_smoothing),
                                            float(z_loss), ignore_index, group)
    return loss
