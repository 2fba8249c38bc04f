"""Re-cluster a VQ head's map during training from the model's own input embedding rows."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vq_megatron.layers import VQOutputLayer

__all__ = ["gather_input_embeddings", "recluster_from_input_embeddings"]


@torch.no_grad()
def gather_input_embeddings(model, vocab_size: int, tp_group=None) -> torch.Tensor:
    """The full [V, d] input embedding rows: `embedding.word_embeddings.weight` is vocab-sharded
    [V_pad/T, d]; all-gather the shards over the TP group and cut the padding."""
    weight = model.embedding.word_embeddings.weight.detach()
    if tp_group is None and dist.is_initialized():
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp_group = ps.get_tensor_model_parallel_group()
    world = dist.get_world_size(tp_group) if (dist.is_initialized() and tp_group is not None) else 1
    if world > 1:
        shards = [torch.empty_like(weight) for _ in range(world)]
        dist.all_gather(shards, weight.contiguous(), group=tp_group)
        weight = torch.cat(shards, dim=0)
    if weight.shape[0] < vocab_size:
        raise ValueError(f"input embedding has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return weight[:vocab_size].float()


@torch.no_grad()
def recluster_from_input_embeddings(model, *, method: str = "kmeans", reinit_codebook: bool = False,
                                    tp_group=None) -> float:
    """Rebuild model.output_layer's map from the input embeddings; returns the fraction of tokens moved."""
    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, VQOutputLayer):
        raise TypeError("recluster needs a model whose output_layer is a VQOutputLayer")
    rows = gather_input_embeddings(model, layer.vocab_size, tp_group if tp_group is not None else layer.tp.group)
    return layer.rebuild_map(rows, method=method, reinit_codebook=reinit_codebook)
