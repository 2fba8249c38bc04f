"""One factory that reads `output_layer: dense|vq|adaptive` and builds a megatron-core GPTModel.

dense: megatron-core's own GPTModel (ColumnParallelLinear head, vocab-parallel cross-entropy).
vq:    VQGPTModel, a GPTModel whose output layer is VQOutputLayer. With labels, its forward computes the
       collapsed loss through GPTModel's `output_processor` hook, so the N×V logits are never built and
       the return contract is unchanged (per-token loss [b, s]); without labels it returns logits.
adaptive: AdaptiveGPTModel, adaptive softmax over frequency-ranked token ids (layers/adaptive_softmax.py),
       the classic peer of VQ-Logits in the ablations (TP=1 only).
"""

from __future__ import annotations

import contextlib

import megatron.core.models.gpt.gpt_model as gpt_module
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import AdaptiveSoftmaxHead, VQOutputLayer
from vq_megatron.models.config import ModelConfig
from vq_megatron.models.layer_specs import gpt_layer_spec, resolve_layer_spec
from vq_megatron.models.loss_head import LossHeadMixin, without_dense_output_layer
from vq_megatron.models.mtp import mtp_through_head_loss
from vq_megatron.models.seeding import seeded_embedding, seeded_layer_spec
from vq_megatron.parallel import padded_vocab_size

__all__ = ["LossHeadGPTModel", "VQGPTModel", "AdaptiveGPTModel", "build_gpt_model", "head_parameter_count"]


class LossHeadGPTModel(LossHeadMixin, GPTModel):
    """A GPTModel whose output layer computes the training loss itself from the hidden states
    (models/loss_head.py).

    With labels, forward() routes the hidden states to the head's loss through GPTModel's
    `output_processor` hook, so the [s, b, V] logits are never built and the return contract (per-token
    loss [b, s]) is unchanged; multi-token prediction depths go through the same loss (models/mtp.py;
    `mtp_loss_from_logits = True` runs megatron's own logits path instead, the reference). GPTModel's own
    V×d output layer is never allocated.
    """

    mtp_loss_from_logits = False

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, **kwargs):
        self.check_loss_head_options(type(self).__name__, self.head_name, config,
                                     kwargs.pop("share_embeddings_and_output_weights", False))
        with without_dense_output_layer(gpt_module):
            super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length,
                             share_embeddings_and_output_weights=False, **kwargs)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, **kwargs):
        if labels is not None and self.post_process and kwargs.get("output_processor") is None:
            kwargs["output_processor"] = self._head_language_model_loss
        collapsed_mtp = self.mtp_process and self.post_process and not self.mtp_loss_from_logits
        with mtp_through_head_loss(gpt_module, self.head_loss) if collapsed_mtp else contextlib.nullcontext():
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)

    def _head_language_model_loss(self, *, hidden_states, labels, **_unused):
        return self.head_loss(hidden_states, labels)


class VQGPTModel(LossHeadGPTModel):
    """GPTModel with VQOutputLayer as its output layer; the training loss uses the exact collapse."""

    head_name = "the VQ output layer"

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, *, vq_config: VQLogitsConfig, token_counts=None,
                 embeddings=None, init_from_data: bool = True, **kwargs):
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        if self.post_process:
            self.build_vq_head(vq_config, vocab_size, token_counts=token_counts, embeddings=embeddings,
                               init_from_data=init_from_data)


class AdaptiveGPTModel(LossHeadGPTModel):
    """GPTModel whose output layer is AdaptiveSoftmaxHead (TP=1 only)."""

    head_name = "the adaptive head"

    def __init__(self, config, transformer_layer_spec, vocab_size: int, max_sequence_length: int, *,
                 real_vocab_size: int, cutoffs=None, div_value: float = 4.0, token_counts=None, **kwargs):
        if config.tensor_model_parallel_size != 1:
            raise ValueError("output_layer=adaptive supports tensor_parallel=1 only "
                             f"(got {config.tensor_model_parallel_size}); use dense or vq for TP>1")
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        if self.post_process:
            self.output_layer = AdaptiveSoftmaxHead(
                config.hidden_size, real_vocab_size, padded_vocab_size=vocab_size, cutoffs=cutoffs,
                div_value=div_value, token_counts=token_counts, device=self.head_device(),
                dtype=config.params_dtype)


def build_gpt_model(model_cfg: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                    sequence_parallel: bool = False, params_dtype=torch.float32, pre_process: bool = True,
                    post_process: bool = True, token_counts=None, embeddings=None,
                    weights_from_checkpoint: bool = False, init_seed: int | None = None):
    """Build the GPT body as model.backbone says (megatron-core's GPTModel, or HybridModel with a GPT layer
    pattern; model.layer_spec: megatron-core's local modules, with a sequence-parallel norm when SP is on, or
    Transformer Engine's) and the head named by output_layer.

    weights_from_checkpoint: every weight (the VQ map included) is about to be loaded, so the head skips
    its data-dependent initialisation (token counts, k-means of embedding files) and needs no data.
    init_seed: draw the embedding's and every layer's initial weights from streams of their own
    (models/seeding.py), so this seed gives the same model at every pipeline layout; None keeps megatron's
    single build-order stream.
    """
    config = model_cfg.transformer_config(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                          sequence_parallel=sequence_parallel, params_dtype=params_dtype)
    common = dict(
        vocab_size=padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by,
                                     tensor_parallel),
        max_sequence_length=model_cfg.seq_length, pre_process=pre_process, post_process=post_process,
        position_embedding_type=model_cfg.position_embedding_type)
    head = dict(token_counts=token_counts, embeddings=embeddings, init_from_data=not weights_from_checkpoint)
    use_te = resolve_layer_spec(model_cfg.layer_spec) == "transformer_engine"
    if model_cfg.backbone == "hybrid":
        return _build_hybrid_model(model_cfg, config, common, head, use_te, init_seed)
    layer_spec = gpt_layer_spec(config, model_cfg.layer_spec)
    if model_cfg.mtp_num_layers:   # from the plain spec: megatron accepts only TransformerLayer itself there
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        common["mtp_block_spec"] = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te)
    if init_seed is not None:
        layer_spec = seeded_layer_spec(layer_spec, init_seed)
    with seeded_embedding(gpt_module, init_seed) if init_seed is not None else contextlib.nullcontext():
        return _build_gpt_head_model(model_cfg, dict(config=config, transformer_layer_spec=layer_spec, **common),
                                     head)


def _build_gpt_head_model(model_cfg: ModelConfig, common: dict, head: dict) -> GPTModel:
    if model_cfg.output_layer == "dense":
        return GPTModel(share_embeddings_and_output_weights=model_cfg.tie_embeddings, **common)
    if model_cfg.output_layer == "adaptive":
        return AdaptiveGPTModel(real_vocab_size=model_cfg.vocab_size, cutoffs=model_cfg.adaptive_cutoffs or None,
                                div_value=model_cfg.adaptive_div_value, token_counts=head["token_counts"],
                                **common)
    return VQGPTModel(vq_config=model_cfg.vq_config(), **head, **common)


def _build_hybrid_model(model_cfg: ModelConfig, config, common: dict, head: dict, use_te: bool, init_seed):
    import megatron.core.models.hybrid.hybrid_model as hybrid_module
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from vq_megatron.models.hybrid import (VQHybridModel, hybrid_layer_pattern, hybrid_stack_spec,
                                           seeded_hybrid_stack_spec, torch_final_norm_without_te)

    spec = hybrid_stack_spec(config, use_te)
    if init_seed is not None:
        spec = seeded_hybrid_stack_spec(spec, init_seed)
    common = dict(config=config, hybrid_stack_spec=spec, hybrid_layer_pattern=hybrid_layer_pattern(
        model_cfg.num_layers), **common)
    with seeded_embedding(hybrid_module, init_seed) if init_seed is not None else contextlib.nullcontext():
        if model_cfg.output_layer == "dense":
            with torch_final_norm_without_te():
                return HybridModel(share_embeddings_and_output_weights=model_cfg.tie_embeddings, **common)
        return VQHybridModel(vq_config=model_cfg.vq_config(), **head, **common)


def head_parameter_count(model: torch.nn.Module) -> int:
    """Trainable output-layer parameters of the whole model: TP shards counted once each, Megatron's
    vocabulary padding left out where the head knows it (VQ: K·d + V + V·r + r·d); 0 for a tied dense head."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return 0
    if isinstance(layer, VQOutputLayer):   # the padded bias / refinement rows are never trained
        return layer.config.output_layer_parameters()
    tp = getattr(getattr(model, "config", None), "tensor_model_parallel_size", 1) or 1
    return sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
               for p in layer.parameters() if p.requires_grad)
