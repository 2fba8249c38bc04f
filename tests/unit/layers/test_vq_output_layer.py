"""VQOutputLayer in a single process (the TP behaviour is in tests/distributed)."""

import pytest
import torch
import torch.nn.functional as F

from vq_megatron.config import VQLogitsConfig
from vq_megatron.functional import vq_cross_entropy, vq_logits
from vq_megatron.layers import VQOutputLayer
from vq_megatron.ops.map_init import contiguous_map


def make_layer(**overrides):
    options = dict(vocab_size=97, hidden_size=8, codebook_size=10, seed=3)
    options.update(overrides)
    padded = options.pop("padded_vocab_size", None)
    return VQOutputLayer(VQLogitsConfig(**options), padded_vocab_size=padded)


def test_parameters_buffers_and_state_dict():
    layer = make_layer(per_token_bias=True)
    assert dict(layer.named_parameters()).keys() == {"codebook", "bias"}
    assert layer.codebook.shape == (10, 8) and layer.bias.shape == (97,)
    assert layer.codebook.tensor_model_parallel is False
    assert layer.bias.tensor_model_parallel is True and layer.bias.partition_dim == 0
    sd = layer.state_dict()
    assert set(sd) == {"codebook", "bias", "token_to_code"}   # derived copies are not persisted
    assert sd["token_to_code"].dtype == torch.int64
    counts = torch.bincount(layer.token_to_code, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 10           # balanced random map


def test_loss_and_forward_match_functional_api():
    layer = make_layer(per_token_bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    h = torch.randn(5, 3, 8)
    y = torch.randint(0, 97, (5, 3))
    logits, bias_out = layer(h)
    assert bias_out is None and logits.shape == (5, 3, 97)
    torch.testing.assert_close(logits, vq_logits(h, layer.codebook, layer.token_to_code, layer.bias))
    expected = vq_cross_entropy(h, layer.codebook, layer.token_to_code, y, layer.bias, reduction="none")
    torch.testing.assert_close(layer.loss(h, y), expected)
    torch.testing.assert_close(layer.materialised_loss(h, y), expected, rtol=1e-5, atol=1e-5)


def test_padded_vocab_gives_minus_inf_and_no_mass():
    layer = make_layer(padded_vocab_size=128)
    h = torch.randn(4, 2, 8)
    y = torch.randint(0, 97, (4, 2))
    logits, _ = layer(h)
    assert logits.shape == (4, 2, 128) and torch.isneginf(logits[..., 97:]).all()
    ref = F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1), reduction="none").view(4, 2)
    torch.testing.assert_close(layer.loss(h, y), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be token ids in \\[0, 97\\)"):
        layer.loss(h, torch.full((4, 2), 100))   # a padded id is not a real token


def test_config_defaults_for_smoothing_and_z_loss_are_used():
    layer = make_layer(label_smoothing=0.2, z_loss=1e-3)
    h, y = torch.randn(6, 8), torch.randint(0, 97, (6,))
    expected = vq_cross_entropy(h, layer.codebook, layer.token_to_code, y, label_smoothing=0.2, z_loss=1e-3,
                                reduction="none")
    torch.testing.assert_close(layer.loss(h, y), expected)
    torch.testing.assert_close(layer.loss(h, y, label_smoothing=0.0, z_loss=0.0),
                               vq_cross_entropy(h, layer.codebook, layer.token_to_code, y, reduction="none"))


def test_tied_weight_is_rejected():
    with pytest.raises(ValueError, match="share_embeddings_and_output_weights=False"):
        make_layer()(torch.randn(2, 8), weight=torch.randn(97, 8))


def test_map_init_strategies_and_kmeans_codebook():
    emb = torch.randn(97, 8)
    with pytest.raises(ValueError, match="requires embeddings"):
        layer = make_layer(map_init="kmeans")
    layer = VQOutputLayer(VQLogitsConfig(vocab_size=97, hidden_size=8, codebook_size=10, map_init="kmeans",
                                         codebook_init="kmeans"), embeddings=emb)
    # Each token's nearest centroid is its own code (a k-means fixed point).
    nearest = torch.cdist(emb, layer.codebook.detach()).argmin(1)
    assert (nearest == layer.token_to_code).float().mean() > 0.95
    contiguous = make_layer(map_init="contiguous")
    assert torch.equal(contiguous.token_to_code, contiguous_map(97, 10))
    counts = torch.arange(97, 0, -1).float()
    freq = VQOutputLayer(VQLogitsConfig(vocab_size=97, hidden_size=8, codebook_size=10, map_init="frequency"),
                         token_counts=counts)
    totals = torch.zeros(10).index_add(0, freq.token_to_code, counts)
    assert totals.max() - totals.min() <= counts.max()


def test_same_seed_same_layer_different_seed_different_map():
    a, b, c = make_layer(seed=1), make_layer(seed=1), make_layer(seed=2)
    assert torch.equal(a.token_to_code, b.token_to_code) and torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.token_to_code, c.token_to_code)


def test_set_map_validates_and_keeps_counts_consistent():
    layer = make_layer()
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        layer.set_map(torch.full((97,), 10))
    with pytest.raises(ValueError, match="must have shape \\[97\\]"):
        layer.set_map(torch.zeros(50, dtype=torch.long))
    new = torch.zeros(97, dtype=torch.long)
    new[:5] = 3
    layer.set_map(new)
    assert layer.code_counts.tolist() == [92, 0, 0, 5] + [0] * 6
    h, y = torch.randn(4, 8), torch.randint(0, 97, (4,))
    torch.testing.assert_close(layer.loss(h, y), vq_cross_entropy(h, layer.codebook, new, y, reduction="none"))


def test_load_state_dict_refreshes_derived_map():
    src, dst = make_layer(seed=1), make_layer(seed=2)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.global_token_to_code, src.global_token_to_code)
    assert torch.equal(dst.code_counts, src.code_counts)
    bad = src.state_dict()
    bad["token_to_code"] = torch.full((97,), 42)
    with pytest.raises(ValueError, match="outside"):
        dst.load_state_dict(bad)


def test_rebuild_map_kmeans_and_nearest():
    layer = make_layer()
    # Embeddings built so that token v sits next to code (v mod 10): both rebuilds should recover it.
    target = torch.arange(97) % 10
    with torch.no_grad():
        layer.codebook.copy_(torch.randn(10, 8) * 10)
    emb = layer.codebook.detach()[target] + 0.01 * torch.randn(97, 8)
    moved = layer.rebuild_map(emb, method="nearest")
    assert torch.equal(layer.global_token_to_code, target) and moved > 0.5
    assert torch.equal(layer.code_counts, torch.bincount(target, minlength=10))
    layer.rebuild_map(emb, method="kmeans", reinit_codebook=True)
    # k-means labels are a permutation of the planted groups.
    pairs = set(zip(layer.global_token_to_code.tolist(), target.tolist()))
    assert len(pairs) == 10
    assert torch.cdist(layer.codebook.detach(), emb).min(1).values.max() < 1.0
    with pytest.raises(ValueError, match="'kmeans' or 'nearest'"):
        layer.rebuild_map(emb, method="spectral")


def test_unigram_bias_init_makes_the_head_a_unigram_model():
    counts = torch.randint(0, 1000, (97,)).float()
    layer = VQOutputLayer(VQLogitsConfig(vocab_size=97, hidden_size=8, codebook_size=10, per_token_bias=True,
                                         bias_init="unigram"), token_counts=counts)
    with torch.no_grad():
        layer.codebook.zero_()   # code logits all 0: the softmax is the bias alone
    probs = torch.softmax(layer(torch.randn(1, 8))[0], -1)[0]
    torch.testing.assert_close(probs, (counts + 1) / (counts + 1).sum())
    with pytest.raises(ValueError, match="needs token_counts"):
        make_layer(per_token_bias=True, bias_init="unigram")
    with pytest.raises(ValueError, match="needs per_token_bias"):
        make_layer(bias_init="unigram")
