"""Multi-token prediction through a loss head (models/mtp.py): every MTP depth's loss through the head's own
(collapsed) loss equals megatron's own path through the materialised logits and its cross-entropy, in the
loss and in every gradient, and never calls the output layer's forward (which would build N×V logits)."""

import pytest
import torch


def _model(output_layer: str, mtp_layers: int, **vq):
    from vq_megatron.models import ModelConfig, build_gpt_model

    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=100,
                      make_vocab_size_divisible_by=8, output_layer=output_layer, vq=vq,
                      mtp_num_layers=mtp_layers, mtp_loss_scaling_factor=0.3)
    return build_gpt_model(cfg, init_seed=3, token_counts=torch.arange(1, 101) % 17 + 1)


def _batch(b=3, s=8):
    gen = torch.Generator().manual_seed(5)
    tokens, labels = torch.randint(0, 100, (b, s), generator=gen), torch.randint(0, 100, (b, s), generator=gen)
    loss_mask = (torch.rand(b, s, generator=gen) > 0.3).float()
    return tokens, torch.arange(s).expand(b, s), torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1), labels, loss_mask


def _loss_and_grads(model, from_logits: bool):
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()   # megatron's per-iteration tracker, sized by the first model's depths
    tokens, positions, mask, labels, loss_mask = _batch()
    model.zero_grad(set_to_none=True)
    model.mtp_loss_from_logits = from_logits
    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.5))   # what the driver sets for 2 accumulated micro-batches
    per_token = model(tokens, positions, mask, labels=labels, loss_mask=loss_mask)
    (0.5 * (per_token * loss_mask).sum() / loss_mask.sum()).backward()
    return per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head,vq", [("vq", {"codebook_size": 12, "per_token_bias": True}),
                                     ("vq", {"codebook_size": 12, "per_token_bias": True, "refine_rank": 3}),
                                     ("adaptive", {})])
@pytest.mark.parametrize("depths", [1, 2])
def test_collapsed_mtp_equals_megatrons_logits_path(parallel, head, vq, depths):
    model = _model(head, depths, **vq)
    reference_loss, reference = _loss_and_grads(model, from_logits=True)

    def no_logits(*args, **kwargs):
        raise AssertionError("the output layer's forward (N×V logits) ran in the collapsed MTP path")

    model.output_layer.forward = no_logits
    loss, grads = _loss_and_grads(model, from_logits=False)
    assert torch.equal(loss, reference_loss)                    # the main loss is the same computation
    assert set(grads) == set(reference) and any(n.startswith("mtp.") for n in grads)
    for name, grad in grads.items():
        scale = float(reference[name].abs().max())
        assert torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-6 * max(scale, 1e-3)), name
    assert all(float(grads[n].abs().sum()) > 0 for n in grads if n.startswith("mtp.") and n.endswith("weight"))


def test_mtp_depths_add_to_the_head_gradient(parallel):
    """The comparison above is not vacuous: the MTP losses reach the head (and scale with the factor)."""
    _, with_mtp = _loss_and_grads(_model("vq", 1, codebook_size=12), from_logits=False)
    _, without = _loss_and_grads(_model("vq", 0, codebook_size=12), from_logits=False)
    assert not torch.allclose(with_mtp["output_layer.codebook"], without["output_layer.codebook"])


def test_mtp_options_that_cannot_work_are_refused(parallel):
    from vq_megatron.models import ModelConfig

    with pytest.raises(ValueError, match="mtp_num_layers and model.mtp_loss_scaling_factor must be >= 0"):
        ModelConfig(mtp_num_layers=-1)
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=100,
                      output_layer="vq", vq={"codebook_size": 12}, mtp_num_layers=1)
    config = cfg.transformer_config(tensor_parallel=1)
    config.mtp_detach_heads = True
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from vq_megatron.models import VQGPTModel

    with pytest.raises(ValueError, match="mtp_detach_heads detaches an output weight"):
        VQGPTModel(config, get_gpt_layer_local_spec(), 104, 8, vq_config=cfg.vq_config())
