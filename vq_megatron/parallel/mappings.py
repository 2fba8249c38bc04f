"""Communication of the VQ layer, named by what it does to the tensor in both directions.

The differentiable ones delegate to megatron-core's mappings; each returns early when the layer is not
tensor-parallel (group None or a single rank), so the same code runs in one process without
torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings as mcore

__all__ = [
    "copy_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
    "gather_from_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "combine_over_tensor_parallel_region", "all_gather_rows",
    "broadcast_from_first_rank",
]


def _single(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """forward: identity; backward: all-reduce (sum) of the gradient over TP, into a fresh tensor.

    megatron's _CopyToModelParallelRegion all-reduces the incoming gradient in place. Autograd may hand
    the very same gradient tensor to several inputs (an addition passes its gradient to both operands):
    when two of them enter through a copy, the second would sum an already summed gradient.
    """

    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tensor_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """forward: identity; backward: all-reduce (sum) over TP — for inputs of computations each rank does
    only part of (its vocabulary, its tokens), whose partial gradients must be summed."""
    return input_ if _single(group) else _CopyToTensorParallelRegion.apply(input_, group)


def gather_from_tensor_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """forward: all-gather along the last dim; backward: keep this rank's slice."""
    return input_ if _single(group) else mcore.gather_from_tensor_model_parallel_region(input_, group)


def gather_from_sequence_parallel_region(input_: torch.Tensor, group, *, sharded_consumer: bool) -> torch.Tensor:
    """forward: all-gather along the sequence (first) dim.

    backward: reduce-scatter when what follows is vocab-sharded (each rank holds a partial gradient),
    split when what follows is duplicated on every rank (each rank already holds the full gradient).
    """
    if _single(group):
        return input_
    return mcore.gather_from_sequence_parallel_region(
        input_, tensor_parallel_output_grad=sharded_consumer, group=group)


def scatter_to_sequence_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """forward: keep this rank's chunk along the first dim; backward: all-gather the chunks' gradients (each
    rank then holds the full input gradient, as a replicated input needs)."""
    return input_ if _single(group) else mcore.scatter_to_sequence_parallel_region(input_, group=group)


def combine_over_tensor_parallel_region(parts: list[tuple[torch.Tensor, str]], group) -> list[torch.Tensor]:
    """Per-rank partial results combined over TP with ONE all-gather: each (tensor, 'sum' | 'logsumexp').

    forward: every rank gets the same combined tensors (shapes kept). backward: each rank keeps the
    gradient of its own partials, which is right when what consumes the result is computed identically on
    every rank (each then holds the full gradient); put the result through copy_to_tensor_parallel_region
    when a vocab-sharded computation consumes it. A logsumexp partial of -inf (nothing on this rank) is
    clamped to a huge finite floor so the gradient stays finite: exp(floor) is still exactly 0 next to any
    real term.
    """
    if _single(group) or not parts:
        return [tensor for tensor, _ in parts]
    flat = []
    for tensor, how in parts:
        if how not in ("sum", "logsumexp"):
            raise ValueError(f"combine must be 'sum' or 'logsumexp', got {how!r}")
        piece = tensor.reshape(-1)
        if how == "logsumexp":
            piece = piece.clamp(min=torch.finfo(piece.dtype).min / 4)
        flat.append(piece)
    dtype = torch.float32
    for piece in flat:
        dtype = torch.promote_types(dtype, piece.dtype)
    gathered = gather_from_tensor_parallel_region(torch.cat([f.to(dtype) for f in flat]).unsqueeze(-1), group)
    out, start = [], 0
    for (tensor, how), piece in zip(parts, flat):
        block = gathered[start:start + piece.numel()]
        start += piece.numel()
        combined = torch.logsumexp(block, dim=-1) if how == "logsumexp" else block.sum(-1)
        out.append(combined.view(tensor.shape))
    return out


@torch.no_grad()
def all_gather_rows(input_: torch.Tensor, group) -> torch.Tensor:
    """Non-differentiable all-gather along dim 0 (used for the static token→code map)."""
    if _single(group):
        return input_
    out = torch.empty((dist.get_world_size(group) * input_.shape[0], *input_.shape[1:]),
                      dtype=input_.dtype, device=input_.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, input_.contiguous(), group=group)
    return out


@torch.no_grad()
def broadcast_from_first_rank(tensor: torch.Tensor, group) -> torch.Tensor:
    """In place: every TP rank takes TP rank 0's values (replicas must agree bit for bit)."""
    if not _single(group):
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor
