"""What every megatron language model with a loss head shares (GPTModel and HybridModel here).

A loss head is an output layer with `loss(hidden [s, b, h], labels [s, b]) -> [s, b]` that computes the
training loss from the hidden states itself (VQ: the exact collapse; adaptive softmax), while its forward
still returns logits. The model must never allocate its own V×d ColumnParallelLinear (at V=256k, d=8k
that is 2 B parameters built and initialised only to be thrown away), and its distributed-checkpoint state
must not go through LanguageModule's handling of `output_layer.weight`, which these heads do not have.
"""

from __future__ import annotations

import contextlib

import torch

from vq_megatron.layers import VQOutputLayer

__all__ = ["LossHeadMixin", "without_dense_output_layer"]


class _NoOutputLayer(torch.nn.Module):
    """What the model's __init__ builds instead of its V×d ColumnParallelLinear while a loss head is built: no
    weight at all (megatron only checks `weight is None` before the head replaces it)."""

    weight = None

    def __init__(self, *args, config, **kwargs):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel


class _TensorParallelWithoutOutputLinear:
    """megatron.core.tensor_parallel as the model module sees it, but ColumnParallelLinear builds nothing. The
    decoder's linears come from its layer spec, not from this name, so only the output layer is affected."""

    ColumnParallelLinear = _NoOutputLayer

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def without_dense_output_layer(model_module):
    """While a model of `model_module` (megatron's gpt_model or hybrid_model module) is built, its output
    ColumnParallelLinear allocates nothing."""
    real = model_module.tensor_parallel
    model_module.tensor_parallel = _TensorParallelWithoutOutputLinear(real)
    try:
        yield
    finally:
        model_module.tensor_parallel = real


class LossHeadMixin:
    """For LanguageModule subclasses whose `output_layer` is a loss head (set after the model's __init__)."""

    head_name = "this output layer"

    @staticmethod
    def check_loss_head_options(model_name: str, head_name: str, config, tied: bool) -> None:
        if tied:
            raise ValueError(f"{model_name} cannot tie embeddings and output weights")
        if config.mtp_num_layers and config.mtp_detach_heads:
            raise ValueError(f"mtp_detach_heads detaches an output weight, which {head_name} does not have")

    def head_device(self):
        return torch.device("cpu") if self.config.use_cpu_initialization else torch.cuda.current_device()

    def build_vq_head(self, vq_config, vocab_size: int, *, token_counts=None, embeddings=None,
                      init_from_data: bool = True) -> None:
        config = self.config
        self.output_layer = VQOutputLayer(
            vq_config, padded_vocab_size=vocab_size, tp_group=self.pg_collection.tp,
            sequence_parallel=config.sequence_parallel, gather_output=not self.parallel_output,
            params_dtype=config.params_dtype, device=self.head_device(), token_counts=token_counts,
            embeddings=embeddings, init_from_data=init_from_data)
        self.output_layer.codebook.is_embedding_or_output_parameter = True

    def head_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Megatron's compute_language_model_loss contract: hidden [s, b, h], labels [b, s] -> loss [b, s]."""
        loss = self.output_layer.loss(hidden_states, labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """dist_checkpointing state: skip LanguageModule's output-weight handling (it indexes
        `output_layer.weight`, which these heads do not have; they are never tied); the head's own
        sharded_state_dict handles any vocab padding itself."""
        from megatron.core.transformer.module import MegatronModule
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        state = MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                  ensure_metadata_has_dp_cp_group(metadata))
        state.pop(f"{prefix}output_layer._extra_state", None)
        return state
