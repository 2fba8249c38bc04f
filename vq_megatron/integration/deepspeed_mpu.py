"""The `mpu` object DeepSpeed expects, over megatron-core's parallel_state.

DeepSpeed asks the mpu for get_model_parallel_{rank,world_size,group}, which megatron-core no longer has.
Passing mpu=None runs but is silently wrong: DeepSpeed then averages gradients across TP ranks as if they
were data-parallel replicas, and the losses drift away from the TP=1 run.
"""

from __future__ import annotations

__all__ = ["MegatronMPU"]


class MegatronMPU:
    """Forwards everything to parallel_state; adds the three legacy model-parallel names (TP here)."""

    def __init__(self, parallel_state=None):
        if parallel_state is None:
            from megatron.core import parallel_state
        self._ps = parallel_state

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()
