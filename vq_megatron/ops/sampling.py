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
    """

    def __init__(self, *, num_codes, vocab_size, offsets, tokens, codes, sorted_bias, bias64, counts,
                 max_bias, min_bias, prefix_min_id, max_count):
        self.num_codes, self.vocab_size = num_codes, vocab_size
        self.offsets, self.tokens, self.codes = offsets, tokens, codes
        self.sorted_bias, self.bias64 = sorted_bias, bias64
        self.counts, self.max_bias, self.min_bias = counts, max_bias, min_bias
        self.prefix_min_id, self.max_count = prefix_min_id, max_count
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
        return cls(num_codes=num_codes, vocab_size=V, offsets=offsets, tokens=ids, codes=codes,
                   sorted_bias=sorted_bias, bias64=bias64, counts=counts, max_bias=max_bias,
                   min_bias=min_bias, prefix_min_id=prefix_min_id, max_count=int(counts.max()))

    def to(self, device) -> "CodeIndex":
        """A copy of the index on another device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CodeIndex(num_codes=self.num_codes, vocab_size=self.vocab_size, offsets=move(self.offsets),
                         tokens=move(self.tokens), codes=move(self.codes), sorted_bias=move(self.sorted_bias),
                         bias64=move(self.bias64), counts=move(self.counts), max_bias=move(self.max_bias),
                         min_bias=move(self.min_bias), prefix_min_id=move(self.prefix_min_id),
                         max_count=self.max_count)

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


def _search(z: torch.Tensor, sorted_bias: torch.Tensor, tau: torch.Tensor, strict: bool,
            lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """First position p in [lo, hi) (absolute, [N, K]) where z + b_p (>|>=) tau[n] fails.

    Each [lo, hi) lies in one code's bias-descending list, where the qualifying entries form a prefix
    (b -> z + b is monotone, also after rounding). The sum is evaluated in z's dtype exactly as the
    materialised logits are. Vectorised binary search; its step count is the bit length of the widest
    range (one host sync to read it).
    """
    t = tau.unsqueeze(-1)
    width = int((hi - lo).max()) if lo.numel() else 0
    last = sorted_bias.shape[0] - 1
    for _ in range(max(width, 0).bit_length()):
        active = lo < hi
        mid = (lo + hi) >> 1
        val = z + sorted_bias[mid.clamp(max=last)]
        ok = (val > t if strict else val >= t) & active
        lo = torch.where(ok, mid + 1, lo)
        hi = torch.where(active & ~ok, mid, hi)
    return lo


def _prefix_len(index: CodeIndex, z: torch.Tensor, sorted_bias: torch.Tensor | None, tau: torch.Tensor,
                strict: bool, low: torch.Tensor | None = None, high: torch.Tensor | None = None) -> torch.Tensor:
    """c[n, k] = #{tokens v of code k : z[n,k] + b_v (>|>=) tau[n]}, int64 [N, K]. Exact.

    ``low <= c <= high`` (when known) narrows the search. Without a bias all tokens of a code tie at
    z_k, so c is 0 or n_k. O(N·K·log(high - low)).
    """
    counts = index.counts
    if sorted_bias is None:
        t = tau.unsqueeze(-1)
        hit = z > t if strict else z >= t
        return torch.where(hit, counts, torch.zeros_like(counts))
    start = index.offsets[:-1]
    lo = (start + (0 if low is None else low)).expand_as(z)
    hi = (start + (counts if high is None else high)).expand_as(z)
    return _search(z, sorted_bias, tau, strict, lo, hi) - start


def _code_scale(index: CodeIndex, zd: torch.Tensor, shift: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp((z_k + maxb_k - shift_n) / T), float64 [N, K]; 0 for empty codes."""
    return torch.exp((zd + index.max_bias - shift.unsqueeze(-1)) / temperature)


def _code_masses(index: CodeIndex, scale: torch.Tensor, counts: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """[N, K]: Σ over the first counts[n,k] tokens of code k of exp((z_k + b_v - shift_n) / T)."""
    start = index.offsets[:-1]
    return scale * (G[start + counts] - G[start])


def _kth_largest(vals: torch.Tensor, mult: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r[n]-th largest value (counted with multiplicity ``mult``) of rows ``vals`` sorted descending."""
    idx = (mult.cumsum(-1) < r.unsqueeze(-1)).sum(-1).clamp(max=vals.shape[-1] - 1)
    return vals.gather(1, idx.unsqueeze(-1)).squeeze(-1)


def _smallest_light(vals: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest entry v of ``vals`` (rows sorted descending, -inf padding of weight 0) whose mass strictly
    above, base + Σ{weights of entries > v}, is < target. Returns (found [N] bool, v [N])."""
    N, M = vals.shape
    before = torch.cat([weights.new_zeros(N, 1), weights.cumsum(-1)[:, :-1]], dim=-1)
    idx = torch.arange(M, device=vals.device)
    new_run = torch.ones_like(vals, dtype=torch.bool)
    new_run[:, 1:] = vals[:, 1:] != vals[:, :-1]
    run_start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(-1).values
    above = base.unsqueeze(-1) + before.gather(1, run_start)                  # non-decreasing
    light = (above < target.unsqueeze(-1)) & (vals > float("-inf"))           # hence a prefix
    n = light.sum(-1)
    return n > 0, vals.gather(1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _endgame_size(index: CodeIndex) -> int:
    """Bisection stops once a row's bracket holds at most this many tokens; they are then listed
    (and sorted) in an [N, size] tensor: O(N·K) memory, capped where sorting costs more than bisecting."""
    return max(16, min(4 * index.num_codes, 1024))


_VALUE_STEPS = 32


def _bracket(index: CodeIndex, zd: torch.Tensor, lo, hi, c_lo, c_hi, strict: bool, goes_low, endgame: int):
    """Shrink the per-row key bracket [lo, hi] (float64 keys) by bisection, tracking the prefix counts
    at both ends (c_lo >= c_hi, so each count search only scans the window [c_hi, c_lo) of every code),
    until each row has converged (hi = lo + 1) or its window holds <= endgame tokens.
    goes_low(c_mid) -> bool [N]: mid becomes the new lo. The first _VALUE_STEPS steps split the value
    range in half (each roughly halves the window), later ones the key range (exact convergence in
    <= 64 more steps). One host sync per step.
    """
    start = index.offsets[:-1]
    for step in range(_VALUE_STEPS + 64):
        key_mid = _floor_mid(lo, hi)
        live = (key_mid != lo) & ((c_lo - c_hi).sum(-1) > endgame)
        if not bool(live.any()):
            break
        mid = key_mid
        if step < _VALUE_STEPS:
            value_mid = _to_key(_from_key(lo) * 0.5 + _from_key(hi) * 0.5)
            mid = torch.where((value_mid > lo) & (value_mid < hi), value_mid, key_mid)
        first = start + c_hi
        last = torch.where(live.unsqueeze(-1), start + c_lo, first)  # finished rows: nothing to scan
        c_mid = _search(zd, index.bias64, _from_key(mid), strict, first, last) - start
        low = live & goes_low(c_mid)
        high = live & ~low
        lo, c_lo = torch.where(low, mid, lo), torch.where(low.unsqueeze(-1), c_mid, c_lo)
        hi, c_hi = torch.where(high, mid, hi), torch.where(high.unsqueeze(-1), c_mid, c_hi)
    return lo, hi, c_lo, c_hi, _floor_mid(lo, hi) == lo


def _window_values(index: CodeIndex, zd: torch.Tensor, first: torch.Tensor, size: torch.Tensor, width: int
                   ) -> torch.Tensor:
    """Logits of the tokens at positions [first, first + size) of every code (row totals <= width),
    sorted descending into [N, width] with -inf padding."""
    N, K = zd.shape
    ends = size.cumsum(-1)
    slot = torch.arange(width, device=zd.device).expand(N, width).contiguous()
    code = torch.searchsorted(ends, slot, right=True).clamp(max=K - 1)
    pos = first.gather(1, code) + slot - (ends.gather(1, code) - size.gather(1, code))
    vals = zd.gather(1, code) + index.bias64[pos.clamp(0, index.num_tokens - 1)]
    vals = torch.where(slot < ends[:, -1:], vals, torch.full_like(vals, float("-inf")))
    return vals.sort(dim=-1, descending=True).values


def _candidate_shape(index: CodeIndex, top_k: int) -> tuple[int, int]:
    return min(top_k, index.num_codes), min(top_k, index.max_count)


def _use_candidates(index: CodeIndex, top_k: int) -> bool:
    """Small top-k: the first k tokens of the k best codes hold the threshold; used while that
    candidate tensor [N, min(k, K)·min(k, n_max)] stays O(N·K) (<= 4·N·K)."""
    codes, per_code = _candidate_shape(index, top_k)
    return codes * per_code <= 4 * index.num_codes


def _candidates(index: CodeIndex, zd: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits of the first min(k, n_c) tokens of the k codes with the largest best logit, sorted
    descending [N, M]. Every token whose logit exceeds the k-th largest logit tau_k is among them (its
    code's best beats all but < k codes' bests, and < k tokens of its code precede it), and so are >= k
    tokens >= tau_k: tau_k is the k-th candidate and every mass above a candidate value >= tau_k is a
    sum over candidates. Only tokens tied AT tau_k may be missing (counted exactly elsewhere)."""
    N = zd.shape[0]
    n_codes, per_code = _candidate_shape(index, top_k)
    neg_inf = torch.tensor(float("-inf"), dtype=zd.dtype, device=zd.device)
    code_best = torch.where(index.counts > 0, zd + index.max_bias, neg_inf)
    top_codes = code_best.topk(n_codes, dim=-1).indices                       # [N, n_codes]
    j = torch.arange(per_code, device=zd.device)
    valid = j < index.counts[top_codes].unsqueeze(-1)                          # [N, n_codes, per_code]
    pos = torch.where(valid, index.offsets[top_codes].unsqueeze(-1) + j, torch.zeros_like(j))
    cand = torch.where(valid, zd.gather(1, top_codes).unsqueeze(-1) + index.bias64[pos], neg_inf)
    return cand.reshape(N, -1).sort(dim=-1, descending=True).values


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


def _kept_counts_no_bias(index: CodeIndex, zd: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         shift: torch.Tensor) -> torch.Tensor:
    """Without a bias a code's tokens tie: the whole filter is a sort of the K code logits."""
    neg_inf = torch.full_like(zd, float("-inf"))
    vals, order = torch.where(index.counts > 0, zd, neg_inf).sort(dim=-1, descending=True)
    mult = index.counts[order]
    tau = torch.full_like(shift, float("-inf"))
    if 0 < top_k < index.num_tokens:
        tau = _kth_largest(vals, mult, torch.full_like(tau, top_k, dtype=torch.int64))
    if top_p < 1.0:
        inside = vals >= tau.unsqueeze(-1)
        weights = torch.where(inside, mult * torch.exp((vals - shift.unsqueeze(-1)) / temperature),
                              torch.zeros_like(vals))
        found, v = _smallest_light(torch.where(inside, vals, neg_inf), weights, torch.zeros_like(tau),
                                   top_p * weights.sum(-1))
        tau = torch.where(found, v, vals[:, 0])
    return _prefix_len(index, zd, None, tau, strict=False)


def _kept_counts(index: CodeIndex, zd: torch.Tensor, temperature: float, top_k: int, top_p: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, code) number of kept tokens after top-k then top-p, and each row's max logit (shift).

    The kept set of a row is {v : l_v >= tau}. With a bias, tau_k (k-th largest logit) is read off
    the candidates for a small k, otherwise bracketed by bisection over float64 keys (largest t with
    #{l >= t} >= k) and finished exactly by listing the <= 4K tokens left in the bracket; top-p then
    brackets the smallest t >= tau_k with mass{l > t} < top_p · mass{l >= tau_k} the same way.
    """
    R = index.num_tokens
    max_l, min_l = _row_range(index, zd)
    filter_k, filter_p = 0 < top_k < R, top_p < 1.0
    if not (filter_k or filter_p):
        return index.counts.expand_as(zd), max_l
    sb = index.bias64 if index.has_bias else None
    if top_p == 0.0:  # "at least one token": the top tie group
        return _prefix_len(index, zd, sb, max_l, strict=False), max_l
    if sb is None:
        return _kept_counts_no_bias(index, zd, temperature, top_k, top_p, max_l), max_l
    G = index.cumulative_weights(temperature)
    scale = _code_scale(index, zd, max_l, temperature)
    endgame = _endgame_size(index)
    zeros = torch.zeros_like(index.counts).expand_as(zd)
    if filter_k and _use_candidates(index, top_k):
        cand = _candidates(index, zd, top_k)
        tau = cand[:, top_k - 1]
        c_k = _prefix_len(index, zd, sb, tau, strict=False)
        if filter_p:
            inside = cand >= tau.unsqueeze(-1)
            weights = torch.where(inside, torch.exp((cand - max_l.unsqueeze(-1)) / temperature),
                                  torch.zeros_like(cand))
            target = top_p * _code_masses(index, scale, c_k, G).sum(-1)
            found, v = _smallest_light(torch.where(inside, cand, torch.full_like(cand, float("-inf"))),
                                       weights, torch.zeros_like(tau), target)
            tau = torch.where(found, v, cand[:, 0])
            c_k = _prefix_len(index, zd, sb, tau, strict=False, high=c_k)
        return c_k, max_l
    if filter_k:
        lo, hi, c_lo, c_hi, done = _bracket(
            index, zd, _to_key(min_l), _to_key(max_l) + 1, index.counts.expand_as(zd), zeros, False,
            lambda c: c.sum(-1) >= top_k, endgame)
        # bracket [lo, hi): c_lo - c_hi tokens with lo <= l < hi; tau_k is the (k - #{l >= hi})-th of them
        window = _window_values(index, zd, index.offsets[:-1] + c_hi,
                                torch.where(done.unsqueeze(-1), zeros, c_lo - c_hi), endgame)
        tau = torch.where(done, _from_key(lo),
                          _kth_largest(window, (window > float("-inf")).long(), top_k - c_hi.sum(-1)))
        c_k = _prefix_len(index, zd, sb, tau, strict=False, low=c_hi, high=c_lo)
    else:
        tau, c_k = min_l, index.counts.expand_as(zd)
    if not filter_p:
        return c_k, max_l
    target = top_p * _code_masses(index, scale, c_k, G).sum(-1)
    # P(t) = mass{l > t} < target: false just below tau_k (c_gt = c_k), true at max_l (p > 0).
    lo, hi, c_lo, c_hi, done = _bracket(
        index, zd, _to_key(tau) - 1, _to_key(max_l), c_k, zeros, True,
        lambda c: _code_masses(index, scale, c, G).sum(-1) >= target, endgame)
    # bracket (lo, hi]: c_lo - c_hi tokens with lo < l <= hi; the answer is the smallest light one,
    # else hi itself ({l >= hi} is then exactly the kept set).
    window = _window_values(index, zd, index.offsets[:-1] + c_hi,
                            torch.where(done.unsqueeze(-1), zeros, c_lo - c_hi), endgame)
    found, v = _smallest_light(window, torch.exp((window - max_l.unsqueeze(-1)) / temperature),
                               _code_masses(index, scale, c_hi, G).sum(-1), target)
    tau = torch.where(found & ~done, v, _from_key(hi))
    return _prefix_len(index, zd, sb, tau, strict=False, low=c_hi, high=c_lo), max_l


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
