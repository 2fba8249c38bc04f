"""Adaptive softmax head (Grave et al. 2017), the classic "cheaper output layer" peer of VQ-Logits.

`AdaptiveSoftmaxHead` wraps torch.nn.AdaptiveLogSoftmaxWithLoss. Adaptive softmax assumes token ids sorted
by frequency (the head cluster holds the most frequent ids), so the head keeps a fixed permutation
`rank_of_token` [V] computed from training-data token counts and remaps labels before the loss and the
columns of the log-probabilities after it. `vq_megatron.models.AdaptiveGPTModel` is a megatron-core
GPTModel with this head; its training loss goes through GPTModel's `output_processor` hook (as VQGPTModel
does), so the contract is the same: labels -> per-token loss [b, s]; no labels -> [s, b, V_pad]
log-probabilities (padding slots -inf). Tensor parallel size 1 only.
"""

from __future__ import annotations

import torch
from torch import nn

from vq_megatron.checks import check_token_ids

__all__ = ["AdaptiveSoftmaxHead", "default_cutoffs", "frequency_rank"]


def default_cutoffs(vocab_size: int) -> list[int]:
    """Head of V/8 tokens, a middle cluster up to V/2, a tail cluster for the rest (classic 3-way split)."""
    cuts = sorted({vocab_size // 8, vocab_size // 2})
    return [c for c in cuts if 0 < c < vocab_size]


def frequency_rank(token_counts: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """rank_of_token [V]: 0 for the most frequent token (ties broken by id); identity without counts."""
    if token_counts is None:
        return torch.arange(vocab_size, dtype=torch.int64)
    if token_counts.shape != (vocab_size,):
        raise ValueError(f"token_counts must have shape [{vocab_size}], got {tuple(token_counts.shape)}")
    # stable sort by descending count: equal counts keep id order
    order = torch.sort(-token_counts.to(torch.int64), stable=True).indices
    rank = torch.empty(vocab_size, dtype=torch.int64)
    rank[order] = torch.arange(vocab_size, dtype=torch.int64)
    return rank


class AdaptiveSoftmaxHead(nn.Module):
    """Frequency-remapped AdaptiveLogSoftmaxWithLoss over the real vocabulary V (padded to V_pad)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, padded_vocab_size: int | None = None,
                 cutoffs=None, div_value: float = 4.0, token_counts: torch.Tensor | None = None,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.vocab_size = vocab_size
        self.padded_vocab_size = vocab_size if padded_vocab_size is None else padded_vocab_size
        if self.padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={vocab_size}")
        cutoffs = list(default_cutoffs(vocab_size) if cutoffs is None else cutoffs)
        if not cutoffs or sorted(set(cutoffs)) != cutoffs or cutoffs[0] <= 0 or cutoffs[-1] >= vocab_size:
            raise ValueError(f"adaptive cutoffs must be increasing integers in (0, {vocab_size}), got {cutoffs}")
        self.cutoffs = cutoffs
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, cutoffs, div_value=div_value,
                                                 head_bias=False, device=device, dtype=dtype)
        self.register_buffer("rank_of_token", frequency_rank(token_counts, vocab_size).to(device),
                             persistent=True)
        self.sequence_parallel = False   # GPTModel's inference path reads this attribute

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """hidden [..., d], labels [...] (token ids) -> per-token negative log-likelihood [...]."""
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_y = labels.reshape(-1)
        valid = flat_y != ignore_index
        check_token_ids(flat_y, self.vocab_size, ignore_index=ignore_index)
        ranked = self.rank_of_token[torch.where(valid, flat_y, torch.zeros_like(flat_y))]
        out = self.asm(flat_h, ranked)   # .output = log p(target) per row
        nll = torch.where(valid, -out.output, torch.zeros_like(out.output))
        return nll.reshape(labels.shape)

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        """ColumnParallelLinear's contract: [s, b, d] -> ([s, b, V_pad] log-probabilities, None)."""
        if weight is not None:
            raise ValueError("the adaptive softmax head cannot tie embeddings")
        logp_ranked = self.asm.log_prob(hidden.reshape(-1, hidden.shape[-1]))
        logits = logp_ranked.new_full((logp_ranked.shape[0], self.padded_vocab_size), float("-inf"))
        logits[:, : self.vocab_size] = logp_ranked[:, self.rank_of_token]
        return logits.reshape(*hidden.shape[:-1], self.padded_vocab_size), None
