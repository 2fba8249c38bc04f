"""TP=N exact VQ sampling (VQOutputLayer.sample) vs the single-process sampler and the gathered logits.

Run: torchrun --nproc_per_node=N tests/distributed/workers/tp_sampling_checks.py
Checks on every rank (any mismatch raises and fails the launch):
  (i)   sampled token ids are identical on all TP ranks, and equal to the single-process draw made with
        the same generator seed from an index built on the full map / bias;
  (ii)  the filtered distribution from the TP-built index equals the single-process one;
  (iii) greedy ids equal argmax of the gathered materialised logits (also with sequence parallelism);
  (iv)  the cached index is reused while map and bias are unchanged and rebuilt on every rank when one
        rank's bias shard changes;
  (v)   a two-level head (refine_rank > 0): draws identical on all ranks and equal to the single-process
        two-level sampler on the full tensors (code-then-token path and filtered path), greedy == argmax of
        the gathered logits.
"""

import itertools
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from vq_megatron.config import VQLogitsConfig
from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel
from vq_megatron.layers import VQOutputLayer
from vq_megatron.ops.sampling import CodeIndex, refined_sample, vq_filtered_probs, vq_sample
from vq_megatron.ops.scatter import code_logits

V, D, K = 103, 16, 9


def assert_identical_across_tp(tensor, what):
    group = ps.get_tensor_model_parallel_group()
    copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, tensor.contiguous(), group=group)
    for rank, other in enumerate(copies):
        if not torch.equal(other, tensor):
            raise AssertionError(f"{what} differs between TP rank {ps.get_tensor_model_parallel_rank()} "
                                 f"and TP rank {rank}")


def pad_rows(full, layer):
    padded = full.new_zeros((layer.padded_vocab_size, *full.shape[1:]))
    padded[: full.shape[0]] = full
    return padded[layer.vocab_start: layer.vocab_end]


def make_layer(device, full_bias, sequence_parallel=False, full_refine=None):
    cfg = VQLogitsConfig(vocab_size=V, hidden_size=D, codebook_size=K, per_token_bias=True, seed=5,
                         codebook_init_std=0.5, refine_rank=0 if full_refine is None else full_refine.shape[1])
    layer = VQOutputLayer(cfg, sequence_parallel=sequence_parallel, device=device)
    layer.bias.data.copy_(pad_rows(full_bias, layer))
    if full_refine is not None:
        layer.refine_weight.data.copy_(pad_rows(full_refine, layer).to(device))
        layer.refine_proj.data.mul_(4.0)
    return layer


def check_two_level(device, full_bias, hidden, gen):
    full_refine = torch.randn(V, 3, generator=gen)
    layer = make_layer(device, full_bias, full_refine=full_refine)
    full_map = layer.global_token_to_code
    index = CodeIndex.build(full_map, K, full_bias.to(device))
    z = code_logits(hidden, layer.codebook.detach())
    g = hidden @ layer.refine_proj.detach().t()
    for seed, (temp, k, p) in enumerate(((1.0, 0, 1.0), (0.7, 5, 0.9))):
        tokens = layer.sample(hidden, temperature=temp, top_k=k, top_p=p, generator=generator(device, seed))
        expected = refined_sample(z, g, full_map, full_bias.to(device), full_refine.to(device), index,
                                  temperature=temp, top_k=k, top_p=p, generator=generator(device, seed))
        assert_identical_across_tp(tokens, f"two-level ids T={temp} top_k={k} top_p={p}")
        assert torch.equal(tokens, expected), (temp, k, p)
    with torch.no_grad():
        logits, _ = layer(hidden, runtime_gather_output=True)
    assert torch.equal(layer.sample(hidden, greedy=True), logits[..., :V].argmax(-1)), "two-level greedy"


def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def main():
    init_parallel(tensor_parallel=int(os.environ["WORLD_SIZE"]))
    device = local_device()
    T, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(7)
    full_bias = torch.randn(V, generator=gen)
    hidden = torch.randn(8, 2, D, generator=gen).to(device)
    layer = make_layer(device, full_bias)
    assert layer.tp.size == T > 1

    full_map = layer.global_token_to_code
    ref_index = CodeIndex.build(full_map, K, full_bias.to(device))
    tp_index = layer.code_index()
    for name in ("tokens", "offsets", "bias64"):
        assert torch.equal(getattr(tp_index, name), getattr(ref_index, name)), f"index {name} differs"
        assert_identical_across_tp(getattr(tp_index, name), f"index {name}")
    z = code_logits(hidden, layer.codebook.detach())                       # [8, 2, K], as rank 0 computes it

    # (ii) the exact filtered distribution
    grid = list(itertools.product((0.5, 1.0, 2.0), (0, 1, 4, 30), (1.0, 0.9, 0.3)))
    for row, (temp, k, p) in itertools.product(z.reshape(-1, K)[:6], grid):
        tok, prob = vq_filtered_probs(row, tp_index, temp, k, p)
        ref_tok, ref_prob = vq_filtered_probs(row, ref_index, temp, k, p)
        assert torch.equal(tok, ref_tok) and torch.allclose(prob, ref_prob, rtol=0, atol=1e-12), (temp, k, p)
        assert bool((full_map[tok] >= 0).all()) and bool((tok < V).all())

    # (i) sampled ids: identical on every TP rank and equal to the single-process draw
    draws = 0
    for temp, k, p in grid:
        tokens = layer.sample(hidden, temperature=temp, top_k=k, top_p=p,
                                           generator=generator(device, 11 + draws))
        expected = vq_sample(z, ref_index, temperature=temp, top_k=k, top_p=p,
                             generator=generator(device, 11 + draws))
        assert tokens.shape == (8, 2) and tokens.dtype == torch.int64
        assert_identical_across_tp(tokens, f"sampled ids T={temp} top_k={k} top_p={p}")
        assert torch.equal(tokens, expected), (temp, k, p)
        draws += 1

    # (iii) greedy == argmax of the gathered materialised logits, with and without sequence parallelism
    with torch.no_grad():
        logits, _ = layer(hidden, runtime_gather_output=True)
    argmax = logits[..., :V].argmax(-1)
    greedy = layer.sample(hidden, greedy=True)
    assert torch.equal(greedy, argmax), "greedy != argmax of the gathered logits"
    assert torch.equal(layer.sample(hidden, temperature=0.0), argmax)
    assert_identical_across_tp(greedy, "greedy ids")
    sp_layer = make_layer(device, full_bias, sequence_parallel=True)
    chunk = hidden.shape[0] // T
    sp_greedy = sp_layer.sample(hidden[rank * chunk:(rank + 1) * chunk], greedy=True)
    assert torch.equal(sp_greedy, argmax), "sequence-parallel greedy != argmax of the gathered logits"

    # (iv) cache: reused while unchanged; a change on ONE rank's shard rebuilds the index on all ranks
    assert layer.code_index() is tp_index
    if rank == T - 1:
        layer.bias.data[0] += 5.0
    rebuilt = layer.code_index()
    assert rebuilt is not tp_index
    assert_identical_across_tp(rebuilt.tokens, "rebuilt index tokens")
    with torch.no_grad():
        logits, _ = layer(hidden, runtime_gather_output=True)
    assert torch.equal(layer.sample(hidden, greedy=True), logits[..., :V].argmax(-1))

    check_two_level(device, full_bias, hidden, gen)

    if dist.get_rank() == 0:
        print(f"tp_sampling: ok at TP={T} ({len(grid) * 6} distributions, {draws} draws, greedy, SP, cache, two-level head)")
    shutdown_parallel()


if __name__ == "__main__":
    main()
