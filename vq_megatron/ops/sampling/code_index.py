"""CodeIndex: the tokens of a VQ map grouped by code and sorted by bias, built once per map (and bias).

Sorted in descending order, the logits of one code k are the code's biases, sorted descending, shifted by
z_k: every filter of the sampler (ops/sampling/vq.py) works on this index and the code logits, never on
the [N, V] logits.
"""

from __future__ import annotations

import torch

from vq_megatron.checks import check_map
from vq_megatron.ops.clusters import CodeMembers

__all__ = ["CodeIndex"]


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
        check_map(codes, num_codes, context="real entries of the map")
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

    @property
    def members(self) -> CodeMembers:
        """The same grouping as a CodeMembers (within a code: bias descending rather than id order)."""
        return CodeMembers(offsets=self.offsets, tokens=self.tokens)

    def __repr__(self) -> str:
        return (f"CodeIndex(num_codes={self.num_codes}, vocab_size={self.vocab_size}, "
                f"real_tokens={self.num_tokens}, max_count={self.max_count}, bias={self.has_bias})")
