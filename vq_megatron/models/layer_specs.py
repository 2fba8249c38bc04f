"""The transformer-layer spec of the GPT body: megatron-core's local spec, Transformer Engine's, or the local
spec with a norm that supports sequence parallelism.

megatron-core's local spec builds torch's LayerNorm through WrappedTorchNorm, which asserts
"sequence parallel not supported by torch LayerNorm": its fused replacements need Apex or Transformer
Engine. Under sequence parallelism a norm sees only its rank's slice of the sequence; the math is the
same, only its parameter gradients are partial sums that must be all-reduced over TP. Megatron marks such
parameters `sequence_parallel=True` and reduces them in finalize_model_grads; `SequenceParallelNorm` marks
its weight and bias the same way, and integration/sequence_parallel.py reduces them under DeepSpeed.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LAYER_SPECS", "SequenceParallelNorm", "have_transformer_engine", "resolve_layer_spec",
           "gpt_layer_spec"]

LAYER_SPECS = ("auto", "local", "transformer_engine")


class SequenceParallelNorm:
    """megatron's WrappedTorchNorm (LayerNorm or RMSNorm from torch) without its sequence-parallel assertion:
    the parameters carry `sequence_parallel` so their gradients get summed over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r}: LayerNorm or RMSNorm with sequence parallel")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def have_transformer_engine() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def resolve_layer_spec(name: str) -> str:
    """'auto' -> Transformer Engine on a GPU when importable, else megatron-core's local modules."""
    if name not in LAYER_SPECS:
        raise ValueError(f"model.layer_spec={name!r} is not one of {LAYER_SPECS}")
    if name == "transformer_engine" and not have_transformer_engine():
        raise ValueError("model.layer_spec=transformer_engine but Transformer Engine is not importable "
                         "(pip install transformer_engine[pytorch] on a CUDA machine), or use layer_spec: local")
    if name == "auto":
        return "transformer_engine" if torch.cuda.is_available() and have_transformer_engine() else "local"
    return name


def gpt_layer_spec(config, layer_spec: str = "auto"):
    """The spec GPTModel takes as transformer_layer_spec for this config (and pipeline stage)."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if resolve_layer_spec(layer_spec) == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec()
    if not config.sequence_parallel:
        return spec
    layer = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelNorm)
