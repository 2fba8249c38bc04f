"""Two-stage training: a short dense warm-up, then a VQ head initialised from the dense output embeddings.

Reads DeepSpeed checkpoints written by the training driver through integration.checkpoint (verified
against their manifests). `dense_output_embeddings` concatenates the output_layer.weight TP shards
(dim 0) into the [V_pad, d] rows that `model.vq_init_embeddings` + `vq.map_init=kmeans` +
`vq.codebook_init=kmeans` cluster; `load_body_weights` is `model.init_from` (everything but the head).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vq_megatron.integration.checkpoint import load_model_shards, resolve_checkpoint

__all__ = ["dense_output_embeddings", "load_body_weights"]


def dense_output_embeddings(path: str | Path, tag: str | None = None) -> torch.Tensor:
    """[V_pad, d] output embedding rows of a dense run (output_layer.weight, TP shards concatenated)."""
    states = load_model_shards(path, tag)
    key = "output_layer.weight"
    if key not in states[0]:
        if "embedding.word_embeddings.weight" in states[0] and not any(k.startswith("output_layer.")
                                                                        for k in states[0]):
            key = "embedding.word_embeddings.weight"   # tied dense model: the output rows are the input rows
        else:
            raise KeyError(f"{resolve_checkpoint(path, tag)} has no output_layer.weight: not a dense GPTModel "
                           f"checkpoint (keys: {sorted(k for k in states[0] if k.startswith('output_layer'))})")
    return torch.cat([s[key].float() for s in states], dim=0)


@torch.no_grad()
def load_body_weights(model: torch.nn.Module, path: str | Path, tag: str | None = None) -> str:
    """Copy every parameter/buffer except output_layer.* from a checkpoint with the same TP size into
    `model` (this rank's shard). Returns the checkpoint directory used."""
    tp_rank, tp_size = 0, 1
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    except ImportError:  # pragma: no cover
        pass
    ckpt = resolve_checkpoint(path, tag)
    states = load_model_shards(ckpt)
    if len(states) != tp_size:
        raise ValueError(f"{ckpt} has {len(states)} TP shards; this run has tensor_parallel={tp_size} "
                         "(init_from needs the same TP size)")
    source = {k: v for k, v in states[tp_rank].items()
              if not k.startswith("output_layer.") and not k.endswith("_extra_state")}
    own = {k for k in model.state_dict() if not k.startswith("output_layer.") and not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - set(source)), sorted(set(source) - own)
    if missing or unexpected:
        raise KeyError(f"init_from {ckpt}: body mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}")
    target = model.state_dict()
    for k in own:
        if target[k].shape != source[k].shape:
            raise ValueError(f"init_from {ckpt}: {k} has shape {tuple(source[k].shape)}, model has "
                             f"{tuple(target[k].shape)}")
        target[k].copy_(source[k].to(target[k].dtype))
    return str(ckpt)
