"""Exact sampling from the two-level head: p(v|h) = p(k|h)·p(v|k,h), the code marginal of VQ-Logits and a
rank-r within-code refinement (ops/within_code.py).

* temperature 1 without top-k / top-p: the factorisation itself. A code is drawn from
  softmax_k(z_k + B_k), then a token inside it from softmax_{v∈k}(b_v + u_v·g). O(N·(K + n_k·r)).
* otherwise (temperature ≠ 1, top-k, top-p, greedy): tempering and filtering act on the full
  distribution, whose code masses depend on every code's within-code normaliser. The row's logits
  (ops.within_code.refined_logits) are formed in O(N·V·r) — never N×V×d, r ≪ d — and filtered and sampled
  with the dense sampler's rules (ops/sampling/dense.py: the same tie rule as the VQ-Logits sampler), so
  the semantics are exactly those of the materialised distribution.
"""

from __future__ import annotations

import torch

from vq_megatron.checks import check_sampling_args
from vq_megatron.ops.clusters import segment_logsumexp
from vq_megatron.ops.sampling.code_index import CodeIndex
from vq_megatron.ops.sampling.dense import sample_from_logits
from vq_megatron.ops.within_code import refine_scores, refined_logits

__all__ = ["refined_full_logits", "refined_sample"]


def refined_full_logits(z: torch.Tensor, g: torch.Tensor, token_to_code: torch.Tensor, bias: torch.Tensor | None,
                        weight: torch.Tensor, index: CodeIndex) -> torch.Tensor:
    """[N, V] logits of the two-level head (log-probabilities up to a per-row constant), in O(N·V·r)."""
    scores = refine_scores(g.double(), weight.double(), None if bias is None else bias.double())
    within = segment_logsumexp(scores, token_to_code, index.num_codes)
    return refined_logits(z.double(), token_to_code, index.log_mass, within, scores)


def _two_stage_draw(z: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, index: CodeIndex,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Code ~ softmax(z + B) (empty codes have B = -inf: never drawn), then token ~ softmax over the code's
    members of b + u·g. The members of the drawn codes are laid out as [N, largest drawn code]."""
    code = torch.multinomial(torch.softmax(z.double() + index.log_mass, dim=-1), 1, generator=generator).squeeze(1)
    sizes = index.counts[code]
    slot = torch.arange(int(sizes.max()), device=z.device)
    inside = slot < sizes.unsqueeze(1)
    positions = torch.where(inside, index.offsets[code].unsqueeze(1) + slot, torch.zeros_like(slot))
    scores = (weight[index.tokens[positions]].double() * g.double().unsqueeze(1)).sum(-1) + index.bias64[positions]
    scores = torch.where(inside, scores, torch.full_like(scores, float("-inf")))
    pick = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
    return index.tokens[positions.gather(1, pick).squeeze(1)]


@torch.no_grad()
def refined_sample(z: torch.Tensor, g: torch.Tensor, token_to_code: torch.Tensor, bias: torch.Tensor | None,
                   weight: torch.Tensor, index: CodeIndex, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, generator: torch.Generator | None = None, greedy: bool = False
                   ) -> torch.Tensor:
    """Token ids [...] from the two-level head. z: code logits [..., K]; g = P·h [..., r]; token_to_code,
    bias and weight U index the whole vocabulary (padded slots: map -1, never drawn); index: the CodeIndex of
    that map and bias. temperature 0 or greedy: argmax of the logits (lowest token id among ties)."""
    check_sampling_args(temperature, top_k, top_p)
    shape = z.shape[:-1]
    z2, g2 = z.detach().reshape(-1, z.shape[-1]), g.detach().reshape(-1, g.shape[-1])
    if z2.shape[0] == 0:
        return torch.empty(shape, dtype=torch.int64, device=z.device)
    if temperature == 1.0 and top_k == 0 and top_p == 1.0 and not greedy:
        return _two_stage_draw(z2, g2, weight.detach(), index, generator).view(shape)
    logits = refined_full_logits(z2, g2, token_to_code, bias, weight.detach(), index)
    tokens = sample_from_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                greedy=greedy)
    return tokens.view(shape)
