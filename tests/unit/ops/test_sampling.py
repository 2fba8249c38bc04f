"""Exact VQ sampling (vq_megatron.ops.sampling) vs the materialised vocabulary logits.

The reference below materialises l = scatter_code_logits(z, M, b) in float64 and applies the filtering
rule by brute force, straight from its definition (see the sampling module docstring):
  top-k keeps v iff #{u : l_u > l_v} < k;  top-p keeps v iff Σ_{u kept, l_u > l_v} p_u < top_p,
with p the renormalised top-k distribution; output ordered by (-logit, token id).
"""

import itertools
import math

import pytest
import torch

from vq_megatron.ops.sampling import threshold as sampling
from vq_megatron.ops.clusters import code_log_mass
from vq_megatron.ops.sampling import CodeIndex, vq_filtered_probs, vq_greedy, vq_sample
from vq_megatron.ops.scatter import scatter_code_logits
from tensor_probe import LargestOutput


# ----------------------------------------------------------------------------------------- reference
def materialise(z, m, b):
    """float64 vocab logits [..., V]; padded slots (map < 0) are -inf."""
    return scatter_code_logits(z.double(), m, None if b is None else b.double())


def reference_filtered_probs(logits, temperature, top_k, top_p):
    """Exact filtered distribution of one materialised row: (token ids, probs) by (-logit, token id)."""
    logits = logits.double()
    ids = torch.nonzero(torch.isfinite(logits)).squeeze(1)
    l = logits[ids]
    keep = torch.ones_like(l, dtype=torch.bool)
    if top_k > 0:
        keep &= (l.unsqueeze(0) > l.unsqueeze(1)).sum(1) < top_k
    ids, l = ids[keep], l[keep]
    p = torch.softmax(l / temperature, 0)
    if top_p < 1.0:
        mass_above = ((l.unsqueeze(0) > l.unsqueeze(1)) * p.unsqueeze(0)).sum(1)
        keep = mass_above < top_p
        ids, l = ids[keep], l[keep]
        p = torch.softmax(l / temperature, 0)
    order = torch.sort(l, descending=True, stable=True).indices  # ids ascending already: ties by id
    return ids[order], p[order]


# ----------------------------------------------------------------------------------------- inputs
def make_case(V, K, *, bias, empty=0, pad=0, ties=False, seed=0):
    """Map [V] (last `empty` codes unused, `pad` random slots = -1), bias or None, code logits [3, K]."""
    g = torch.Generator().manual_seed(seed)
    used = K - empty
    m = torch.randint(0, used, (V,), generator=g)
    m[:used] = torch.randperm(used, generator=g)[: min(V, used)]
    if pad:
        m[torch.randperm(V, generator=g)[:pad]] = -1
    if ties:  # small integers: exact ties within and across codes
        b = torch.randint(-2, 3, (V,), generator=g).float() if bias else None
        z = torch.randint(-2, 3, (3, K), generator=g).float()
    else:
        b = torch.randn(V, generator=g) if bias else None
        z = 1.5 * torch.randn(3, K, generator=g)
    z[:, used:] = 50.0  # empty codes get the largest code logits: they must still never be drawn
    return m, b, z


CASES = [  # V, K, bias, empty, pad, ties
    (37, 5, True, 0, 0, False), (37, 5, False, 0, 0, False), (1, 1, True, 0, 0, False),
    (41, 1, True, 0, 3, False), (41, 1, False, 0, 0, False), (29, 29, True, 0, 0, False),
    (29, 29, False, 0, 0, False), (103, 9, True, 3, 5, False), (103, 9, False, 3, 5, False),
    (64, 7, True, 2, 0, True), (64, 7, False, 0, 4, True), (50, 50, True, 0, 0, True),
]


PATHS = ["auto", "bisection", "bisection-only", "candidates"]


def force_path(monkeypatch, path):
    """Threshold search with a bias: 'auto', or force one implementation: top-k from the candidate
    set, or bisection finished by listing the bracket ('bisection') / run to convergence."""
    if path != "auto":
        monkeypatch.setattr(sampling, "_use_candidates", lambda index, top_k: path == "candidates")
    if path == "bisection-only":
        monkeypatch.setattr(sampling, "_endgame_size", lambda index: 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("V,K,bias,empty,pad,ties", CASES)
def test_filtered_probs_match_materialised_reference(V, K, bias, empty, pad, ties, path, monkeypatch):
    force_path(monkeypatch, path)
    m, b, z = make_case(V, K, bias=bias, empty=empty, pad=pad, ties=ties, seed=V * 7 + K)
    index = CodeIndex.build(m, K, b)
    logits = materialise(z, m, b)
    for row, T, k, p in itertools.product(range(2), (0.5, 1.0, 2.0), (0, 1, 3, 50), (1.0, 0.9, 0.3)):
        tok, prob = vq_filtered_probs(z[row], index, T, k, p)
        ref_tok, ref_prob = reference_filtered_probs(logits[row], T, k, p)
        where = f"row={row} T={T} top_k={k} top_p={p}"
        assert torch.equal(tok, ref_tok), where
        assert torch.allclose(prob, ref_prob, rtol=0, atol=1e-6), where
        assert abs(float(prob.sum()) - 1.0) < 1e-9


def conventional_filter(logits, temperature, top_k, top_p):
    """The usual sort-based filter, as megatron-core's TorchSampling._modify_logits_for_top_{k,p}_filtering
    (top-k: drop logits < the k-th largest; top-p: sort, cumsum of softmax, drop a token once the mass
    before it exceeds top_p). Returns filtered logits (-inf outside)."""
    logits = logits / temperature
    if top_k > 0:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before > top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (40, 1.0), (0, 0.9), (0, 0.5), (30, 0.8)])
def test_rule_equals_conventional_filter_without_ties(top_k, top_p):
    """Tie-free logits: the rule coincides with the conventional sort-based top-k / top-p filter."""
    m, b, z = make_case(211, 13, bias=True, seed=3)
    index = CodeIndex.build(m, 13, b)
    logits = materialise(z, m, b)
    for row in range(3):
        filtered = conventional_filter(logits[row], 0.8, top_k, top_p)
        kept = torch.nonzero(torch.isfinite(filtered)).squeeze(1)
        tok, prob = vq_filtered_probs(z[row], index, 0.8, top_k, top_p)
        assert torch.equal(torch.sort(tok).values, kept)
        assert torch.allclose(prob, torch.softmax(filtered, 0)[tok], rtol=0, atol=1e-9)


def test_code_index_layout_and_log_mass():
    m, b, _ = make_case(103, 9, bias=True, empty=2, pad=5, seed=1)
    index = CodeIndex.build(m, 9, b)
    assert index.num_tokens == int((m >= 0).sum()) and int(index.offsets[-1]) == index.num_tokens
    assert torch.equal(index.counts, torch.bincount(m[m >= 0], minlength=9))
    for k in range(9):
        seg = index.tokens[index.offsets[k]: index.offsets[k + 1]]
        assert bool((m[seg] == k).all())
        key = sorted(seg.tolist(), key=lambda v: (-float(b[v]), v))
        assert seg.tolist() == key
    assert torch.allclose(index.log_mass, code_log_mass(m, 9, b.double()), atol=1e-12)
    assert torch.allclose(CodeIndex.build(m, 9).log_mass, code_log_mass(m, 9))
    for T in (0.5, 2.0):
        assert torch.allclose(index.log_mass_at(T), code_log_mass(m, 9, b.double() / T), atol=1e-12)


def test_search_paths_draw_identical_samples(monkeypatch):
    m, b, z = make_case(103, 9, bias=True, empty=1, pad=4, seed=8)
    index = CodeIndex.build(m, 9, b)
    zz = z.repeat_interleave(50, 0)
    for k, p in ((1, 1.0), (3, 1.0), (3, 0.6), (12, 0.9)):
        draws = []
        for path in PATHS:
            force_path(monkeypatch, path)
            draws.append(vq_sample(zz, index, temperature=0.8, top_k=k, top_p=p,
                                   generator=torch.Generator().manual_seed(1)))
        monkeypatch.undo()
        for other in draws[1:]:
            assert torch.equal(draws[0], other), (k, p)


def test_counts_are_exact_when_thresholds_round():
    """b -> fl(z + b) merges many distinct biases into one double: counts follow the rounded sums."""
    K = 3
    tiny = torch.tensor([3e-17, 1e-17, 5.551115123125783e-17, -1e-17, -5.551115123125783e-17, -6e-17,
                         2.220446049250313e-16, -1.1102230246251565e-16, 0.0, 1e-300, -1e-300], dtype=torch.float64)
    V = tiny.numel() * K
    m = torch.arange(V) % K
    b = torch.cat([tiny, tiny * 3, tiny / 2])
    index = CodeIndex.build(m, K, b)
    z = torch.tensor([[1.0, 1.0, 0.5], [1.0, 2.0, 1.0 - 2 ** -53], [0.0, 1.0, 1.0]], dtype=torch.float64)
    logits = materialise(z, m, b)
    for tau_value in (1.0, 1.0 + 2 ** -52, 1.0 - 2 ** -53, 0.5, 2.0, 0.0, 1e-300):
        tau = torch.full((3,), tau_value, dtype=torch.float64)
        for strict in (False, True):
            hit = logits > tau_value if strict else logits >= tau_value
            expected = torch.stack([torch.bincount(m[hit[r]], minlength=K) for r in range(3)])
            assert torch.equal(sampling._prefix_len(index, z, index.bias64, tau, strict), expected)


# ----------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias_kind", ["none", "zeros", "random", "integer"])
def test_greedy_equals_argmax_of_materialised_logits(dtype, bias_kind):
    g = torch.Generator().manual_seed(5)
    for V, K in ((97, 6), (40, 40), (33, 1)):
        m = torch.randint(0, K, (V,), generator=g)
        m[:K] = torch.arange(K)
        m[-2:] = -1
        b = {"none": None, "zeros": torch.zeros(V), "random": torch.randn(V, generator=g),
             "integer": torch.randint(-1, 2, (V,), generator=g).float()}[bias_kind]
        b = None if b is None else b.to(dtype)
        # Integer code logits tie across codes; random bf16/fp16 ones tie by rounding after the bias add.
        z = torch.cat([torch.randint(-1, 2, (16, K), generator=g).float(), torch.randn(48, K, generator=g)])
        z = z.to(dtype)
        index = CodeIndex.build(m, K, b)
        expected = torch.argmax(scatter_code_logits(z, m, b), dim=-1)
        assert torch.equal(vq_greedy(z, index), expected), (V, K)
        assert torch.equal(vq_sample(z, index, temperature=0.0), expected)
        tok, prob = vq_filtered_probs(z[0], index, 0.0)
        assert tok.tolist() == [int(expected[0])] and float(prob[0]) == 1.0


def test_greedy_constructed_ties():
    # codes 0 and 1 tie at the top; code 1 owns the lowest id among the maxima (token 1).
    m = torch.tensor([2, 1, 0, 1, 0, -1])
    z = torch.tensor([[3.0, 3.0, 1.0], [0.0, 0.0, 9.0], [5.0, 4.0, 0.0]])
    assert vq_greedy(z, CodeIndex.build(m, 3)).tolist() == [1, 0, 2]
    b = torch.tensor([0.0, 1.0, 2.0, 1.0, 2.0, 7.0])  # the padded slot's bias must be ignored
    # logits row 0: [1, 4, 5, 4, 5] -> tokens 2 and 4 tie at 5 -> 2
    assert vq_greedy(z, CodeIndex.build(m, 3, b)).tolist() == [2, 0, 2]
    assert vq_greedy(z[:1].expand(2, 3).reshape(2, 1, 3), CodeIndex.build(m, 3, b)).shape == (2, 1)


# ----------------------------------------------------------------------------------------- statistics
Z_UPPER_1E6 = 4.753424  # Φ⁻¹(1 - 1e-6)


def chi_square_rejects(samples, tokens, probs):
    """Pearson χ² goodness of fit at level 1e-6 (critical value: Wilson–Hilferty approximation).

    Bins with expected count < 5 are pooled. A correct sampler fails with probability ~1e-6 per call,
    so a test (fixed seeds anyway) is essentially never flaky.
    """
    n = samples.numel()
    lookup = torch.full((int(max(tokens.max(), samples.max())) + 1,), -1, dtype=torch.int64)
    lookup[tokens] = torch.arange(tokens.numel())
    slot = lookup[samples]
    assert bool((slot >= 0).all()), "sampled a token outside the filtered set"
    observed = torch.bincount(slot, minlength=tokens.numel()).double()
    expected = n * probs.double()
    small = expected < 5
    if bool(small.any()):
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = expected.numel() - 1
    assert df >= 5, "too few bins for a meaningful test"
    crit = df * (1 - 2 / (9 * df) + Z_UPPER_1E6 * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit, stat, crit


STAT_CASES = [  # temperature, top_k, top_p, bias
    (1.0, 0, 1.0, True), (0.7, 20, 0.9, True), (1.5, 0, 0.8, False), (2.0, 30, 1.0, True),
]


@pytest.mark.parametrize("T,top_k,top_p,bias", STAT_CASES)
def test_samples_follow_exact_distribution(T, top_k, top_p, bias):
    m, b, z = make_case(60, 7, bias=bias, empty=1, pad=3, seed=11)
    z = z[:2] * 0.6 + 0.0  # keep the distributions spread over many tokens
    z[:, -1] = 30.0        # the empty code
    index = CodeIndex.build(m, 7, b)
    reps = 10_000
    gen = torch.Generator().manual_seed(1234)
    samples = vq_sample(z.repeat_interleave(reps, 0), index, temperature=T, top_k=top_k, top_p=top_p,
                        generator=gen).view(2, reps)
    for row in range(2):
        tok, prob = vq_filtered_probs(z[row], index, T, top_k, top_p)
        rejected, stat, crit = chi_square_rejects(samples[row], tok, prob)
        assert not rejected, f"row {row}: chi2={stat:.1f} > {crit:.1f}"


def test_goodness_of_fit_check_rejects_wrong_samplers():
    m, b, z = make_case(60, 7, bias=True, seed=11)
    z = z[:1] * 0.6
    right = CodeIndex.build(m, 7, b)
    tok, prob = vq_filtered_probs(z[0], right, 1.0, 0, 1.0)
    zz = z.expand(20_000, 7)
    ignore_bias = vq_sample(zz, CodeIndex.build(m, 7), generator=torch.Generator().manual_seed(0))
    wrong_temperature = vq_sample(zz, right, temperature=1.3, generator=torch.Generator().manual_seed(0))
    for wrong in (ignore_bias, wrong_temperature):
        rejected, stat, crit = chi_square_rejects(wrong, tok, prob)
        assert rejected, f"chi2={stat:.1f} <= {crit:.1f}"
    right_samples = vq_sample(zz, right, generator=torch.Generator().manual_seed(0))
    assert not chi_square_rejects(right_samples, tok, prob)[0]


# ----------------------------------------------------------------------------------------- support
@pytest.mark.parametrize("bias", [False, True])
def test_never_samples_padding_empty_codes_or_filtered_tokens(bias):
    m, b, z = make_case(103, 9, bias=bias, empty=3, pad=9, seed=2)
    index = CodeIndex.build(m, 9, b)
    gen = torch.Generator().manual_seed(0)
    for T, k, p in ((1.0, 0, 1.0), (0.5, 4, 1.0), (2.0, 0, 0.3), (1.0, 12, 0.7), (1.0, 1, 1.0)):
        samples = vq_sample(z.repeat_interleave(2000, 0), index, temperature=T, top_k=k, top_p=p,
                            generator=gen).view(3, 2000)
        assert bool((m[samples] >= 0).all())
        for row in range(3):
            allowed = vq_filtered_probs(z[row], index, T, k, p)[0]
            assert bool(torch.isin(samples[row], allowed).all()), (T, k, p, row)


def test_sampling_is_deterministic_and_shapes():
    m, b, z = make_case(37, 5, bias=True, seed=4)
    index = CodeIndex.build(m, 5, b)
    zz = z.view(3, 1, 5).expand(3, 4, 5)
    a = vq_sample(zz, index, top_k=3, generator=torch.Generator().manual_seed(9))
    c = vq_sample(zz, index, top_k=3, generator=torch.Generator().manual_seed(9))
    assert a.shape == (3, 4) and a.dtype == torch.int64 and torch.equal(a, c)
    assert vq_sample(z[:0], index).shape == (0,)
    with pytest.raises(ValueError):
        vq_sample(z, index, top_p=1.5)
    with pytest.raises(ValueError):
        vq_sample(z, index, temperature=-1.0)


@pytest.mark.parametrize("bias", [False, True])
def test_never_materialises_n_by_v(bias):
    N, V, K = 64, 4096, 16
    g = torch.Generator().manual_seed(0)
    m = torch.randint(0, K, (V,), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    z = torch.randn(N, K, generator=g)
    probe = LargestOutput()
    with probe:
        index = CodeIndex.build(m, K, b)
        vq_sample(z, index, generator=g)
        vq_sample(z, index, temperature=0.7, top_k=50, top_p=0.9, generator=g)
        vq_sample(z, index, top_p=0.95, generator=g)
        vq_greedy(z, index)
    assert probe.largest <= max(V + 1, 4 * N * K) < N * V // 10
    with probe:  # the probe does see a materialised path
        scatter_code_logits(z, m, b)
    assert probe.largest >= N * V


def test_tensor_parallel_entry_point_single_process():
    from vq_megatron.config import VQLogitsConfig
    from vq_megatron.layers import VQOutputLayer

    layer = VQOutputLayer(VQLogitsConfig(vocab_size=103, hidden_size=16, codebook_size=9, per_token_bias=True,
                                         codebook_init_std=0.5))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(103, generator=g))
    h = torch.randn(4, 2, 16, generator=g)
    index = layer.code_index()
    assert layer.code_index() is index  # cached while map and bias are unchanged
    ref = CodeIndex.build(layer.global_token_to_code, 9, layer.bias.detach())
    z = h @ layer.codebook.detach().t()
    got = layer.sample(h, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, vq_sample(z, ref, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(3)))
    greedy = layer.sample(h, greedy=True)
    assert torch.equal(greedy, torch.argmax(layer(h)[0], -1))
    with torch.no_grad():
        layer.bias.data.add_(1.0)  # through .data: no version bump, still detected
    assert layer.code_index() is not index
