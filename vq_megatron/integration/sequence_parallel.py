"""Sequence parallelism under DeepSpeed: sum the gradients of the parameters megatron marks
`sequence_parallel` over the TP group.

Such parameters (norm weights and biases, RowParallelLinear biases added after the reduce-scatter) are
replicated over TP but applied to each rank's slice of the sequence, so each rank's gradient is a partial
sum. megatron-core reduces them in its own finalize_model_grads; DeepSpeed knows nothing of them. A hook on
each parameter all-reduces its gradient as backward produces it, before the gradient is accumulated, so
DeepSpeed (ZeRO 1/2 included) only ever sees complete gradients. Collective: every TP rank runs the same
backward, so the hooks fire in the same order everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["sequence_parallel_parameters", "reduce_sequence_parallel_grads"]


def sequence_parallel_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


def reduce_sequence_parallel_grads(model: torch.nn.Module, group) -> list:
    """Install the all-reduce hooks; returns their handles (remove() undoes them). No-op on one rank."""
    if group is None or dist.get_world_size(group) == 1:
        return []

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return [p.register_hook(all_reduce) for p in sequence_parallel_parameters(model)]
