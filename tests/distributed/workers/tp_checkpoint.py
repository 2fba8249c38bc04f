"""Save a VQOutputLayer with megatron dist_checkpointing at one TP size, load it at another.

Run: torchrun --nproc_per_node=N tp_checkpoint.py {save|load} DIR
The layer is a two-level head (refine_rank 3), so every kind of tensor is in the checkpoint: the replicated
codebook and P, the vocab-sharded map, bias and U.
'save' trains nothing but moves every tensor off its init (codebook, bias, map, U, P), records the loss and
the map; 'load' builds a layer from a different seed and map strategy, loads, and must reproduce both.
Padded vocab differs per TP size (rounded up to 8·T) to exercise the shape-mismatch path.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from vq_megatron.config import VQLogitsConfig
from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel
from vq_megatron.layers import VQOutputLayer

V, K, D = 103, 9, 16
PREFIX = "output_layer."


def build(seed, map_init, device):
    T = ps.get_tensor_model_parallel_world_size()
    cfg = VQLogitsConfig(vocab_size=V, hidden_size=D, codebook_size=K, per_token_bias=True, seed=seed,
                         map_init=map_init, refine_rank=3)
    return VQOutputLayer(cfg, padded_vocab_size=-(-V // (8 * T)) * 8 * T, device=device)


def fixed_batch(device):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, 2, D, generator=gen).to(device), torch.randint(0, V, (6, 2), generator=gen).to(device)


def main():
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    init_parallel(tensor_parallel=int(os.environ["WORLD_SIZE"]))
    device = local_device()
    hidden, labels = fixed_batch(device)
    if mode == "save":
        layer = build(seed=5, map_init="random", device=device)
        gen = torch.Generator().manual_seed(4)
        full_bias = torch.randn(layer.padded_vocab_size, generator=gen)
        full_refine = torch.randn(layer.padded_vocab_size, 3, generator=gen)
        with torch.no_grad():
            layer.codebook.copy_(torch.randn(K, D, generator=gen))
            layer.bias.copy_(full_bias[layer.vocab_start: layer.vocab_end])
            layer.refine_weight.copy_(full_refine[layer.vocab_start: layer.vocab_end])
            layer.refine_proj.copy_(torch.randn(3, D, generator=gen))
        layer.set_map(torch.randint(0, K, (V,), generator=gen))
        ckpt = out_dir / "ckpt"
        if dist.get_rank() == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(layer.sharded_state_dict(prefix=PREFIX), str(ckpt))
        loss = float(layer.loss(hidden, labels, reduction="mean"))
        if dist.get_rank() == 0:
            (out_dir / "expected.json").write_text(json.dumps(
                {"loss": loss, "map": layer.global_token_to_code.tolist()}))
    else:
        layer = build(seed=99, map_init="contiguous", device=device)
        loaded = dist_checkpointing.load(layer.sharded_state_dict(prefix=PREFIX), str(out_dir / "ckpt"))
        layer.load_state_dict({k[len(PREFIX):]: v for k, v in loaded.items()})
        expected = json.loads((out_dir / "expected.json").read_text())
        assert layer.global_token_to_code.tolist() == expected["map"], "map differs after load"
        local_ids = torch.arange(layer.vocab_start, layer.vocab_end, device=device)
        assert bool((layer.token_to_code[local_ids >= V] == -1).all()), "padded map slots must stay -1"
        loss = float(layer.loss(hidden, labels, reduction="mean"))
        assert abs(loss - expected["loss"]) <= 1e-6 * abs(expected["loss"]), (loss, expected["loss"])
        if dist.get_rank() == 0:
            print(f"tp_checkpoint: loaded at TP={ps.get_tensor_model_parallel_world_size()}, "
                  f"loss {loss:.7f} == saved {expected['loss']:.7f}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
