"""Vocabulary sharding metadata: Megatron's padding rule and partition tags on vocab-sharded tensors.

megatron-core tags tensor-parallel parameters with `tensor_model_parallel`, `partition_dim` and
`partition_stride` so optimizers and checkpoints can treat them right without special cases. The VQ head's
vocab-sharded *buffers* (the token→code map) carry the same tags plus the value of padded slots, so that
resharding a checkpoint to another TP size is generic: concatenate along `partition_dim`, re-pad with
`vocab_pad_value`, split.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

__all__ = ["padded_vocab_size", "mark_vocab_sharded", "vocab_pad_value", "is_vocab_sharded"]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: round V up to a multiple of divisible_by · TP."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def mark_vocab_sharded(tensor: torch.Tensor, pad_value: float | int = 0) -> torch.Tensor:
    """Tag a tensor sharded by vocabulary range along dim 0 (padded slots hold `pad_value`)."""
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(tensor, name):   # megatron's setter refuses to overwrite; re-tagging is ours to do
            delattr(tensor, name)
    set_tensor_model_parallel_attributes(tensor, is_parallel=True, dim=0, stride=1)
    tensor.vocab_pad_value = pad_value
    return tensor


def is_vocab_sharded(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, "tensor_model_parallel", False)) and getattr(tensor, "partition_dim", None) == 0


def vocab_pad_value(tensor: torch.Tensor) -> float | int:
    """What padded vocabulary slots of a tagged tensor hold (0 unless tagged otherwise, e.g. -1 for a map)."""
    return getattr(tensor, "vocab_pad_value", 0)
