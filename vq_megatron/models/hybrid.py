"""The same output-layer swap for megatron-core's HybridModel (`model.backbone: hybrid`).

megatron-core 0.19 deprecates GPTModel in favour of HybridModel, whose stack is a pattern of layer symbols.
A GPT body is the pattern "*-" per GPT layer (an attention layer, then an MLP layer), which is what
`model.backbone: hybrid` builds; `output_layer: dense` is HybridModel itself, `vq` is VQHybridModel.

HybridModel has no output_processor hook: with labels it builds the [s, b, V] logits and megatron's
cross-entropy. VQHybridModel runs it without labels while its output layer hands back the hidden states
(which HybridModel then returns as [b, s, h]) and computes the collapsed loss from them, so no N×V tensor is
built and the return contract (per-token loss [b, s]) is unchanged. HybridModel's own V×d layer is never
allocated.

On a machine without Transformer Engine: HybridModel's stack spec and its final norm are Transformer
Engine's (megatron hard-codes TENorm there), so the stack is built from megatron-core's local GPT layer
(split into its attention and MLP halves) and the final norm from torch (the same LayerNorm / RMSNorm math).
"""

from __future__ import annotations

import contextlib
import dataclasses

import megatron.core.models.hybrid.hybrid_block as hybrid_block
import megatron.core.models.hybrid.hybrid_model as hybrid_module
from megatron.core.models.hybrid.hybrid_model import HybridModel

from vq_megatron.config import VQLogitsConfig
from vq_megatron.models.layer_specs import SequenceParallelNorm, gpt_layer_spec, have_transformer_engine
from vq_megatron.models.loss_head import LossHeadMixin, without_dense_output_layer
from vq_megatron.models.seeding import seeded_layer_spec

__all__ = ["VQHybridModel", "final_hidden_states", "hybrid_layer_pattern", "hybrid_stack_spec", "seeded_hybrid_stack_spec",
           "torch_final_norm_without_te"]


def hybrid_layer_pattern(gpt_layers: int) -> str:
    """HybridModel's layer pattern of a GPT body: attention then MLP, per GPT layer."""
    return "*-" * gpt_layers


def hybrid_stack_spec(config, use_transformer_engine: bool):
    """megatron-core's hybrid_stack_spec (Transformer Engine), or the same stack from megatron-core's local
    GPT layer: its attention half as the attention layer, its MLP half as the MLP layer (keeping the keys
    maps that make their dist checkpoints interchangeable with Transformer Engine's fused norms)."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    if use_transformer_engine:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as te_spec

        return te_spec
    layer = gpt_layer_spec(config, "local")
    layer = layer.layer_specs[0] if hasattr(layer, "layer_specs") else layer
    sub = layer.submodules
    attention = ModuleSpec(module=layer.module, submodules=TransformerLayerSubmodules(
        input_layernorm=sub.input_layernorm, self_attention=sub.self_attention, self_attn_bda=sub.self_attn_bda,
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=sub.pre_mlp_layernorm, mlp=sub.mlp, mlp_bda=sub.mlp_bda,
        sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp))


def seeded_hybrid_stack_spec(spec, seed: int):
    """The stack spec with its attention and MLP layers seeded by their (global) layer numbers
    (models/seeding.py)."""
    sub = spec.submodules
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        sub, attention_layer=seeded_layer_spec(sub.attention_layer, seed),
        mlp_layer=seeded_layer_spec(sub.mlp_layer, seed)))


@contextlib.contextmanager
def torch_final_norm_without_te():
    """While a HybridModel is built without Transformer Engine, its final norm is torch's."""
    if have_transformer_engine():
        yield
        return
    real = hybrid_block.TENorm
    hybrid_block.TENorm = SequenceParallelNorm
    try:
        yield
    finally:
        hybrid_block.TENorm = real


@contextlib.contextmanager
def _output_layer_returns_hidden_states(layer):
    """The output layer's call returns its input (and no bias) instead of logits, for one forward."""
    layer.forward = lambda hidden_states, *args, **kwargs: (hidden_states, None)
    try:
        yield
    finally:
        del layer.forward


def final_hidden_states(model, input_ids, position_ids, attention_mask, **kwargs):
    """The body's output [s, b, h] (after the final norm, before the output layer) of a GPTModel or a
    HybridModel: through GPTModel's output_processor hook, or with HybridModel's output layer passing it on."""
    if isinstance(model, HybridModel):
        with _output_layer_returns_hidden_states(model.output_layer):
            return model(input_ids, position_ids, attention_mask, **kwargs).transpose(0, 1)
    return model(input_ids, position_ids, attention_mask,
                 output_processor=lambda hidden_states, **_: hidden_states, **kwargs)


class VQHybridModel(LossHeadMixin, HybridModel):
    """HybridModel with VQOutputLayer as its output layer; the training loss uses the exact collapse."""

    head_name = "the VQ output layer"

    def __init__(self, config, hybrid_stack_spec, vocab_size: int, max_sequence_length: int, *,
                 vq_config: VQLogitsConfig, token_counts=None, embeddings=None, init_from_data: bool = True,
                 **kwargs):
        self.check_loss_head_options(type(self).__name__, self.head_name, config,
                                     kwargs.pop("share_embeddings_and_output_weights", False))
        if config.mtp_num_layers or "/" in (kwargs.get("hybrid_layer_pattern") or ""):
            raise ValueError("multi-token prediction with the VQ output layer is supported on GPTModel "
                             "(model.backbone: gpt), not on HybridModel")
        if config.use_mup:
            raise ValueError("use_mup scales logits, which the VQ output layer's collapsed loss never builds")
        with without_dense_output_layer(hybrid_module), torch_final_norm_without_te():
            super().__init__(config, hybrid_stack_spec, vocab_size, max_sequence_length,
                             share_embeddings_and_output_weights=False, **kwargs)
        if self.post_process:
            self.build_vq_head(vq_config, vocab_size, token_counts=token_counts, embeddings=embeddings,
                               init_from_data=init_from_data)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, **kwargs):
        if labels is None or not self.post_process:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)
        with _output_layer_returns_hidden_states(self.output_layer):
            hidden = super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                     **kwargs)                       # [b, s, h], as HybridModel returns logits
        return self.head_loss(hidden.transpose(0, 1), labels)
