"""The `model:` section of a run config (no megatron model is imported to read or validate it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.models.layer_specs import LAYER_SPECS

__all__ = ["ModelConfig", "OUTPUT_LAYERS", "BACKBONES"]

OUTPUT_LAYERS = ("dense", "vq", "adaptive")
BACKBONES = ("gpt", "hybrid")


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
    backbone: 'gpt' (megatron-core's GPTModel) or 'hybrid' (megatron-core's HybridModel with the GPT pattern
        "*-" per layer: num_layers attention + num_layers MLP layers; dense and vq heads, PP=1, no MTP).
    mtp_num_layers: multi-token prediction depths (megatron-core's MTP; 0 = off). Every depth goes through the
        output layer's loss (for VQ the collapsed one, never N×V logits); mtp_loss_scaling_factor weighs
        their mean against the main loss (megatron's default 0.1). Dense, vq and adaptive heads; PP=1.
    layer_spec: the body's modules: 'local' (megatron-core's own, any device; with sequence parallelism a
        norm that supports it), 'transformer_engine' (Transformer Engine's fused modules; needs TE), or
        'auto' (Transformer Engine on a GPU when it is importable, else local).
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
    layer_spec: str = "auto"
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    backbone: str = "gpt"

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
        if self.mtp_num_layers < 0 or self.mtp_loss_scaling_factor < 0:
            raise ValueError("model.mtp_num_layers and model.mtp_loss_scaling_factor must be >= 0")
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone={self.backbone!r} is not one of {BACKBONES}")
        if self.backbone == "hybrid" and (self.output_layer == "adaptive" or self.mtp_num_layers):
            raise ValueError("model.backbone=hybrid supports output_layer dense or vq without multi-token "
                             "prediction; use backbone: gpt for output_layer=adaptive or mtp_num_layers > 0")
        if self.layer_spec not in LAYER_SPECS:
            raise ValueError(f"model.layer_spec={self.layer_spec!r} is not one of {LAYER_SPECS}")
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
                           use_cpu_initialization: bool | None = None):
        """megatron-core's TransformerConfig of the body (imported here: reading a run config needs no
        megatron)."""
        from megatron.core.transformer import TransformerConfig

        if self.num_attention_heads % tensor_parallel:
            raise ValueError(f"tensor_parallel={tensor_parallel} must divide model.num_attention_heads="
                             f"{self.num_attention_heads}")
        if self.num_layers % pipeline_parallel:
            raise ValueError(f"pipeline_parallel={pipeline_parallel} must divide model.num_layers={self.num_layers}")
        return TransformerConfig(
            # HybridModel counts attention and MLP layers separately: a GPT layer is two of them
            num_layers=self.num_layers * (2 if self.backbone == "hybrid" else 1), hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
            hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std, tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            mtp_num_layers=self.mtp_num_layers or None, mtp_loss_scaling_factor=self.mtp_loss_scaling_factor,
            sequence_parallel=sequence_parallel and tensor_parallel > 1,
            params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
            pipeline_dtype=params_dtype,
            use_cpu_initialization=(not torch.cuda.is_available() if use_cpu_initialization is None
                                    else use_cpu_initialization),
            cuda_graph_modules=[],   # megatron's default "full" warns that it is deprecated; [] is the same
        )
