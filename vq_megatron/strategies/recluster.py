"""Re-cluster a VQ head's map during training from the model's own input embedding rows."""

from __future__ import annotations

import torch

from vq_megatron.layers import VQOutputLayer
from vq_megatron.parallel import all_gather_rows, tensor_parallel_info

__all__ = ["gather_input_embeddings", "recluster_from_input_embeddings"]


@torch.no_grad()
def gather_input_embeddings(model, vocab_size: int, tp_group=None) -> torch.Tensor:
    """The full [V, d] input embedding rows: `embedding.word_embeddings.weight` is vocab-sharded
    [V_pad/T, d]; all-gather the shards over the TP group and cut the padding."""
    weight = all_gather_rows(model.embedding.word_embeddings.weight.detach(), tensor_parallel_info(tp_group).group)
    if weight.shape[0] < vocab_size:
        raise ValueError(f"input embedding has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return weight[:vocab_size].float()


@torch.no_grad()
def recluster_from_input_embeddings(model, *, method: str = "kmeans", reinit_codebook: bool = False,
                                    tp_group=None, replica_group=None) -> float:
    """Rebuild model.output_layer's map from the input embeddings; returns the fraction of tokens moved.

    replica_group: the data-parallel group in training; every replica installs the first one's map."""
    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, VQOutputLayer):
        raise TypeError("recluster needs a model whose output_layer is a VQOutputLayer")
    rows = gather_input_embeddings(model, layer.vocab_size, tp_group if tp_group is not None else layer.tp.group)
    return layer.rebuild_map(rows, method=method, reinit_codebook=reinit_codebook, replica_group=replica_group)
