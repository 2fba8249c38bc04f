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

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import AdaptiveSoftmaxHead, VQOutputLayer
from vq_megatron.models.config import ModelConfig
from vq_megatron.models.layer_specs import gpt_layer_spec
from vq_megatron.models.seeding import seeded_gpt_components, seeded_layer_spec
from vq_megatron.parallel import padded_vocab_size

__all__ = ["LossHeadGPTModel", "VQGPTModel", "AdaptiveGPTModel", "build_gpt_model", "head_parameter_count"]


class _NoOutputLayer(torch.nn.Module):
    """What GPTModel.__init__ builds instead of its V×d ColumnParallelLinear while a loss head is built: no
    weight at all (GPTModel only checks `weight is None` before the head replaces it)."""

    weight = None

    def __init__(self, *args, config, **kwargs):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel


class _TensorParallelWithoutOutputLinear:
    """megatron.core.tensor_parallel as gpt_model.py sees it, but ColumnParallelLinear builds nothing. The
    decoder's linears come from its layer spec, not from this name, so only the output layer is affected."""

    ColumnParallelLinear = _NoOutputLayer

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def _without_dense_output_layer():
    import megatron.core.models.gpt.gpt_model as gpt_module

    real = gpt_module.tensor_parallel
    gpt_module.tensor_parallel = _TensorParallelWithoutOutputLinear(real)
    try:
        yield
    finally:
        gpt_module.tensor_parallel = real


class LossHeadGPTModel(GPTModel):
    """A GPTModel whose output layer computes the training loss itself from the hidden states.

    Subclasses set `self.output_layer` to a module with `loss(hidden [s, b, h], labels [s, b]) -> [s, b]`
    (its forward still returns logits). With labels, forward() routes the hidden states to that loss through
    GPTModel's `output_processor` hook, so the [s, b, V] logits are never built and the return contract
    (per-token loss [b, s]) is unchanged. Such a head is never tied to the embedding and has no MTP.
    GPTModel's own V×d output layer is never allocated (at V=256k, d=8k that would be 2 B parameters built
    and initialised only to be thrown away).
    """

    head_name = "this output layer"

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, **kwargs):
        if kwargs.pop("share_embeddings_and_output_weights", False):
            raise ValueError(f"{type(self).__name__} cannot tie embeddings and output weights")
        if config.mtp_num_layers:
            raise ValueError(f"multi-token prediction heads are not supported with {self.head_name}")
        with _without_dense_output_layer():
            super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length,
                             share_embeddings_and_output_weights=False, **kwargs)

    def head_device(self):
        return torch.device("cpu") if self.config.use_cpu_initialization else torch.cuda.current_device()

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, **kwargs):
        if labels is not None and self.post_process and kwargs.get("output_processor") is None:
            kwargs["output_processor"] = self._head_language_model_loss
        return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                               labels=labels, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """dist_checkpointing state: skip LanguageModule's output-weight handling (it indexes
        `output_layer.weight`, which these heads do not have; they are never tied, MTP is rejected);
        the head's own sharded_state_dict handles any vocab padding itself."""
        from megatron.core.transformer.module import MegatronModule
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        state = MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                  ensure_metadata_has_dp_cp_group(metadata))
        state.pop(f"{prefix}output_layer._extra_state", None)
        return state

    def _head_language_model_loss(self, *, hidden_states, labels, **_unused):
        """Megatron's compute_language_model_loss contract: labels [b, s] -> per-token loss [b, s]."""
        loss = self.output_layer.loss(hidden_states, labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()


class VQGPTModel(LossHeadGPTModel):
    """GPTModel with VQOutputLayer as its output layer; the training loss uses the exact collapse."""

    head_name = "the VQ output layer"

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, *, vq_config: VQLogitsConfig, token_counts=None,
                 embeddings=None, init_from_data: bool = True, **kwargs):
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        if self.post_process:
            self.output_layer = VQOutputLayer(
                vq_config, padded_vocab_size=vocab_size, tp_group=self.pg_collection.tp,
                sequence_parallel=config.sequence_parallel, gather_output=not self.parallel_output,
                params_dtype=config.params_dtype, device=self.head_device(), token_counts=token_counts,
                embeddings=embeddings, init_from_data=init_from_data)
            self.output_layer.codebook.is_embedding_or_output_parameter = True


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
                    weights_from_checkpoint: bool = False, init_seed: int | None = None) -> GPTModel:
    """Build the GPT body (model.layer_spec: megatron-core's local modules, with a sequence-parallel norm
    when SP is on, or Transformer Engine's) and the head named by output_layer.

    weights_from_checkpoint: every weight (the VQ map included) is about to be loaded, so the head skips
    its data-dependent initialisation (token counts, k-means of embedding files) and needs no data.
    init_seed: draw the embedding's and every layer's initial weights from streams of their own
    (models/seeding.py), so this seed gives the same model at every pipeline layout; None keeps megatron's
    single build-order stream.
    """
    config = model_cfg.transformer_config(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                          sequence_parallel=sequence_parallel, params_dtype=params_dtype)
    layer_spec = gpt_layer_spec(config, model_cfg.layer_spec)
    if init_seed is not None:
        layer_spec = seeded_layer_spec(layer_spec, init_seed)
    common = dict(
        config=config, transformer_layer_spec=layer_spec,
        vocab_size=padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by,
                                     tensor_parallel),
        max_sequence_length=model_cfg.seq_length, pre_process=pre_process, post_process=post_process,
        position_embedding_type=model_cfg.position_embedding_type)
    with seeded_gpt_components(init_seed) if init_seed is not None else contextlib.nullcontext():
        return _build_head_model(model_cfg, common, token_counts, embeddings, weights_from_checkpoint)


def _build_head_model(model_cfg: ModelConfig, common: dict, token_counts, embeddings,
                      weights_from_checkpoint: bool) -> GPTModel:
    if model_cfg.output_layer == "dense":
        return GPTModel(share_embeddings_and_output_weights=model_cfg.tie_embeddings, **common)
    if model_cfg.output_layer == "adaptive":
        return AdaptiveGPTModel(real_vocab_size=model_cfg.vocab_size, cutoffs=model_cfg.adaptive_cutoffs or None,
                                div_value=model_cfg.adaptive_div_value, token_counts=token_counts, **common)
    return VQGPTModel(vq_config=model_cfg.vq_config(), token_counts=token_counts, embeddings=embeddings,
                      init_from_data=not weights_from_checkpoint, **common)


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
