"""Incremental decoding with megatron-core's static KV cache, for dense and VQ heads, at any TP size.

The body runs once over the prompt (prefill) and then one token per step, reading the keys and values of
earlier positions from megatron-core's StaticInferenceContext instead of re-reading the whole window. The
hidden state of the last position goes to the head: a VQ head samples exactly without the V logits
(VQOutputLayer.sample), a dense head gathers its vocab-parallel logits and samples them with the same rules
(ops/sampling/dense.py). Learned absolute positions end at the model's seq_length: when the cache is full,
decoding restarts from the last seq_length // 2 tokens (one prefill), so long continuations keep going.
"""

from __future__ import annotations

import torch

from vq_megatron.ops.sampling import sample_from_logits

__all__ = ["KVCacheDecoder", "generate_batch"]


def _hidden(model, ids: torch.Tensor, positions: torch.Tensor, mask, context):
    from vq_megatron.models.hybrid import final_hidden_states

    return final_hidden_states(model, ids, positions, mask, inference_context=context)


class KVCacheDecoder:
    """Prefill once, then one position per step; `max_batch_size` rows at most (the cache is allocated for it)."""

    def __init__(self, model, *, max_batch_size: int, max_sequence_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.max_batch_size, self.max_sequence_length = model, max_batch_size, max_sequence_length
        self.context = StaticInferenceContext(max_batch_size=max_batch_size, max_sequence_length=max_sequence_length)

    @property
    def position(self) -> int:
        """How many positions the cache holds."""
        return self.context.sequence_len_offset

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start over with ids [b, t]: the last position's hidden state [b, d]."""
        b, t = ids.shape
        if b > self.max_batch_size:
            raise ValueError(f"decode batch of {b} rows exceeds max_batch_size={self.max_batch_size} "
                             "(--max-batch-size): the KV cache is allocated for that many")
        if t > self.max_sequence_length:
            raise ValueError(f"{t} prompt tokens exceed the model's seq_length={self.max_sequence_length}")
        self.context.reset()
        self.context.key_value_memory_dict.clear()
        positions = torch.arange(t, device=ids.device).expand(b, t)
        mask = torch.triu(torch.ones(1, 1, t, t, dtype=torch.bool, device=ids.device), 1)
        hidden = _hidden(self.model, ids, positions, mask, self.context)
        self.context.sequence_len_offset = t
        self.context.enable_decode_mode()
        return hidden[-1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """One more position, ids [b]: its hidden state [b, d]."""
        positions = torch.full((ids.shape[0], 1), self.position, device=ids.device, dtype=torch.int64)
        hidden = _hidden(self.model, ids.unsqueeze(1), positions, None, self.context)
        self.context.sequence_len_offset += 1
        return hidden[-1]


def _next_tokens(model, hidden: torch.Tensor, vocab_size: int, options: dict) -> torch.Tensor:
    from vq_megatron.layers import VQOutputLayer
    from vq_megatron.parallel import broadcast_from_first_rank, tensor_parallel_info

    head = model.output_layer
    if isinstance(head, VQOutputLayer):
        return head.sample(hidden, **options)
    logits, _ = head(hidden.unsqueeze(0), runtime_gather_output=True)         # [1, b, V_pad]
    tokens = sample_from_logits(logits[0, :, :vocab_size], **options)
    return broadcast_from_first_rank(tokens.contiguous(), tensor_parallel_info().group)


@torch.no_grad()
def generate_batch(model, prompts: torch.Tensor, *, max_new_tokens: int, seq_length: int, vocab_size: int,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                   generator: torch.Generator | None = None, max_batch_size: int | None = None,
                   eod_id: int | None = None) -> torch.Tensor:
    """Continue prompts [b, p] (token ids, one length) by max_new_tokens: [b, p + new] (fewer when every row
    reached eod_id). Collective under TP: every rank passes the same prompts and gets the same ids."""
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, greedy=greedy)
    decoder = KVCacheDecoder(model, max_batch_size=max_batch_size or prompts.shape[0],
                             max_sequence_length=seq_length)
    ids = prompts
    hidden = decoder.prefill(ids[:, -seq_length:])
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        token = _next_tokens(model, hidden, vocab_size, options)
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
        if eod_id is not None:
            done |= token == eod_id
            if bool(done.all()):
                break
        if decoder.position == seq_length:          # positions end here: restart from the recent half
            hidden = decoder.prefill(ids[:, -(seq_length // 2):])
        else:
            hidden = decoder.step(token)
    return ids
