"""Exact sampling from the VQ softmax without building the [N, V] vocabulary logits.

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
  code is a prefix of its bias-sorted token list. That is what makes the exact filtered distribution
  cheap: tau is found by bisection over the float64 bit patterns (<= 64 steps), each step counting /
  weighing the per-code prefixes by a vectorised binary search (O(K log n_max) per row, n_max the
  largest code). Sampling then draws a code ∝ exp(z_k / T)·(kept mass of the code) and a token
  within the kept prefix of that code ∝ exp(b_v / T) by inverse CDF.
* greedy: :func:`vq_greedy` returns exactly ``torch.argmax`` of the materialised logits
  (``scatter_code_logits(z, M, b)`` in z's dtype): the largest logit, ties broken by the LOWEST token
  id, across codes as well as within a code.

Ordering and masses are computed in float64 from z and b (l_v = float64(z_k) + float64(b_v)); the
reference in tests/unit/test_sampling.py materialises the logits in float64 the same way. Logits are
assumed finite (no NaN / +inf).

Complexity: CodeIndex.build O(V log V) once; per call O(V) once per new temperature (cached
cumulative within-code weights); per row O(K) without filtering (plus O(log V) for the token draw), and
O(64 · K · log n_max) with top-k / top-p, independent of how many tokens the filter keeps. No tensor
larger than O(N·K + V) is created. Everything is vectorised over rows (no per-row Python loop) and
runs on the input tensors' device.
"""

from __future__ import annotations

import torch

__all__ = [
    "CodeIndex", "vq_sample", "vq_greedy", "vq_filtered_probs",
    "tensor_parallel_code_index", "vq_sample_tensor_parallel",
]

_SIGN_MASK = 0x7FFFFFFFFFFFFFFF  # flips every bit but the sign: float64 bits -> totally ordered int64


# --------------------------------------------------------------------------------------------- index
class CodeIndex:
    """Tokens grouped by code, precomputed once per map (and bias).

    Attributes (all on the map's device):
        num_codes: K.
        vocab_size: length of the map (padded slots included).
        offsets: int64 [K+1]; the tokens of code k are tokens[offsets[k]:offsets[k+1]].
        tokens: int64 [R] real token ids sorted by (code asc, bias desc, token id asc).
        codes: int64 [R] code of each entry of ``tokens``.
        sorted_bias: bias of each entry of ``tokens`` in the bias' own dtype, or None without a bias.
        bias64: float64 [R] the same (zeros without a bias).
        counts: int64 [K] n_k (0 for an empty code).
        max_bias / min_bias: float64 [K] per-code max / min bias (-inf / +inf for an empty code).
        log_mass: float64 [K] B_k = log Σ_{v∈k} exp(b_v) (log n_k without bias; -inf for empty codes).
        prefix_min_id: int64 [R] smallest token id in tokens[offsets[k] : i+1] (code k of entry i).
        max_count: Python int, the largest n_k.
        unique_bias: float64 [U] the distinct bias values, ascending (None without a bias).
        search_key: int64 [R] code·U + (U-1-rank of the bias among unique_bias): non-decreasing along
            ``tokens``, so "how many tokens of code k have b >= x" is two 1-D searchsorted calls.
    """

    def __init__(self, *, num_codes, vocab_size, offsets, tokens, codes, sorted_bias, bias64, counts,
                 max_bias, min_bias, prefix_min_id, max_count, unique_bias=None, search_key=None):
        self.num_codes, self.vocab_size = num_codes, vocab_size
        self.offsets, self.tokens, self.codes = offsets, tokens, codes
        self.sorted_bias, self.bias64 = sorted_bias, bias64
        self.counts, self.max_bias, self.min_bias = counts, max_bias, min_bias
        self.prefix_min_id, self.max_count = prefix_min_id, max_count
        self.unique_bias, self.search_key = unique_bias, search_key
        self._weights_cache: dict[float, torch.Tensor] = {}
        self.log_mass = self.log_mass_at(1.0)

    @property
    def has_bias(self) -> bool:
        return self.sorted_bias is not None

    @property
    def num_tokens(self) -> int:
        """R: number of real (non-padded) tokens."""
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @classmethod
    @torch.no_grad()
    def build(cls, token_to_code: torch.Tensor, num_codes: int, bias: torch.Tensor | None = None) -> "CodeIndex":
        """Group the tokens of ``token_to_code`` [V] (entries < 0 = padding) by code; O(V log V).

        ``bias`` [V] (same length as the map, padded slots ignored) or None.
        """
        m = token_to_code.reshape(-1).long()
        if bias is not None and bias.reshape(-1).shape[0] != m.shape[0]:
            raise ValueError(f"bias has {bias.numel()} entries, token_to_code has {m.shape[0]}")
        ids = torch.nonzero(m >= 0).squeeze(1)  # ascending token ids
        if ids.numel() == 0:
            raise ValueError("token_to_code has no real (non-negative) entries")
        codes = m[ids]
        if int(codes.max()) >= num_codes:
            raise ValueError(f"token_to_code has code {int(codes.max())} >= num_codes={num_codes}")
        sorted_bias = None
        if bias is not None:
            b = bias.detach().reshape(-1).to(m.device)[ids]
            order = torch.sort(b, descending=True, stable=True).indices  # bias desc, id asc on ties
            ids, codes, b = ids[order], codes[order], b[order]
        order = torch.sort(codes, stable=True).indices                   # then group by code
        ids, codes = ids[order], codes[order]
        if bias is not None:
            sorted_bias = b[order]
            bias64 = sorted_bias.double()
        else:
            bias64 = torch.zeros(ids.shape[0], dtype=torch.float64, device=m.device)
        counts = torch.bincount(codes, minlength=num_codes)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        R = ids.shape[0]
        nonempty = counts > 0
        first = offsets[:-1].clamp(max=R - 1)
        last = (offsets[1:] - 1).clamp(min=0)
        max_bias = torch.where(nonempty, bias64[first], torch.full_like(bias64[first], float("-inf")))
        min_bias = torch.where(nonempty, bias64[last], torch.full_like(bias64[last], float("inf")))
        # Segmented prefix-min of ids: earlier codes get larger keys so a global cummin never sees them.
        V = m.shape[0]
        rank_key = (num_codes - 1 - codes) * V
        prefix_min_id = torch.cummin(rank_key + ids, dim=0).values - rank_key
        unique_bias = search_key = None
        if bias is not None:
            unique_bias = torch.unique(bias64)  # sorted ascending
            U = unique_bias.shape[0]
            search_key = codes * U + (U - 1 - torch.searchsorted(unique_bias, bias64))
        return cls(num_codes=num_codes, vocab_size=V, offsets=offsets, tokens=ids, codes=codes,
                   sorted_bias=sorted_bias, bias64=bias64, counts=counts, max_bias=max_bias,
                   min_bias=min_bias, prefix_min_id=prefix_min_id, max_count=int(counts.max()),
                   unique_bias=unique_bias, search_key=search_key)

    def to(self, device) -> "CodeIndex":
        """A copy of the index on another device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CodeIndex(num_codes=self.num_codes, vocab_size=self.vocab_size, offsets=move(self.offsets),
                         tokens=move(self.tokens), codes=move(self.codes), sorted_bias=move(self.sorted_bias),
                         bias64=move(self.bias64), counts=move(self.counts), max_bias=move(self.max_bias),
                         min_bias=move(self.min_bias), prefix_min_id=move(self.prefix_min_id),
                         max_count=self.max_count, unique_bias=move(self.unique_bias),
                         search_key=move(self.search_key))

    def cumulative_weights(self, temperature: float) -> torch.Tensor:
        """G [R+1] float64: G[i] = Σ_{j<i} exp((b_j - maxb_{code(j)}) / T); O(R), cached per T.

        The kept mass of code k with its first c tokens is exp(maxb_k / T)·(G[offsets[k]+c] - G[offsets[k]]).
        Every term is <= 1 and every non-empty code contributes >= 1, so the differences are accurate.
        """
        key = float(temperature)
        G = self._weights_cache.get(key)
        if G is None:
            if self.has_bias:
                w = torch.exp((self.bias64 - self.max_bias[self.codes]) / key)
            else:
                w = torch.ones_like(self.bias64)
            G = torch.cat([w.new_zeros(1), w.cumsum(0)])
            if len(self._weights_cache) >= 8:
                self._weights_cache.pop(next(iter(self._weights_cache)))
            self._weights_cache[key] = G
        return G

    def log_mass_at(self, temperature: float) -> torch.Tensor:
        """B_k(T) = log Σ_{v∈k} exp(b_v / T) float64 [K]; -inf for empty codes (log n_k without bias)."""
        if not self.has_bias:
            return torch.log(self.counts.double())
        w = torch.exp((self.bias64 - self.max_bias[self.codes]) / temperature)
        seg = torch.zeros(self.num_codes, dtype=torch.float64, device=self.device).index_add(0, self.codes, w)
        return torch.log(seg) + self.max_bias / temperature

    def __repr__(self) -> str:
        return (f"CodeIndex(num_codes={self.num_codes}, vocab_size={self.vocab_size}, "
                f"real_tokens={self.num_tokens}, max_count={self.max_count}, bias={self.has_bias})")


# --------------------------------------------------------------------------------------------- helpers
def _to_key(x: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 with the same order (-0.0 sorts just below +0.0)."""
    bits = x.contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ _SIGN_MASK, bits)


def _from_key(k: torch.Tensor) -> torch.Tensor:
    return torch.where(k < 0, k ^ _SIGN_MASK, k).contiguous().view(torch.float64)


def _floor_mid(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """floor((lo + hi) / 2) for int64 without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def _prefix_len(index: CodeIndex, z: torch.Tensor, sorted_bias: torch.Tensor | None, tau: torch.Tensor,
                strict: bool) -> torch.Tensor:
    """c[n, k] = #{tokens v of code k : z[n,k] + b_v (>|>=) tau[n]}, int64 [N, K].

    The sum is evaluated in z's dtype exactly as the materialised logits are (bias cast to that dtype);
    it is monotone in b_v, so the qualifying tokens form a prefix of the code's bias-sorted list, found
    by a binary search vectorised over all (row, code) pairs: O(N·K·log n_max), no data-dependent sync.
    """
    t = tau.unsqueeze(-1)
    counts = index.counts
    if sorted_bias is None:  # all tokens of a code tie at z_k
        hit = z > t if strict else z >= t
        return torch.where(hit, counts, torch.zeros_like(counts))
    start = index.offsets[:-1]
    lo = start.expand_as(z).clone()
    hi = (start + counts).expand_as(z).clone()
    last = sorted_bias.shape[0] - 1
    for _ in range(index.max_count.bit_length()):
        active = lo < hi
        mid = (lo + hi) >> 1
        val = z + sorted_bias[mid.clamp(max=last)]
        ok = (val > t if strict else val >= t) & active
        lo = torch.where(ok, mid + 1, lo)
        hi = torch.where(active & ~ok, mid, hi)
    return lo - start


def _count(index: CodeIndex, zd: torch.Tensor, tau: torch.Tensor, strict: bool) -> torch.Tensor:
    """float64 prefix lengths: #{v in code k : zd[n,k] + b_v (>|>=) tau[n]}, int64 [N, K]. Exact.

    Fast path: x = tau - z_k (rounded), count b >= x with two 1-D searchsorted calls on the index's
    composite key, then verify the boundary against the exact float64 sums (the prefix property makes
    two checks per (row, code) sufficient). Only if rounding of x misplaced a boundary somewhere (data
    values within an ulp of the threshold) is the exact binary search (:func:`_prefix_len`) run.
    """
    if not index.has_bias:
        return _prefix_len(index, zd, None, tau, strict)
    t = tau.unsqueeze(-1)
    if strict:  # fl(z + b) > t  <=>  fl(z + b) >= nextafter(t, +inf)
        t = torch.nextafter(t, torch.full_like(t, float("inf")))
    U = index.unique_bias.shape[0]
    below = torch.searchsorted(index.unique_bias, (t - zd).contiguous())        # distinct values < x
    code_ids = torch.arange(index.num_codes, device=zd.device)
    end = torch.searchsorted(index.search_key, code_ids * U + (U - 1 - below), right=True)
    start, R = index.offsets[:-1], index.num_tokens
    count = end - start
    inside_ok = (count == 0) | (zd + index.bias64[(end - 1).clamp(min=0)] >= t)
    outside_ok = (count == index.counts) | (zd + index.bias64[end.clamp(max=R - 1)] < t)
    if bool((inside_ok & outside_ok).all()):
        return count
    return _prefix_len(index, zd, index.bias64, tau, strict)


def _kept_mass(index: CodeIndex, zd: torch.Tensor, counts: torch.Tensor, G: torch.Tensor,
               shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, K] float64: Σ over the first counts[n,k] tokens of code k of exp((z_k + b_v - shift_n) / T)."""
    start = index.offsets[:-1]
    seg = G[start + counts] - G[start]
    return torch.exp((zd + index.max_bias - shift.unsqueeze(-1)) / temperature) * seg


def _bisect(lo: torch.Tensor, hi: torch.Tensor, pred, *, want_max_true: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bisection over float64 keys (int64, see _to_key), vectorised over rows; <= 64 steps.

    want_max_true: pred true at lo, false at hi (monotone) -> lo ends at the largest true key.
    otherwise:     pred false at lo, true at hi               -> hi ends at the smallest true key.
    """
    check_every = 8 if lo.is_cuda else 1  # a convergence check is a host sync on GPUs
    for step in range(64):
        mid = _floor_mid(lo, hi)
        if step % check_every == 0 and bool((mid == lo).all()):
            break
        ok = pred(_from_key(mid))
        if want_max_true:
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        else:
            lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    return lo, hi


def _check_args(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature >= 0.0) or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not (0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be in [0, 1] (1 = off), got {top_p}")


def _row_range(index: CodeIndex, zd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and smallest real logit of every row (float64 [N])."""
    nonempty = index.counts > 0
    hi = torch.where(nonempty, zd + index.max_bias, torch.full_like(zd, float("-inf"))).amax(-1)
    lo = torch.where(nonempty, zd + index.min_bias, torch.full_like(zd, float("inf"))).amin(-1)
    return hi, lo


def _candidate_shape(index: CodeIndex, top_k: int) -> tuple[int, int]:
    return min(top_k, index.num_codes), min(top_k, index.max_count)


def _use_candidates(index: CodeIndex, top_k: int) -> bool:
    """Small top-k: the first k tokens of the k best codes hold the threshold; used while that
    candidate tensor [N, min(k, K)·min(k, n_max)] stays O(N·K) (<= 4·N·K)."""
    codes, per_code = _candidate_shape(index, top_k)
    return codes * per_code <= 4 * index.num_codes


def _candidate_threshold(index: CodeIndex, zd: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         max_l: torch.Tensor) -> torch.Tensor:
    """tau for top-k (then top-p) from candidates: the first min(k, n_c) tokens of the k codes with the
    largest best logit. Every token with a logit above the k-th largest logit tau_k is a candidate (its
    code's best logit beats all but < k codes' and it is among its code's first k), so tau_k is the k-th
    largest candidate and the top-p masses above any candidate value >= tau_k are sums over candidates;
    only the tokens tied AT tau_k may lie outside, and they are counted exactly (_count).
    """
    N = zd.shape[0]
    n_codes, per_code = _candidate_shape(index, top_k)
    neg_inf = torch.tensor(float("-inf"), dtype=zd.dtype, device=zd.device)
    code_best = torch.where(index.counts > 0, zd + index.max_bias, neg_inf)
    top_codes = code_best.topk(n_codes, dim=-1).indices                       # [N, n_codes]
    j = torch.arange(per_code, device=zd.device)
    valid = j < index.counts[top_codes].unsqueeze(-1)                          # [N, n_codes, per_code]
    pos = torch.where(valid, index.offsets[top_codes].unsqueeze(-1) + j, torch.zeros_like(j))
    cand = torch.where(valid, zd.gather(1, top_codes).unsqueeze(-1) + index.bias64[pos], neg_inf)
    vals = cand.reshape(N, -1).sort(dim=-1, descending=True).values
    tau_k = vals[:, top_k - 1]
    if top_p >= 1.0:
        return tau_k
    w = torch.exp((vals - max_l.unsqueeze(-1)) / temperature)                 # -inf -> 0
    excl = torch.cat([w.new_zeros(N, 1), w.cumsum(-1)[:, :-1]], dim=-1)       # mass before each slot
    idx = torch.arange(vals.shape[1], device=zd.device)
    new_run = torch.cat([torch.ones_like(vals[:, :1], dtype=torch.bool), vals[:, 1:] != vals[:, :-1]], -1)
    run_start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(-1).values
    mass_gt = excl.gather(1, run_start)                                        # mass strictly above
    n_at_tau = (_count(index, zd, tau_k, strict=False) - _count(index, zd, tau_k, strict=True)).sum(-1)
    total = (w * (vals > tau_k.unsqueeze(-1))).sum(-1) + \
        n_at_tau.to(zd.dtype) * torch.exp((tau_k - max_l) / temperature)
    keep = (mass_gt < top_p * total.unsqueeze(-1)) & (vals >= tau_k.unsqueeze(-1))  # a prefix
    last = (keep.sum(-1) - 1).clamp(min=0)
    return vals.gather(1, last.unsqueeze(-1)).squeeze(-1)


def _kept_counts(index: CodeIndex, zd: torch.Tensor, temperature: float, top_k: int, top_p: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, code) number of kept tokens after top-k / top-p, and the row's max logit (shift).

    The kept set of each row is {v : l_v >= tau}. tau comes from the candidate set for a small top-k,
    otherwise from bisection over float64 keys: the k-th largest logit (largest t with
    #{l >= t} >= k), then the smallest t >= it with mass{l > t} < top_p · mass{l >= tau_k}.
    """
    R = index.num_tokens
    max_l, min_l = _row_range(index, zd)
    filter_k = 0 < top_k < R
    filter_p = top_p < 1.0
    if not (filter_k or filter_p):
        return index.counts.expand_as(zd), max_l
    if filter_k and _use_candidates(index, top_k):
        tau = _candidate_threshold(index, zd, temperature, top_k, top_p, max_l)
        return _count(index, zd, tau, strict=False), max_l
    tau = min_l
    if filter_k:
        def enough(t):  # at least k tokens with logit >= t
            return _count(index, zd, t, strict=False).sum(-1) >= top_k
        lo, _ = _bisect(_to_key(min_l), _to_key(max_l) + 1, enough, want_max_true=True)
        tau = _from_key(lo)  # the k-th largest logit
    if filter_p:
        G = index.cumulative_weights(temperature)
        target = top_p * _kept_mass(index, zd, _count(index, zd, tau, strict=False), G, max_l,
                                    temperature).sum(-1)

        def light(t):  # mass strictly above t is < top_p of the (top-k) kept mass
            return _kept_mass(index, zd, _count(index, zd, t, strict=True), G, max_l,
                              temperature).sum(-1) < target
        _, hi = _bisect(_to_key(tau) - 1, _to_key(max_l), light, want_max_true=False)
        tau = torch.maximum(tau, _from_key(hi))
    return _count(index, zd, tau, strict=False), max_l


def _uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, 2, generator=generator, dtype=torch.float64, device=gen_device).to(device)


# --------------------------------------------------------------------------------------------- API
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
    _check_args(temperature, top_k, top_p)
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
    mass = _kept_mass(index, zd, counts, G, shift, temperature)        # [N, K]
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
    _check_args(temperature, top_k, top_p)
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


# --------------------------------------------------------------------------------------------- TP
@torch.no_grad()
def tensor_parallel_code_index(layer) -> CodeIndex:
    """The CodeIndex of a VQOutputLayer's full map and bias (collective over the layer's TP group).

    Built from the replicated ``layer.global_token_to_code`` and, with a bias, the vocab-sharded bias
    all-gathered once ([V_pad/T] per rank -> [V_pad], cut to V). Cached on the layer: reused while the
    replicated map and this rank's bias shard are unchanged (exact comparison with cached copies,
    O(V) per call); the "stale" flag is all-reduced (MAX) over TP so every rank takes the same branch
    of the collective. The index is built on every TP rank (replicated work, no extra communication).
    """
    import torch.distributed as dist

    from vq_megatron.parallel import all_gather_rows

    tp = layer.tp
    full_map = layer.global_token_to_code
    shard = None if layer.bias is None else layer.bias.detach()
    cache = getattr(layer, "_vq_sampling_cache", None)
    stale = (cache is None or cache[0].device != full_map.device or cache[0].shape != full_map.shape
             or not torch.equal(cache[0], full_map)
             or (cache[1] is None) != (shard is None)
             or (shard is not None and (cache[1].shape != shard.shape or not torch.equal(cache[1], shard))))
    if tp.size > 1:
        flag = torch.tensor([int(stale)], dtype=torch.int64, device=full_map.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=tp.group)
        stale = bool(flag.item())
    if stale:
        full_bias = None
        if shard is not None:
            full_bias = all_gather_rows(shard, tp.group)[: layer.vocab_size]
        index = CodeIndex.build(full_map, layer.num_codes, full_bias)
        layer._vq_sampling_cache = (full_map.clone(), None if shard is None else shard.clone(), index)
    return layer._vq_sampling_cache[2]


@torch.no_grad()
def vq_sample_tensor_parallel(layer, hidden: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                              top_p: float = 1.0, generator: torch.Generator | None = None,
                              greedy: bool = False) -> torch.Tensor:
    """Sample (or greedy-decode) token ids from a VQOutputLayer, tensor-parallel aware.

    hidden: [..., d] final hidden states, identical on every TP rank (with ``layer.sequence_parallel``
    the local sequence chunk [s/T, ...], gathered here along dim 0). TP rank 0 computes z = h·Cᵀ and
    draws with ``generator`` (only rank 0's generator advances); the int64 ids [...] are broadcast so
    every TP rank returns the same tokens. Collective when layer.tp.size > 1 (all TP ranks must call).
    greedy=True (or temperature 0) gives argmax of the materialised logits (:func:`vq_greedy`).
    """
    from vq_megatron.ops.scatter import code_logits
    from vq_megatron.parallel import all_gather_rows, broadcast_from_first_rank

    _check_args(temperature, top_k, top_p)
    tp = layer.tp
    if layer.sequence_parallel and tp.size > 1:
        hidden = all_gather_rows(hidden.detach(), tp.group)
    index = tensor_parallel_code_index(layer)
    shape = hidden.shape[:-1]
    if tp.rank == 0:
        z = code_logits(hidden.detach(), layer.codebook.detach())
        if greedy or temperature == 0.0:
            tokens = vq_greedy(z, index)
        else:
            tokens = vq_sample(z, index, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
    else:
        tokens = torch.empty(shape, dtype=torch.int64, device=hidden.device)
    if tp.size > 1:
        tokens = broadcast_from_first_rank(tokens.contiguous(), tp.group)
    return tokens
