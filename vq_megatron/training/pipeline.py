"""Pipeline parallel steps: megatron-core's own schedules (1F1B) driven under the DeepSpeed engine.

A training step hands the step's micro-batches to get_forward_backward_func() (1F1B for PP > 1), which
runs every forward and backward, sending activations and their gradients between stages. The model it
drives is the DeepSpeed engine, so DeepSpeed's ZeRO-1/2 optimizer accumulates the gradients of the
schedule's backward calls (torch-style backward; DeepSpeed's config then has
managed_gradient_accumulation=false and gradient_accumulation_steps=1, see trainer.deepspeed_config: the
schedule already divides the loss by the number of micro-batches) and reduces them over data parallel in
engine.step(). Only the last stage computes losses; they are broadcast to the other stages.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from vq_megatron.integration.cpu_shims import cuda_factories_on_cpu
from vq_megatron.training.data import Batch, causal_mask

__all__ = ["pipeline_train_step", "pipeline_windows_nll"]


class _BeforeBackward(torch.autograd.Function):
    """Identity whose backward first calls `hook` (it runs before any hook on the input tensor fires)."""

    @staticmethod
    def forward(ctx, tensor, hook):
        ctx.hook = hook
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.hook()
        return grad, None


class _EngineForSchedule:
    """What the schedule gets as its model: calls go through the DeepSpeed engine (which registers its
    backward hooks on the outputs); attributes the schedule looks up (config, set_input_tensor) come from the
    megatron module through `.module`, never from the engine (whose `config` is DeepSpeed's JSON).

    DeepSpeed's ZeRO optimizer resets its per-backward state (the queued post-backward callback that runs the
    gradient epilogue) in the engine's forward, assuming forward and backward alternate. 1F1B runs several
    forwards before the first backward on every stage but the last (F F B B); the second backward would then
    find the callback "already queued" and skip its epilogue, losing those gradients under ZeRO-2. So the
    reset the next forward would do runs before every backward instead (clear_backward_seen_flag, exactly what
    DeepSpeed's forward calls)."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module

    def __call__(self, *args, **kwargs):
        return _BeforeBackward.apply(self.engine(*args, **kwargs), self.engine.optimizer.clear_backward_seen_flag)


def _mean_loss(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """Megatron's loss_func contract: (loss the schedule backpropagates, logged values). The schedule
    divides the first by num_microbatches in place, so the logged values are copies."""
    loss = (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss, {"loss": loss.detach().clone()}


def _nll_sum(loss_mask: torch.Tensor, per_token: torch.Tensor):
    nll = (per_token.double() * loss_mask).sum()
    return nll, {"nll": nll.detach().clone(), "count": loss_mask.sum().double()}


def _forward_step(loss_func, data_iterator, model):
    """Every stage reads the micro-batch (cheap and deterministic); only the first uses the tokens and
    only the last the labels and mask."""
    batch, mask = next(data_iterator)
    per_token = model(batch.tokens, batch.position_ids, mask, labels=batch.labels)
    return per_token, partial(loss_func, batch.loss_mask)


def _run_schedule(model, batches: list[tuple[Batch, torch.Tensor]], loss_func, *, forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = batches[0][0]
    with cuda_factories_on_cpu():
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_func), data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=batch.tokens.shape[1],
            micro_batch_size=batch.tokens.shape[0], forward_only=forward_only)


def _from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """The last stage's tensor on every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    return values


def pipeline_train_step(engine, batches: list[Batch], mask: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches through the pipeline (gradients
    accumulated, not yet stepped). Returns their mean loss, on every stage."""
    from megatron.core import parallel_state as ps

    results = _run_schedule(_EngineForSchedule(engine), [(b, mask) for b in batches], _mean_loss,
                            forward_only=False)
    loss = torch.zeros((), device=mask.device)
    if ps.is_pipeline_last_stage():
        loss = torch.stack([r["loss"] for r in results]).mean()
    return _from_last_stage(loss)


@torch.no_grad()
def pipeline_windows_nll(model, windows: torch.Tensor, *, micro_batch_size: int, device,
                         group=None) -> tuple[float, int]:
    """windows_nll (training/evaluation.py) through the pipeline's forward-only schedule: the sum of token
    NLLs and the token count over this rank's [n, s+1] windows, summed over `group`. The schedule needs
    equal micro-batches, so a short last one is padded with windows whose loss mask is zero."""
    seq = windows.shape[1] - 1
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if len(windows):
        mask = causal_mask(seq, device)
        batches = []
        for start in range(0, len(windows), micro_batch_size):
            w = windows[start:start + micro_batch_size]
            loss_mask = torch.ones(micro_batch_size, seq)
            loss_mask[len(w):] = 0.0
            w = torch.cat([w, w[:1].expand(micro_batch_size - len(w), -1)])
            positions = torch.arange(seq).expand(micro_batch_size, seq)
            batches.append((Batch(w[:, :-1], w[:, 1:], loss_mask, positions).to(device), mask))
        results = _run_schedule(model, batches, _nll_sum, forward_only=True)
        if results:   # the last stage
            totals = torch.stack([torch.stack([r["nll"] for r in results]).sum(),
                                  torch.stack([r["count"] for r in results]).sum()])
        totals = _from_last_stage(totals)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return float(totals[0]), int(totals[1])
