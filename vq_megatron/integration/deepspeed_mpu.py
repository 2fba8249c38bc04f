"""The `mpu` object DeepSpeed expects, over megatron-core's parallel_state.

DeepSpeed asks the mpu for get_model_parallel_{rank,world_size,group}, which megatron-core no longer has.
Passing mpu=None runs but is silently wrong: DeepSpeed then averages gradients across TP ranks as if they
were data-parallel replicas, and the losses drift away from the TP=1 run.

"Model parallel" here is the whole model-parallel group, tensor × pipeline (megatron-core's
get_model_parallel_group), because DeepSpeed uses it for two things that must span the pipeline stages:
  - the global gradient norm (clipping) is summed over this group: every stage holds other parameters;
  - checkpoint file names carry get_model_parallel_rank() (mp_rank_XX_...): every stage of every TP rank
    needs its own file, so the rank is pipeline_rank · TP + tensor_rank (equal to the TP rank at PP=1).
Which replicated parameters count once in the norm, DeepSpeed's ZeRO decides by the *tensor* rank
(get_tensor_model_parallel_rank, forwarded unchanged), so a stage's replicated parameters are counted on its
TP rank 0.
"""

from __future__ import annotations

__all__ = ["MegatronMPU", "model_parallel_file_rank", "split_model_parallel_file_rank"]


def model_parallel_file_rank(pipeline_rank: int, tensor_rank: int, tensor_parallel: int) -> int:
    """The mp_rank of DeepSpeed's checkpoint file names for one (pipeline stage, TP rank)."""
    return pipeline_rank * tensor_parallel + tensor_rank


def split_model_parallel_file_rank(mp_rank: int, tensor_parallel: int) -> tuple[int, int]:
    """(pipeline stage, TP rank) of an mp_rank written by model_parallel_file_rank."""
    return divmod(mp_rank, tensor_parallel)


class MegatronMPU:
    """Forwards everything to parallel_state; adds the three legacy model-parallel names (TP × PP)."""

    def __init__(self, parallel_state=None):
        if parallel_state is None:
            from megatron.core import parallel_state
        self._ps = parallel_state

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_rank(self):
        return model_parallel_file_rank(self._ps.get_pipeline_model_parallel_rank(),
                                        self._ps.get_tensor_model_parallel_rank(),
                                        self._ps.get_tensor_model_parallel_world_size())

    def get_model_parallel_world_size(self):
        return (self._ps.get_tensor_model_parallel_world_size()
                * self._ps.get_pipeline_model_parallel_world_size())

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()
