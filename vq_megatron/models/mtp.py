"""Multi-token prediction (MTP) through a loss head: every MTP depth gets the collapsed loss, no N×V logits.

megatron-core's GPTModel sends each MTP depth's hidden states through `output_layer(...)` for [s, b, V]
logits and then through its vocab-parallel cross-entropy (multi_token_prediction.process_mtp_loss). With a
VQ head that would build the logits the head exists to avoid, once per depth, so head cost would grow with
1 + mtp_num_layers. `head_mtp_loss` is that function with the logits step replaced by the head's own loss;
the rest is megatron's: labels and loss mask rolled one token per depth, each depth's loss normalised by its
token count and scaled by mtp_loss_scaling_factor / mtp_num_layers, and handed to the main loss's backward
through MTPLossAutoScaler (whose scale megatron's schedules, or the driver, set per micro-batch).

Not computed: megatron's MTP acceptance counts (the argmax over V of every position); their tracker slots are
left at zero, so only the MTP losses are logged.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

__all__ = ["head_mtp_loss", "mtp_through_head_loss"]


def head_mtp_loss(head_loss, *, hidden_states: torch.Tensor, labels, loss_mask, config, is_training: bool,
                  cp_group=None, packed_seq_params=None, input_ids=None, **_logits_only) -> torch.Tensor:
    """process_mtp_loss's contract (the first chunk of the concatenated hidden states, with every depth's
    loss attached), with head_loss(hidden [s, b, h], labels [b, s]) -> per-token loss [b, s] per depth."""
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import (MTPLossAutoScaler, MTPLossLoggingHelper,
                                                                   roll_tensor)

    depths = config.mtp_num_layers
    chunks = torch.chunk(hidden_states, 1 + depths, dim=0)
    hidden = chunks[0]
    roll = partial(roll_tensor, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed_seq_params)
    derived = labels is None   # RL: labels are the inputs shifted by one, as megatron derives them
    if derived:
        if input_ids is None:
            return hidden
        labels, _ = roll(input_ids)
    labels = labels.clone()
    loss_mask = torch.ones_like(labels) if loss_mask is None else loss_mask
    if derived:
        loss_mask, _ = roll(loss_mask)
    original_tokens = loss_mask.sum()
    scale = config.mtp_loss_scaling_factor / depths
    for depth in range(depths):
        labels, _ = roll(labels)
        loss_mask, num_tokens = roll(loss_mask)
        per_token = loss_mask * head_loss(chunks[depth + 1], labels)
        tokens = num_tokens.clamp(min=1)
        if is_training:
            zero = torch.zeros((), device=per_token.device)
            MTPLossLoggingHelper.save_metrics_to_tracker(
                per_token.sum() * (num_tokens > 0).to(per_token.dtype) / tokens, zero, zero, depth, depths,
                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if config.calculate_per_token_loss:   # finalize_model_grads divides by the main loss's token count
            hidden = MTPLossAutoScaler.apply(hidden, scale * per_token * (original_tokens / tokens))
        else:
            hidden = MTPLossAutoScaler.apply(hidden, scale * per_token / tokens)
    return hidden


@contextlib.contextmanager
def mtp_through_head_loss(model_module, head_loss):
    """While a model of `model_module` (megatron's gpt_model or hybrid_model module) runs its forward, its
    MTP loss goes through head_loss instead of the logits."""
    real = model_module.process_mtp_loss
    model_module.process_mtp_loss = partial(head_mtp_loss, head_loss)
    try:
        yield
    finally:
        model_module.process_mtp_loss = real
