"""Which tensor-parallel group the layer lives in: an explicit group, Megatron's, or none (1 rank)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["TensorParallelInfo", "tensor_parallel_info"]


@dataclass(frozen=True)
class TensorParallelInfo:
    group: object | None      # None: a single process without torch.distributed / parallel_state
    size: int
    rank: int


def tensor_parallel_info(group=None) -> TensorParallelInfo:
    """Resolve the TP group: the given one, else megatron-core's if initialised, else a single rank."""
    if group is None:
        from megatron.core import parallel_state

        if not (dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
            return TensorParallelInfo(None, 1, 0)
        group = parallel_state.get_tensor_model_parallel_group()
    return TensorParallelInfo(group, dist.get_world_size(group), dist.get_rank(group))
