"""TP=N VQOutputLayer vs a single-process fp64 reference (plain torch on materialised logits).

Run: torchrun --nproc_per_node=N tests/distributed/workers/tp_layer_checks.py
Every rank checks its own shard / replica; any mismatch raises and fails the launch.
"""

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as mcore_vocab_parallel_ce

from vq_megatron.config import VQLogitsConfig
from vq_megatron.functional import vq_logits
from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel
from vq_megatron.layers import VQOutputLayer

IGNORE = -100


def assert_close(actual, expected, what, case, rtol=1e-5, atol=1e-5):
    expected = expected.to(actual.device, actual.dtype)
    scale = max(1.0, float(expected.abs().max()))
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol * scale):
        diff = float((actual - expected).abs().max())
        raise AssertionError(f"[tp rank {ps.get_tensor_model_parallel_rank()}] {what} mismatch in {case}: "
                             f"max abs diff {diff:.3e}")


def assert_identical_across_tp(tensor, what, case):
    group = ps.get_tensor_model_parallel_group()
    copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(copies, tensor.contiguous(), group=group)
    for other in copies:
        if not torch.equal(other, tensor):
            raise AssertionError(f"{what} differs across TP ranks in {case}")


def reference(h, codebook, full_map, full_bias, labels, weights, eps, zl):
    """fp64 F.cross_entropy over the materialised N×V logits: loss, logits and gradients."""
    h = h.detach().double().requires_grad_()
    C = codebook.detach().double().requires_grad_()
    b = None if full_bias is None else full_bias.detach().double().requires_grad_()
    logits = vq_logits(h, C, full_map, b)
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                              label_smoothing=eps, reduction="none")
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]), -1)
    per_tok = (per_tok + zl * lse.square() * (labels.reshape(-1) != IGNORE)).view(labels.shape)
    (per_tok * weights).sum().backward()
    return per_tok.detach(), logits.detach(), h.grad, C.grad, None if b is None else b.grad


def run_case(V, K, bias, sp, eps, zl, empty, device):
    T, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    s, b, d = 8, 3, 16
    case = f"V={V} K={K} bias={bias} sp={sp} eps={eps} zl={zl} empty={empty} T={T}"
    gen = torch.Generator().manual_seed(V * 1009 + K * 31 + empty)
    cfg = VQLogitsConfig(vocab_size=V, hidden_size=d, codebook_size=K, per_token_bias=bias, seed=11,
                         codebook_init_std=0.5, label_smoothing=eps, z_loss=zl)
    layer = VQOutputLayer(cfg, sequence_parallel=sp, device=device)
    full_map = torch.randint(0, K - empty, (V,), generator=gen)
    full_map[: min(V, K - empty)] = torch.arange(min(V, K - empty))
    layer.set_map(full_map)
    full_bias = torch.randn(V, generator=gen) if bias else None
    if bias:
        padded = torch.zeros(layer.padded_vocab_size)
        padded[:V] = full_bias
        layer.bias.data.copy_(padded[layer.vocab_start: layer.vocab_end])
    h_full = torch.randn(s, b, d, generator=gen)
    labels = torch.randint(0, V, (s, b), generator=gen)
    labels[1::3, 0] = IGNORE
    weights = torch.rand(s, b, generator=gen)
    ref_loss, ref_logits, ref_dh, ref_dC, ref_db = reference(h_full, layer.codebook, full_map, full_bias,
                                                             labels, weights, eps, zl)
    rows = slice(rank * s // T, (rank + 1) * s // T) if sp else slice(None)

    def local_hidden():
        return h_full[rows].clone().to(device).requires_grad_()

    for path in ("collapsed", "materialized"):
        layer.zero_grad(set_to_none=True)
        h = local_hidden()
        fn = layer.loss if path == "collapsed" else layer.materialized_loss
        loss = fn(h, labels.to(device))
        (loss * weights.to(device)).sum().backward()
        where = f"{case} path={path}"
        assert_close(loss, ref_loss, "per-token loss", where)
        assert_identical_across_tp(loss.detach(), "per-token loss", where)
        assert_close(h.grad, ref_dh[rows], "hidden grad", where)
        assert_close(layer.codebook.grad, ref_dC, "codebook grad", where)
        assert_identical_across_tp(layer.codebook.grad, "codebook grad", where)
        if bias:
            padded_db = torch.zeros(layer.padded_vocab_size, dtype=ref_db.dtype)
            padded_db[:V] = ref_db
            assert_close(layer.bias.grad, padded_db[layer.vocab_start: layer.vocab_end], "bias grad", where)

    with torch.no_grad():
        gathered, none_bias = layer(local_hidden(), runtime_gather_output=True)
        assert none_bias is None and gathered.shape == (s, b, layer.padded_vocab_size)
        assert_close(gathered[..., :V], ref_logits, "gathered logits", case)
        assert bool(torch.isneginf(gathered[..., V:]).all()), "padded logits must be -inf"
        if eps == 0 and zl == 0:
            # Oracle: megatron-core's own vocab-parallel CE on our logit shards == the collapsed loss.
            shard, _ = layer(local_hidden())
            safe = torch.where(labels == IGNORE, 0, labels).to(device)
            oracle = mcore_vocab_parallel_ce(shard.clone(), safe)
            collapsed = layer.loss(local_hidden(), safe)
            assert_close(collapsed, oracle, "collapsed vs megatron vocab_parallel_cross_entropy", case)
    return case


def main():
    init_parallel(tensor_parallel=dist.get_world_size() if dist.is_initialized() else int(
        __import__("os").environ["WORLD_SIZE"]))
    device = local_device()
    grid = itertools.product((103, 64), (1, 9, "V"), (False, True), (False, True),
                             ((0.0, 0.0), (0.1, 1e-3)), (0, 3))
    done = 0
    for V, K, bias, sp, (eps, zl), empty in grid:
        K = V if K == "V" else K
        if empty and K - empty < 1:
            continue
        run_case(V, K, bias, sp, eps, zl, empty, device)
        done += 1
    if dist.get_rank() == 0:
        print(f"tp_layer_checks: {done} cases passed at TP={ps.get_tensor_model_parallel_world_size()}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
