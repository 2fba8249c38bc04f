"""Exact top-k / top-p thresholds over the VQ logits l_v = z_{M(v)} + b_v without listing them.

Both filters keep a threshold set {v : l_v >= tau} for a per-row tau, which within every code is a prefix
of its bias-sorted token list (CodeIndex). tau is found by the paths described in ops/sampling/vq.py: a
sort of the K code logits without a bias, a candidate set for a small top-k, otherwise bisection over the
float64 bit patterns finished by listing the few tokens left in the bracket.
"""

from __future__ import annotations

import torch

from vq_megatron.ops.sampling.code_index import CodeIndex

_SIGN_MASK = 0x7FFFFFFFFFFFFFFF  # flips every bit but the sign: float64 bits -> totally ordered int64


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
