"""Sampling from a VQOutputLayer under tensor parallelism: the layer's `code_index()` and `sample()`.

The sampler needs the whole vocabulary on one rank: the replicated map, and the vocab-sharded bias (and the
refinement U of a two-level head) all-gathered once. `SamplingTables` caches them with the CodeIndex built
from them, reused while the map and this rank's shards are unchanged (exact comparison with cached copies,
O(V) per call); the "stale" flag is all-reduced (MAX) over TP so every rank takes the same branch of the
collective. TP rank 0 draws, and the ids are broadcast so every rank returns the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vq_megatron.ops import code_logits
from vq_megatron.ops.sampling import CodeIndex, refined_sample, vq_greedy, vq_sample
from vq_megatron.checks import check_sampling_args
from vq_megatron.parallel import all_gather_rows, broadcast_from_first_rank

__all__ = ["SamplingTables", "sampling_tables", "sample_tokens"]


@dataclass(frozen=True)
class SamplingTables:
    """What the sampler reads, for the whole vocabulary V, and the copies that tell when it is stale."""

    index: CodeIndex
    full_map: torch.Tensor
    full_bias: torch.Tensor | None
    full_refine_weight: torch.Tensor | None
    sources: tuple      # (map, bias shard, refine shard) as they were when the tables were built

    def matches(self, sources: tuple) -> bool:
        return all(_same(a, b) for a, b in zip(self.sources, sources))


def _same(cached: torch.Tensor | None, current: torch.Tensor | None) -> bool:
    if cached is None or current is None:
        return cached is None and current is None
    return cached.device == current.device and cached.shape == current.shape and torch.equal(cached, current)


@torch.no_grad()
def sampling_tables(layer) -> SamplingTables:
    """The layer's cached SamplingTables, rebuilt on every TP rank when any rank's map or shard changed."""
    tp = layer.tp
    sources = (layer.global_token_to_code,
               None if layer.bias is None else layer.bias.detach(),
               None if layer.refine_weight is None else layer.refine_weight.detach())
    cached = layer.sampling_cache
    stale = cached is None or not cached.matches(sources)
    if tp.size > 1:
        flag = torch.tensor([int(stale)], dtype=torch.int64, device=sources[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=tp.group)
        stale = bool(flag.item())
    if stale:
        full = [None if shard is None else all_gather_rows(shard, tp.group)[: layer.vocab_size]
                for shard in sources[1:]]
        index = CodeIndex.build(layer.global_token_to_code, layer.num_codes, full[0])
        layer.sampling_cache = SamplingTables(index=index, full_map=layer.global_token_to_code, full_bias=full[0],
                                              full_refine_weight=full[1],
                                              sources=tuple(None if s is None else s.clone() for s in sources))
    return layer.sampling_cache


@torch.no_grad()
def sample_tokens(layer, hidden: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """Token ids [...] from hidden [..., d] (identical on every TP rank; with sequence parallelism the local
    chunk [s/T, ...], gathered here). Only rank 0's generator advances. Collective over TP."""
    check_sampling_args(temperature, top_k, top_p)
    tp = layer.tp
    if layer.sequence_parallel and tp.size > 1:
        hidden = all_gather_rows(hidden.detach(), tp.group)
    tables = sampling_tables(layer)
    greedy = greedy or temperature == 0.0
    if tp.rank == 0:
        hidden = hidden.detach()
        z = code_logits(hidden, layer.codebook.detach())
        if layer.refine_weight is not None:
            g = torch.matmul(hidden, layer.refine_proj.detach().t())
            tokens = refined_sample(z, g, tables.full_map, tables.full_bias, tables.full_refine_weight, tables.index,
                                    temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                    greedy=greedy)
        elif greedy:
            tokens = vq_greedy(z, tables.index)
        else:
            tokens = vq_sample(z, tables.index, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
    else:
        tokens = torch.empty(hidden.shape[:-1], dtype=torch.int64, device=hidden.device)
    return broadcast_from_first_rank(tokens.contiguous(), tp.group)
