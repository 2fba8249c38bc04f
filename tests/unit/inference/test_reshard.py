"""Resharding a checkpoint's TP shards to another TP size by the tensors' partition tags (no process group:
the shards are built by hand as a TP=2 run with V=300 writes them, V_pad 512, and loaded at TP=1, V_pad 384)."""

import pytest
import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.inference.loading import reshard_state_dict
from vq_megatron.integration.checkpoint import CheckpointError
from vq_megatron.layers import VQOutputLayer
from vq_megatron.parallel import mark_vocab_sharded

V = 300


class TinyModel(torch.nn.Module):
    def __init__(self, padded: int):
        super().__init__()
        self.embedding = torch.nn.Linear(4, padded, bias=False)           # a vocab-parallel [V_pad, d] weight
        mark_vocab_sharded(self.embedding.weight)
        self.norm = torch.nn.LayerNorm(4)                                  # replicated
        self.output_layer = VQOutputLayer(VQLogitsConfig(vocab_size=V, hidden_size=4, codebook_size=7,
                                                         per_token_bias=True, refine_rank=2),
                                          padded_vocab_size=padded)


def shard(full: torch.Tensor, pad_to: int, fill, parts: int) -> list[torch.Tensor]:
    padded = full.new_full((pad_to, *full.shape[1:]), fill)
    padded[: full.shape[0]] = full
    return list(padded.chunk(parts))


def test_vocab_sharded_tensors_are_concatenated_repadded_and_resplit():
    gen = torch.Generator().manual_seed(0)
    full = {"embedding.weight": torch.randn(V, 4, generator=gen),
            "output_layer.token_to_code": torch.randint(0, 7, (V,), generator=gen),
            "output_layer.bias": torch.randn(V, generator=gen),
            "output_layer.refine_weight": torch.randn(V, 2, generator=gen)}
    replicated = {"norm.weight": torch.rand(4, generator=gen), "norm.bias": torch.rand(4, generator=gen),
                  "output_layer.codebook": torch.randn(7, 4, generator=gen),
                  "output_layer.refine_proj": torch.randn(2, 4, generator=gen)}
    shards = [dict(replicated) for _ in range(2)]
    for name, tensor in full.items():
        fill = -1 if name.endswith("token_to_code") else 0
        for rank, piece in enumerate(shard(tensor, 512, fill, 2)):
            shards[rank][name] = piece
    target = TinyModel(padded=384)
    state = reshard_state_dict(shards, target, tp_rank=0, tp_size=1)
    target.load_state_dict(state)
    for name, tensor in full.items():
        got = state[name]
        assert got.shape[0] == 384, name
        assert torch.equal(got[:V], tensor), name
        fill = -1 if name.endswith("token_to_code") else 0
        assert bool((got[V:] == fill).all()), name
    for name, tensor in replicated.items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(target.output_layer.global_token_to_code, full["output_layer.token_to_code"])


def test_a_missing_entry_names_it():
    target = TinyModel(padded=384)
    state = {k: v for k, v in target.state_dict().items() if k != "norm.bias"}
    with pytest.raises(CheckpointError, match="norm.bias"):
        reshard_state_dict([state], target, tp_rank=0, tp_size=1)
