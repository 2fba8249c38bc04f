"""Layout-independent initialisation (models/seeding.py): a layer's weights depend on the seed and its
global layer number only, and the default stream is untouched by the build, so the output layer too comes
out the same however many layers a stage builds before it."""

import pytest
import torch

from vq_megatron.models.seeding import component_seed


def _build(num_layers: int, output_layer: str, init_seed, stream_seed: int = 0):
    from vq_megatron.models import ModelConfig, build_gpt_model

    cfg = ModelConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=2, seq_length=8,
                      vocab_size=100, make_vocab_size_divisible_by=8, output_layer=output_layer)
    torch.manual_seed(stream_seed)
    return dict(build_gpt_model(cfg, init_seed=init_seed).named_parameters())


def _random_weights(params: dict) -> dict:
    """The parameters megatron initialises randomly (norm weights are ones, biases zeros)."""
    return {n: p for n, p in params.items() if p.dim() == 2 and p.std() > 0}


@pytest.mark.parametrize("output_layer", ["dense", "adaptive"])
def test_weights_do_not_depend_on_how_many_layers_are_built(parallel, output_layer):
    two, three = _build(2, output_layer, init_seed=7), _build(3, output_layer, init_seed=7)
    shared = _random_weights(two)
    assert any(n.startswith("decoder.layers.1.") for n in shared) and any("embedding" in n for n in shared)
    assert any(n.startswith("output_layer.") for n in shared)
    for name, weight in shared.items():
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            # megatron scales these inits by 1/sqrt(2·num_layers): the same draws, another scale
            assert torch.allclose(weight * 2 ** 0.5, three[name] * 3 ** 0.5, rtol=1e-5, atol=1e-7), name
        else:
            assert torch.equal(weight, three[name]), name


def test_without_a_seed_the_build_order_stream_shows(parallel):
    """The control: megatron's own single stream gives another output layer with one more layer."""
    two, three = _build(2, "dense", init_seed=None), _build(3, "dense", init_seed=None)
    assert torch.equal(two["decoder.layers.0.mlp.linear_fc1.weight"], three["decoder.layers.0.mlp.linear_fc1.weight"])
    assert not torch.equal(two["output_layer.weight"], three["output_layer.weight"])


def test_layers_differ_from_each_other_and_follow_the_seed(parallel):
    a, b = _build(2, "dense", init_seed=7), _build(2, "dense", init_seed=8)
    name = "mlp.linear_fc1.weight"
    assert not torch.equal(a[f"decoder.layers.0.{name}"], a[f"decoder.layers.1.{name}"])
    assert not torch.equal(a[f"decoder.layers.0.{name}"], b[f"decoder.layers.0.{name}"])
    # the default stream is restored: a different stream before the build moves only what draws from it
    c = _build(2, "dense", init_seed=7, stream_seed=1)
    assert torch.equal(a[f"decoder.layers.1.{name}"], c[f"decoder.layers.1.{name}"])
    assert torch.equal(a["embedding.word_embeddings.weight"], c["embedding.word_embeddings.weight"])
    assert not torch.equal(a["output_layer.weight"], c["output_layer.weight"])


def test_component_seeds_are_distinct_and_stable():
    seeds = {component_seed(7, "layer", i) for i in range(1, 50)} | {component_seed(7, "embedding")}
    assert len(seeds) == 50 and all(0 <= s < 2 ** 62 for s in seeds)
    assert component_seed(7, "layer", 3) == component_seed(7, "layer", 3) != component_seed(8, "layer", 3)
