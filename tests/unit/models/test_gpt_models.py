"""The GPT factory and model classes: output_layer dense | vq | adaptive."""

import pytest
import torch
import torch.nn.functional as F

from vq_megatron.layers.adaptive_softmax import AdaptiveSoftmaxHead


def _model_cfg(**kw):
    from vq_megatron.models import ModelConfig

    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=100,
                make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def test_adaptive_gpt_model_loss_matches_its_logits(parallel):
    from vq_megatron.models import build_gpt_model
    from vq_megatron.models import AdaptiveGPTModel

    torch.manual_seed(0)
    model = build_gpt_model(_model_cfg(output_layer="adaptive", adaptive_cutoffs=[20, 60]),
                            token_counts=torch.randint(0, 50, (100,)))
    assert isinstance(model, AdaptiveGPTModel) and isinstance(model.output_layer, AdaptiveSoftmaxHead)
    tokens = torch.randint(0, 100, (2, 8))
    labels = torch.randint(0, 100, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    loss = model(tokens, pos, mask, labels=labels)
    assert loss.shape == (2, 8)
    logits = model(tokens, pos, mask)                       # [b, s, V_pad] log-probabilities
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    assert torch.allclose(loss.reshape(-1), ref, atol=1e-4)
    loss.mean().backward()
    assert model.output_layer.asm.head.weight.grad is not None


def test_adaptive_refuses_tensor_parallel_and_tying():
    from vq_megatron.models import build_gpt_model

    with pytest.raises(ValueError, match="tie_embeddings"):
        _model_cfg(output_layer="adaptive", tie_embeddings=True)
    with pytest.raises(ValueError, match="tensor_parallel=1 only"):
        build_gpt_model(_model_cfg(output_layer="adaptive"), tensor_parallel=2)
