"""One factory that reads `output_layer: dense|vq|adaptive` and builds a megatron-core GPTModel.

dense: megatron-core's own GPTModel (ColumnParallelLinear head, vocab-parallel cross-entropy).
vq:    VQGPTModel, a GPTModel whose output layer is VQOutputLayer. With labels, its forward computes the
       collapsed loss through GPTModel's `output_processor` hook, so the N×V logits are never built and
       the return contract is unchanged (per-token loss [b, s]); without labels it returns logits.
adaptive: AdaptiveGPTModel (vq_megatron/layers/adaptive_softmax.py), adaptive softmax over frequency-ranked
       token ids, the classic peer of VQ-Logits in the ablations (TP=1 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import VQOutputLayer

__all__ = ["ModelConfig", "LossHeadGPTModel", "VQGPTModel", "build_gpt_model", "padded_vocab_size", "output_layer_parameters",
           "OUTPUT_LAYERS"]

OUTPUT_LAYERS = ("dense", "vq", "adaptive")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: round V up to a multiple of divisible_by · TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    """The `model:` section of a training YAML.

    output_layer: 'dense' (Megatron ColumnParallelLinear) or 'vq' (VQ-Logits, options in `vq`).
    vocab_size: real tokenizer vocabulary; the model pads it to make_vocab_size_divisible_by · TP.
    tie_embeddings: share input embedding and output weight (dense only; VQ has no V×d weight).
    vq: VQLogitsConfig options except vocab_size/hidden_size (codebook_size, map_init, ...).
    vq_init_embeddings: .npy/.pt file of [V(+padding), d'] rows clustered by vq.map_init=kmeans (e.g. the
        output weight of a dense checkpoint); with vq.codebook_init=kmeans, d' must equal hidden_size.
    adaptive_cutoffs: cluster cutoffs of output_layer=adaptive (adaptive softmax, TP=1; token ids are ranked
        by training-data frequency first); empty = [V/8, V/2]. adaptive_div_value: its tail shrink factor.
    init_from: a dense run directory (or one of its step_* checkpoint directories) whose body weights (all
        but output_layer.*) initialise this model before training (two-stage dense -> VQ).
    """

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    seq_length: int = 128
    vocab_size: int = 8000
    make_vocab_size_divisible_by: int = 128
    output_layer: str = "vq"
    tie_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    position_embedding_type: str = "learned_absolute"
    vq: dict = field(default_factory=dict)
    vq_init_embeddings: str = ""
    adaptive_cutoffs: list = field(default_factory=list)
    adaptive_div_value: float = 4.0
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"model.output_layer={self.output_layer!r} is not one of {OUTPUT_LAYERS}")
        if self.output_layer != "dense" and self.tie_embeddings:
            raise ValueError(f"model.tie_embeddings=true needs output_layer: dense (a {self.output_layer} "
                             "head has no V×d weight to tie)")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.output_layer == "vq":
            vq = self.vq_config()  # validate the vq: options now, with a clear error
            if vq.map_init == "kmeans" and not self.vq_init_embeddings:
                raise ValueError("model.vq.map_init=kmeans needs model.vq_init_embeddings (a .npy/.pt of "
                                 "[V, d] rows, e.g. a dense model's output weight)")

    def vq_config(self) -> VQLogitsConfig:
        return VQLogitsConfig.from_dict(self.vq, vocab_size=self.vocab_size, hidden_size=self.hidden_size)

    def transformer_config(self, *, tensor_parallel: int, pipeline_parallel: int = 1,
                           sequence_parallel: bool = False, params_dtype=torch.float32,
                           use_cpu_initialization: bool | None = None) -> TransformerConfig:
        if self.num_attention_heads % tensor_parallel:
            raise ValueError(f"tensor_parallel={tensor_parallel} must divide model.num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.num_layers % pipeline_parallel:
            raise ValueError(f"pipeline_parallel={pipeline_parallel} must divide model.num_layers={self.num_layers}")
        return TransformerConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
            hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std, tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            sequence_parallel=sequence_parallel and tensor_parallel > 1,
            params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
            pipeline_dtype=params_dtype,
            use_cpu_initialization=(not torch.cuda.is_available() if use_cpu_initialization is None
                                    else use_cpu_initialization),
        )


class LossHeadGPTModel(GPTModel):
    """A GPTModel whose output layer computes the training loss itself from the hidden states.

    Subclasses set `self.output_layer` to a module with `loss(hidden [s, b, h], labels [s, b]) -> [s, b]`
    (its forward still returns logits). With labels, forward() routes the hidden states to that loss through
    GPTModel's `output_processor` hook, so the [s, b, V] logits are never built and the return contract
    (per-token loss [b, s]) is unchanged. Such a head is never tied to the embedding and has no MTP.
    """

    head_name = "this output layer"

    def __init__(self, config: TransformerConfig, transformer_layer_spec, vocab_size: int,
                 max_sequence_length: int, **kwargs):
        if kwargs.pop("share_embeddings_and_output_weights", False):
            raise ValueError(f"{type(self).__name__} cannot tie embeddings and output weights")
        if config.mtp_num_layers:
            raise ValueError(f"multi-token prediction heads are not supported with {self.head_name}")
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
                 embeddings=None, **kwargs):
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        if self.post_process:
            # Replaces the dense V×d ColumnParallelLinear built by GPTModel.__init__ (freed here).
            self.output_layer = VQOutputLayer(
                vq_config, padded_vocab_size=vocab_size, tp_group=self.pg_collection.tp,
                sequence_parallel=config.sequence_parallel, gather_output=not self.parallel_output,
                params_dtype=config.params_dtype, device=self.head_device(), token_counts=token_counts,
                embeddings=embeddings)
            self.output_layer.codebook.is_embedding_or_output_parameter = True


def build_gpt_model(model_cfg: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                    sequence_parallel: bool = False, params_dtype=torch.float32, pre_process: bool = True,
                    post_process: bool = True, token_counts=None, embeddings=None) -> GPTModel:
    """Build the GPT body from megatron-core's local layer spec and the head named by output_layer."""
    config = model_cfg.transformer_config(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                          sequence_parallel=sequence_parallel, params_dtype=params_dtype)
    common = dict(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by,
                                     tensor_parallel),
        max_sequence_length=model_cfg.seq_length, pre_process=pre_process, post_process=post_process,
        position_embedding_type=model_cfg.position_embedding_type)
    if model_cfg.output_layer == "dense":
        return GPTModel(share_embeddings_and_output_weights=model_cfg.tie_embeddings, **common)
    if model_cfg.output_layer == "adaptive":
        from vq_megatron.layers.adaptive_softmax import AdaptiveGPTModel

        return AdaptiveGPTModel(real_vocab_size=model_cfg.vocab_size, cutoffs=model_cfg.adaptive_cutoffs or None,
                                div_value=model_cfg.adaptive_div_value, token_counts=token_counts, **common)
    return VQGPTModel(vq_config=model_cfg.vq_config(), token_counts=token_counts, embeddings=embeddings,
                      **common)


def output_layer_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters of this rank's output layer (0 for a tied dense head, whose weight is the
    input embedding)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return 0
    return sum(p.numel() for p in layer.parameters() if p.requires_grad)


