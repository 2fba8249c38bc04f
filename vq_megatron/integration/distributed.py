"""Start and stop torch.distributed + megatron-core parallel state, on GPUs (NCCL) or CPUs (gloo)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from vq_megatron.integration.cpu_shims import cpu_shims, model_parallel_seed

__all__ = ["default_backend", "local_device", "init_parallel", "shutdown_parallel"]

# The CPU shims init_parallel applied, for shutdown_parallel to undo (shims a caller applied stay).
_cpu_shims = contextlib.ExitStack()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """The device of this rank: its local GPU under NCCL, the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, *, seed: int = 1234,
                  backend: str | None = None) -> None:
    """Initialise torch.distributed from torchrun/deepspeed env vars and megatron's parallel groups."""
    from megatron.core import parallel_state

    backend = backend or os.environ.get("VQ_DIST_BACKEND") or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _cpu_shims.enter_context(cpu_shims())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel={tensor_parallel} x "
                         f"pipeline_parallel={pipeline_parallel}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             pipeline_model_parallel_size=pipeline_parallel)
    model_parallel_seed(seed)


def shutdown_parallel(barrier: bool = True) -> None:
    """Tear down in order; without destroy_process_group gloo runs sometimes abort at exit. Then undo the
    CPU shims init_parallel applied, also when teardown fails."""
    from megatron.core import parallel_state

    try:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        _cpu_shims.close()
