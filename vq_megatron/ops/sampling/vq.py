"""Exact sampling from the VQ-Logits softmax without building the [N, V] vocabulary logits.

The vocabulary logits are l_v = z_{M(v)} + b_v: code logits z = h·Cᵀ [N, K], the token→code map M
[V] (entries < 0 are padded vocabulary slots and are never sampled) and an optional per-token bias b
[V] (None = zeros). Sorted in descending order, the logits of one code k are the code's biases, sorted
descending, shifted by z_k. A :class:`CodeIndex`, built once per map (and bias), stores exactly that:
the tokens grouped by code (CSR layout), within a code sorted by (bias descending, token id
ascending). Everything below works on the index and the code logits and costs O(K)-ish per row, never
O(V) per row.

Semantics (identical to filtering and sampling the materialised logits):

* temperature T > 0: probabilities softmax(l / T) over the real (non-padded) vocabulary; T == 0 means
  greedy decoding (:func:`vq_greedy`).
* top-k (0 = off), then top-p (1.0 = off) on the renormalised top-k distribution, as in
  Hugging Face / Megatron. **Tie rule** (ours, defined on the float64 logits, permutation invariant,
  no dependence on token ids):

  - top-k keeps token v iff fewer than k tokens have a strictly larger logit, i.e. every token whose
    logit is >= the k-th largest logit. This is exactly megatron-core's and HF's rule
    (``logits < topk(logits, k).values[..., -1]`` are removed): tokens tied with the k-th logit are
    all kept (without a per-token bias a whole code ties, so a whole code is kept or dropped).
  - top-p keeps token v iff the probability mass of the tokens with a strictly larger logit is
    < top_p. Without ties this is the standard "smallest set of most probable tokens whose
    cumulative probability is >= top_p" (always at least one token); tokens tied with the last kept
    one are all kept, where sort-based implementations keep an implementation-defined subset of them.
    (HF uses the same strict inequality; megatron-core keeps a token when the mass before it is
    <= top_p, which differs only when that mass equals top_p exactly.)

  Both filters therefore keep a threshold set {v : l_v >= tau} for a per-row tau, which within every
  code is a prefix of its bias-sorted token list. Sampling draws a code ∝ exp(z_k / T)·(kept mass of
  the code), then a token inside the kept prefix of that code ∝ exp(b_v / T) (uniform without a
  bias), both by inverse CDF. tau is found without listing the kept tokens:

  - no bias: a code's tokens tie, so the filter is a sort of the K code logits (multiplicities n_k);
  - bias and a small top-k (min(k, K)·min(k, n_max) <= 4K): the first k tokens of the k codes with
    the best top logit contain every token above the k-th largest logit; tau (and the top-p masses)
    come from sorting these candidates;
  - otherwise bisection on tau (first halving the value range, then the float64 bit patterns for
    exact convergence), each step counting / weighing the per-code prefixes with a binary search
    restricted to the current bracket, until <= E = min(4K, 1024) tokens remain inside the bracket;
    those are listed, sorted and resolved exactly.
* greedy: :func:`vq_greedy` returns exactly ``torch.argmax`` of the materialised logits
  (``scatter_code_logits(z, M, b)`` in z's dtype): the largest logit, ties broken by the LOWEST token
  id, across codes as well as within a code.

Ordering and masses are computed in float64 from z and b (l_v = float64(z_k) + float64(b_v)); the
reference in tests/unit/test_sampling.py materialises the logits in float64 the same way. Logits are
assumed finite (no NaN / +inf).

Complexity: CodeIndex.build O(V log V) once; per call O(V) once per new temperature (cached
cumulative within-code weights). Per row: O(K + log V) without filtering; O(K log K) without a bias;
O(K + k² log k) for the candidate path; otherwise O(S·K·log n_max + E log E) with S bisection steps
(about log2(V / E) plus a few in practice, at most 96), n_max the largest code. None of it depends on
how many tokens the filter keeps, and no tensor larger than O(N·K + V) is created. Everything is
vectorised over rows (no per-row Python loop) and runs on the input tensors' device; a bisection step
reads one scalar back to the host (its loop bound).
"""

from __future__ import annotations

import torch

from vq_megatron.checks import check_sampling_args
from vq_megatron.ops.sampling.code_index import CodeIndex
from vq_megatron.ops.sampling.threshold import _code_masses, _code_scale, _kept_counts, _prefix_len, _uniforms

__all__ = ["vq_greedy", "vq_sample", "vq_filtered_probs"]


@torch.no_grad()
def vq_greedy(z: torch.Tensor, index: CodeIndex) -> torch.Tensor:
    """argmax of the materialised logits l = scatter_code_logits(z, M, b) without building them.

    z: code logits [..., K]. Returns int64 token ids [...]. Exactly ``torch.argmax(l, -1)``: the
    logits are formed in z's dtype (bias cast to it, as the scatter does); among equal maxima — within
    a code or across codes — the LOWEST token id wins (argmax returns the first maximal index).
    O(N·K·log n_max).
    """
    K = index.num_codes
    if z.shape[-1] != K:
        raise ValueError(f"z has {z.shape[-1]} codes, the index {K}")
    shape = z.shape[:-1]
    zf = z.detach().reshape(-1, K)
    if zf.shape[0] == 0:
        return torch.empty(shape, dtype=torch.int64, device=z.device)
    nonempty = index.counts > 0
    sb = None
    if index.has_bias:
        sb = index.sorted_bias.to(zf.dtype)
        best_per_code = zf + sb[index.offsets[:-1].clamp(max=index.num_tokens - 1)]
    else:
        best_per_code = zf
    best_per_code = best_per_code.masked_fill(~nonempty, float("-inf"))
    best = best_per_code.amax(-1)
    # Tokens of code k reaching the row max: a prefix of the bias-sorted list (all of it without bias).
    reach = _prefix_len(index, zf, sb, best, strict=False)
    cand = (best_per_code == best.unsqueeze(-1)) & nonempty & (reach > 0)
    last = (index.offsets[:-1] + reach - 1).clamp(min=0)
    ids = torch.where(cand, index.prefix_min_id[last], torch.full_like(last, index.vocab_size))
    return ids.amin(-1).view(shape)


@torch.no_grad()
def vq_sample(z: torch.Tensor, index: CodeIndex, *, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample token ids from softmax(l / T) with top-k then top-p filtering, l never materialised.

    z: code logits [..., K] (any float dtype; computed in float64). Returns int64 [...] on z's device.
    temperature 0 = greedy (:func:`vq_greedy`); top_k 0 = off; top_p 1.0 = off. See the module
    docstring for the exact filtering and tie rule. ``generator`` (on its own device) drives two
    uniforms per row: one picks the code by inverse CDF over the kept code masses, one the token inside
    the kept prefix of that code (uniform without a bias). Padded slots and empty codes have zero mass
    and are never drawn.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0.0:
        return vq_greedy(z, index)
    K = index.num_codes
    if z.shape[-1] != K:
        raise ValueError(f"z has {z.shape[-1]} codes, the index {K}")
    shape = z.shape[:-1]
    zd = z.detach().reshape(-1, K).double()
    N = zd.shape[0]
    if N == 0:
        return torch.empty(shape, dtype=torch.int64, device=z.device)
    counts, shift = _kept_counts(index, zd, temperature, int(top_k), float(top_p))
    G = index.cumulative_weights(temperature)
    mass = _code_masses(index, _code_scale(index, zd, shift, temperature), counts, G)   # [N, K]
    u = _uniforms(N, generator, zd.device)
    cdf = mass.cumsum(-1)
    code = torch.searchsorted(cdf, (u[:, 0] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    arange = torch.arange(K, device=zd.device)
    last_positive = torch.where(mass > 0, arange, torch.full_like(arange, -1)).amax(-1)
    code = torch.minimum(code, last_positive)  # u·total can round up to total
    c = counts.gather(1, code.unsqueeze(-1)).squeeze(-1)
    start = index.offsets[code]
    g_lo, g_hi = G[start], G[start + c]
    pos = torch.searchsorted(G[1:], g_lo + u[:, 1] * (g_hi - g_lo), right=True)
    pos = torch.minimum(torch.maximum(pos, start), start + c - 1)
    return index.tokens[pos].view(shape)


@torch.no_grad()
def vq_filtered_probs(z_row: torch.Tensor, index: CodeIndex, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact filtered distribution of one row, sparse: (token ids int64 [M], probs float64 [M]).

    Tokens are listed by (logit descending, token id ascending); probs sum to 1. Cost O(K·log n_max·64
    + M). temperature 0 returns the greedy token with probability 1. Meant for tests and inspection:
    :func:`vq_sample` draws from exactly this distribution without listing it.
    """
    check_sampling_args(temperature, top_k, top_p)
    K = index.num_codes
    zd = z_row.detach().reshape(1, K).double()
    if temperature == 0.0:
        tok = vq_greedy(z_row.reshape(1, K), index)
        return tok, torch.ones(1, dtype=torch.float64, device=tok.device)
    counts, _ = _kept_counts(index, zd, temperature, int(top_k), float(top_p))
    counts = counts[0]
    total = int(counts.sum())
    seg_start = torch.cumsum(counts, 0) - counts                        # start of each code in the output
    pos = torch.repeat_interleave(index.offsets[:-1] - seg_start, counts, output_size=total) + \
        torch.arange(total, device=zd.device)
    tokens = index.tokens[pos]
    logits = zd[0][index.codes[pos]] + index.bias64[pos]
    probs = torch.softmax((logits - logits.max()) / temperature, dim=0)
    order = torch.sort(tokens).indices
    order = order[torch.sort(logits[order], descending=True, stable=True).indices]
    return tokens[order], probs[order]
