"""Sampling from the two-level head (ops/sampling/refined.py, VQOutputLayer.sample with refine_rank > 0)
against the materialised two-level distribution, built independently code by code."""

import pytest
import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import VQOutputLayer
from vq_megatron.ops.sampling import CodeIndex, refined_full_logits, refined_sample
from test_sampling import chi_square_rejects, reference_filtered_probs


def two_level_logits(z, g, m, b, U):
    """log p(v|h) + const, code by code: log softmax_k(z + B)_k + log softmax_{w∈k}(b_w + u_w·g)_v; pads -inf."""
    V, K = m.shape[0], z.shape[-1]
    b = torch.zeros(V, dtype=torch.float64) if b is None else b.double()
    scores = b + g.double() @ U.double().t()
    out = torch.full((z.shape[0], V), float("-inf"), dtype=torch.float64)
    B = torch.stack([torch.logsumexp(b[m == k], 0) if (m == k).any() else torch.tensor(float("-inf"),
                                                                                       dtype=torch.float64)
                     for k in range(K)])
    code_logp = torch.log_softmax(z.double() + B, -1)
    for k in range(K):
        members = m == k
        if members.any():
            out[:, members] = code_logp[:, k:k + 1] + torch.log_softmax(scores[:, members], -1)
    return out


def make_case(V=60, K=7, r=3, *, bias=True, empty=1, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    used = K - empty
    m = torch.randint(0, used, (V,), generator=g)
    if pad:
        m[torch.randperm(V, generator=g)[:pad]] = -1
    m[:used] = torch.arange(used)                 # every used code keeps at least one token
    b = torch.randn(V, generator=g) if bias else None
    U = torch.randn(V, r, generator=g)
    z = 0.8 * torch.randn(2, K, generator=g)
    z[:, used:] = 30.0                            # empty codes: the largest logits, still never drawn
    gvec = torch.randn(2, r, generator=g)
    return m, b, U, z, gvec


@pytest.mark.parametrize("bias", [False, True])
def test_full_logits_equal_the_independent_two_level_distribution(bias):
    m, b, U, z, g = make_case(bias=bias)
    index = CodeIndex.build(m, 7, b)
    got = torch.log_softmax(refined_full_logits(z, g, m, b, U, index), -1)
    torch.testing.assert_close(got, two_level_logits(z, g, m, b, U), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,top_k,top_p,bias", [(1.0, 0, 1.0, True), (1.0, 0, 1.0, False), (0.7, 20, 0.9, True),
                                                (1.5, 0, 0.8, True), (2.0, 30, 1.0, False)])
def test_samples_follow_the_exact_distribution(T, top_k, top_p, bias):
    """T=1 unfiltered takes the code-then-token path; the others the O(V·r) logits + dense rules."""
    m, b, U, z, g = make_case(bias=bias, seed=3)
    index = CodeIndex.build(m, 7, b)
    reps = 10_000
    samples = refined_sample(z.repeat_interleave(reps, 0), g.repeat_interleave(reps, 0), m, b, U, index,
                             temperature=T, top_k=top_k, top_p=top_p,
                             generator=torch.Generator().manual_seed(5)).view(2, reps)
    reference = two_level_logits(z, g, m, b, U)
    for row in range(2):
        tok, prob = reference_filtered_probs(reference[row], T, top_k, top_p)
        rejected, stat, crit = chi_square_rejects(samples[row], tok, prob)
        assert not rejected, f"row {row}: chi2={stat:.1f} > {crit:.1f}"
        assert bool((m[samples[row]] >= 0).all())


def test_goodness_of_fit_rejects_a_sampler_that_ignores_the_refinement():
    m, b, U, z, g = make_case(seed=3)
    index = CodeIndex.build(m, 7, b)
    reps = 20_000
    wrong = refined_sample(z[:1].expand(reps, 7), g[:1].expand(reps, 3), m, b, torch.zeros_like(U), index,
                           generator=torch.Generator().manual_seed(0))
    tok, prob = reference_filtered_probs(two_level_logits(z, g, m, b, U)[0], 1.0, 0, 1.0)
    assert chi_square_rejects(wrong, tok, prob)[0]


def test_greedy_is_argmax_of_the_two_level_logits():
    m, b, U, z, g = make_case(seed=4)
    index = CodeIndex.build(m, 7, b)
    expected = two_level_logits(z, g, m, b, U).argmax(-1)
    assert torch.equal(refined_sample(z, g, m, b, U, index, greedy=True), expected)
    assert torch.equal(refined_sample(z, g, m, b, U, index, temperature=0.0), expected)


def test_layer_sample_uses_the_refinement():
    layer = VQOutputLayer(VQLogitsConfig(vocab_size=61, hidden_size=8, codebook_size=5, per_token_bias=True,
                                         refine_rank=2, codebook_init_std=0.5), padded_vocab_size=64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
        layer.refine_weight[:61].normal_(generator=gen)
    h = torch.randn(6, 8, generator=gen)
    logits, _ = layer(h)
    assert torch.equal(layer.sample(h, greedy=True), logits[:, :61].argmax(-1))
    index = layer.code_index()
    assert layer.code_index() is index
    with torch.no_grad():
        layer.refine_weight.data[3] += 1.0          # a changed refinement rebuilds the cached tables
    assert layer.code_index() is not index
    assert torch.equal(layer.sampling_cache.full_refine_weight[3], layer.refine_weight[3])
    draws = layer.sample(h.repeat(500, 1), generator=torch.Generator().manual_seed(1))
    assert bool((draws < 61).all())
