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


@pytest.mark.parametrize("refine_rank", [0, 3])
def test_vq_gpt_model_training_loss_is_the_cross_entropy_of_its_own_logits(parallel, refine_rank):
    """The output_processor hook hands the layer [s, b, h] and returns [b, s]: with b != s a swapped axis
    would show. The loss must equal cross-entropy over the model's own gathered logits, per token."""
    from vq_megatron.models import VQGPTModel, build_gpt_model

    torch.manual_seed(0)
    model = build_gpt_model(_model_cfg(output_layer="vq", vq={"codebook_size": 12, "per_token_bias": True,
                                                               "refine_rank": refine_rank}))
    assert isinstance(model, VQGPTModel)
    with torch.no_grad():
        model.output_layer.bias.normal_()
        if refine_rank:
            model.output_layer.refine_weight.normal_()
    b, s = 3, 8
    tokens, labels = torch.randint(0, 100, (b, s)), torch.randint(0, 100, (b, s))
    pos = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    loss = model(tokens, pos, mask, labels=labels)
    assert loss.shape == (b, s)
    logits = model(tokens, pos, mask)                                   # [b, s, V_pad]
    assert logits.shape[:2] == (b, s) and bool(torch.isneginf(logits[..., 100:]).all())
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                          reduction="none").view(b, s)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert model.output_layer.codebook.grad is not None and model.embedding.word_embeddings.weight.grad is not None
