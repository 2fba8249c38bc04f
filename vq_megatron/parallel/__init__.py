"""Tensor-parallel plumbing for the VQ output layer (Megatron mappings.py style)."""

from vq_megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from vq_megatron.parallel.groups import TensorParallelInfo, tensor_parallel_info
from vq_megatron.parallel.vocab_sharding import (is_vocab_sharded, mark_vocab_sharded, padded_vocab_size,
                                                 vocab_pad_value)
from vq_megatron.parallel.mappings import (
    all_gather_rows,
    broadcast_from_first_rank,
    combine_over_tensor_parallel_region,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    scatter_to_sequence_parallel_region,
)

__all__ = [
    "is_vocab_sharded", "mark_vocab_sharded", "padded_vocab_size", "vocab_pad_value",
    "TensorParallelInfo", "tensor_parallel_info", "vocab_parallel_cross_entropy", "all_gather_rows",
    "broadcast_from_first_rank", "combine_over_tensor_parallel_region", "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region", "gather_from_tensor_parallel_region", "scatter_to_sequence_parallel_region",
]
