"""The dense sampler and the VQ sampler must describe the same distribution on the same logits."""

import pytest
import torch

from vq_megatron.functional import vq_logits
from vq_megatron.ops.sampling import filtered_probs, sample_from_logits
from vq_megatron.ops.sampling import CodeIndex, vq_filtered_probs


def _sparse(order, probs):
    keep = probs > 0
    return dict(zip(order[keep].tolist(), probs[keep].tolist()))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 7, 0.5)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_filtered_probs_equal_the_vq_sampler_on_vq_logits(temperature, top_k, top_p, bias):
    gen = torch.Generator().manual_seed(0)
    V, K, d = 60, 7, 8
    token_to_code = torch.randint(0, K, (V,), generator=gen)
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    h = torch.randn(1, d, generator=gen, dtype=torch.float64)
    C = torch.randn(K, d, generator=gen, dtype=torch.float64)
    logits = vq_logits(h, C, token_to_code, b)
    dense = _sparse(*[t[0] for t in filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)])
    tokens, probs = vq_filtered_probs((h @ C.t())[0], CodeIndex.build(token_to_code, K, b), temperature, top_k, top_p)
    vq = dict(zip(tokens.tolist(), probs.tolist()))
    assert dense.keys() == vq.keys()
    for token, p in dense.items():
        assert p == pytest.approx(vq[token], rel=1e-9, abs=1e-12)


def test_top_k_and_top_p_filters_and_greedy():
    logits = torch.tensor([[2.0, 1.0, 3.0, 1.0, -5.0]])
    order, probs = filtered_probs(logits, top_k=2)
    assert _sparse(order[0], probs[0]).keys() == {2, 0}
    order, probs = filtered_probs(logits, top_k=3)        # ties with the 3rd largest are all kept
    assert _sparse(order[0], probs[0]).keys() == {2, 0, 1, 3}
    order, probs = filtered_probs(logits, top_p=0.5)      # the top token alone has > 0.5 of the mass
    assert _sparse(order[0], probs[0]).keys() == {2}
    assert sample_from_logits(logits, greedy=True).tolist() == [2]
    draws = sample_from_logits(logits.expand(2000, 5), top_k=2, generator=torch.Generator().manual_seed(1))
    share = (draws == 2).float().mean().item()
    assert set(draws.tolist()) == {0, 2} and abs(share - 1 / (1 + torch.e ** -1)) < 0.04
