"""Perplexity over sequential token windows (shared by periodic eval and `vq-megatron-evaluate`)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from vq_megatron.training.data import causal_mask

__all__ = ["windows_nll", "perplexities"]


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, *, micro_batch_size: int, device, group=None) -> tuple[float, int]:
    """Sum of token NLLs and token count over [n, s+1] windows (this rank's share), summed over `group`."""
    seq = windows.shape[1] - 1
    mask = causal_mask(seq, device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, windows.shape[0], micro_batch_size):
        w = windows[start:start + micro_batch_size].to(device)
        positions = torch.arange(seq, device=device).expand(w.shape[0], seq)
        per_token = model(w[:, :-1], positions, mask, labels=w[:, 1:])
        totals += torch.stack([per_token.double().sum(), torch.tensor(float(per_token.numel()), device=device,
                                                                      dtype=torch.float64)])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return float(totals[0]), int(totals[1])


def perplexities(name: str, nll: float, count: int, words: float | None = None) -> dict:
    """Token-level loss/perplexity, plus word-level perplexity when the number of words is known."""
    out = {f"{name}_loss": nll / count, f"{name}_ppl": math.exp(nll / count)}
    if words:
        out[f"{name}_word_ppl"] = math.exp(nll / words)
    return out
