"""Re-clustering the VQ map from the model's own input embeddings during training."""

import pytest
import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import VQOutputLayer


class _TinyVQModel(torch.nn.Module):
    def __init__(self, vocab, padded, d, codes):
        super().__init__()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(padded, d)
        self.output_layer = VQOutputLayer(VQLogitsConfig(vocab_size=vocab, hidden_size=d, codebook_size=codes,
                                                         kmeans_iters=20), padded_vocab_size=padded)


def test_recluster_groups_tokens_with_close_input_embeddings():
    from vq_megatron.strategies.recluster import recluster_from_input_embeddings

    torch.manual_seed(0)
    V, d, K = 60, 8, 4
    model = _TinyVQModel(V, 64, d, K)
    centres = torch.randn(K, d) * 10
    truth = torch.arange(V) % K
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:V] = centres[truth] + 0.01 * torch.randn(V, d)
    moved = recluster_from_input_embeddings(model, method="kmeans", reinit_codebook=True)
    assert 0 < moved <= 1
    new = model.output_layer.global_token_to_code
    # same partition as the truth (code ids may be permuted)
    for k in range(K):
        assert new[truth == k].unique().numel() == 1
    assert model.output_layer.code_counts.tolist() == torch.bincount(new, minlength=K).tolist()
    assert torch.equal(model.output_layer.token_to_code[:V], new)
    assert (model.output_layer.token_to_code[V:] == -1).all()
    # codebook re-initialised from the centroids
    assert torch.allclose(model.output_layer.codebook[new[0]], centres[truth[0]], atol=0.1)
    assert recluster_from_input_embeddings(model, method="kmeans") == 0.0    # stable afterwards


def test_recluster_config_validation():
    with pytest.raises(ValueError, match="recluster_interval"):
        VQLogitsConfig(vocab_size=10, hidden_size=4, codebook_size=2, recluster_interval=-1)
    with pytest.raises(ValueError, match="recluster_method"):
        VQLogitsConfig(vocab_size=10, hidden_size=4, codebook_size=2, recluster_method="pca")


def test_trainer_recluster_hook_fires_on_interval_only():
    from types import SimpleNamespace

    from vq_megatron.training.trainer import _maybe_recluster

    model = _TinyVQModel(60, 64, 8, 4)
    model.output_layer.config.recluster_interval = 5
    before = model.output_layer.global_token_to_code.clone()
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:60] = torch.randn(4, 8)[torch.arange(60) % 4] * 10
    cfg = SimpleNamespace(training=SimpleNamespace(steps=20))
    _maybe_recluster(model, cfg, 3)
    assert torch.equal(model.output_layer.global_token_to_code, before)
    _maybe_recluster(model, cfg, 20)                          # never after the last step
    assert torch.equal(model.output_layer.global_token_to_code, before)
    _maybe_recluster(model, cfg, 10)
    assert not torch.equal(model.output_layer.global_token_to_code, before)
