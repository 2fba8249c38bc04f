"""The output-layer swap on megatron-core's HybridModel (model.backbone: hybrid): with a GPT's weights mapped
onto the "*-" pattern it computes exactly what GPTModel computes (loss, logits, gradients), for the dense and
the VQ head; its VQ loss never runs the output layer's forward (no N×V logits) and equals the cross-entropy
of its own logits; no V×d dense weight is ever allocated."""

import re

import pytest
import torch
import torch.nn.functional as F


def _cfg(head: str, backbone: str, **kw):
    from vq_megatron.models import ModelConfig

    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=100,
                make_vocab_size_divisible_by=8, output_layer=head, backbone=backbone,
                vq={"codebook_size": 12, "per_token_bias": True, "refine_rank": kw.pop("refine_rank", 3)})
    return ModelConfig(**base, **kw)


def _pair(head: str, refine_rank: int = 3):
    from vq_megatron.models import build_gpt_model

    counts = torch.arange(100) % 13 + 1
    gpt = build_gpt_model(_cfg(head, "gpt", refine_rank=refine_rank), init_seed=1, token_counts=counts)
    hybrid = build_gpt_model(_cfg(head, "hybrid", refine_rank=refine_rank), init_seed=2, token_counts=counts)
    with torch.no_grad():   # move everything off its init, so that a mis-mapped tensor would show
        gen = torch.Generator().manual_seed(3)
        for _, p in sorted(gpt.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    hybrid.load_state_dict({_hybrid_name(k): v for k, v in gpt.state_dict().items()})
    return gpt, hybrid


def _hybrid_name(name: str) -> str:
    """GPT layer i = hybrid layers 2i (attention half) and 2i+1 (MLP half); final_layernorm = final_norm."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m is None:
        return name.replace("decoder.final_layernorm", "decoder.final_norm")
    i, rest = int(m.group(1)), m.group(2)
    return f"decoder.layers.{2 * i + (0 if rest.startswith(('input_layernorm', 'self_attention')) else 1)}.{rest}"


def _batch(b=3, s=8):
    gen = torch.Generator().manual_seed(4)
    return (torch.randint(0, 100, (b, s), generator=gen), torch.arange(s).expand(b, s),
            torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1), torch.randint(0, 100, (b, s), generator=gen))


@pytest.mark.parametrize("head,refine_rank", [("dense", 0), ("vq", 0), ("vq", 3)])
def test_hybrid_model_computes_what_gpt_model_computes(parallel, head, refine_rank):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    gpt, hybrid = _pair(head, refine_rank)
    assert isinstance(hybrid, HybridModel)
    tokens, positions, mask, labels = _batch()
    losses = []
    for model in (gpt, hybrid):
        loss = model(tokens, positions, mask, labels=labels)
        loss.sum().backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(gpt(tokens, positions, mask), hybrid(tokens, positions, mask), atol=1e-5)
    hybrid_grads = dict(hybrid.named_parameters())
    for name, p in gpt.named_parameters():
        assert torch.allclose(p.grad, hybrid_grads[_hybrid_name(name)].grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("refine_rank", [0, 3])
def test_vq_hybrid_loss_is_collapsed_and_equals_its_own_logits(parallel, refine_rank):
    from vq_megatron.layers import VQOutputLayer
    from vq_megatron.models import build_gpt_model
    from vq_megatron.models.hybrid import VQHybridModel

    model = build_gpt_model(_cfg("vq", "hybrid", refine_rank=refine_rank), init_seed=1,
                            token_counts=torch.arange(100) + 1)
    assert isinstance(model, VQHybridModel) and isinstance(model.output_layer, VQOutputLayer)
    assert max(p.numel() for p in model.output_layer.parameters()) < 104 * 16    # no V×d weight anywhere
    tokens, positions, mask, labels = _batch(b=3, s=8)
    logits = model(tokens, positions, mask)                                      # [b, s, V_pad]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")

    def no_logits(*args, **kwargs):
        raise AssertionError("the output layer's forward ran in the training loss")

    model.output_layer.forward = no_logits
    loss = model(tokens, positions, mask, labels=labels)
    assert loss.shape == (3, 8)
    assert torch.allclose(loss.reshape(-1), reference, atol=1e-5)


@pytest.mark.parametrize("kw,match", [(dict(output_layer="adaptive"), "backbone=hybrid supports output_layer"),
                                      (dict(mtp_num_layers=1), "backbone=hybrid supports output_layer dense or vq "
                                                               "without multi-token"),
                                      (dict(backbone="mamba"), "backbone='mamba' is not one of")])
def test_hybrid_options_it_cannot_honour_are_refused(kw, match):
    from vq_megatron.models import ModelConfig

    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=100, backbone="hybrid")
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kw})
