"""TP=N VQOutputLayer vs a single-process fp64 reference (plain torch on materialised logits).

Run: torchrun --nproc_per_node=N tests/distributed/workers/tp_layer_checks.py
Every rank checks its own shard / replica; any mismatch raises and fails the launch.
VQ_CHECK_DTYPE=bf16 runs the layer in bfloat16 (on GPUs: launch/gpu_check.sh) against the same fp64
reference, with bf16 tolerances.
"""

import dataclasses
import itertools
import os

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
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("VQ_CHECK_DTYPE", "fp32")]
TOLERANCE = 1e-5 if DTYPE == torch.float32 else 6e-2   # bf16 keeps 8 bits of mantissa


def as_dtype(t: torch.Tensor) -> torch.Tensor:
    """Inputs rounded to the layer's dtype, so the fp64 reference sees the very values the layer holds."""
    return t.to(DTYPE).float()


def assert_close(actual, expected, what, case, rtol=TOLERANCE, atol=TOLERANCE):
    actual, expected = actual.float(), expected.to(actual.device, torch.float32)
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


def two_level_logits(h, C, full_map, b, U, P):
    """Independent fp64 construction of the two-level head's logits, code by code:
    log p(v|h) = log softmax_k(z + B)_k + log softmax over the code's tokens of (b + u·P h), plus lse(z + B)."""
    V, K = full_map.shape[0], C.shape[0]
    b = torch.zeros(V, dtype=h.dtype) if b is None else b
    scores = b + (h @ P.t()) @ U.t()
    within = torch.zeros_like(scores)
    B = []
    for k in range(K):
        members = full_map == k
        B.append(torch.logsumexp(b[members], 0) if members.any() else torch.tensor(float("-inf"), dtype=h.dtype))
        if members.any():
            within[..., members] = torch.log_softmax(scores[..., members], -1)
    code_logits = h @ C.t() + torch.stack(B)
    return code_logits[..., full_map] + within


def reference(h, codebook, full_map, full_bias, labels, weights, eps, zl, refine=None):
    """fp64 F.cross_entropy over the materialised N×V logits: loss, logits and gradients."""
    h = h.detach().double().requires_grad_()
    C = codebook.detach().double().requires_grad_()
    b = None if full_bias is None else full_bias.detach().double().requires_grad_()
    U = P = None
    if refine is None:
        logits = vq_logits(h, C, full_map, b)
    else:
        U, P = (t.detach().double().requires_grad_() for t in refine)
        logits = two_level_logits(h, C, full_map, b, U, P)
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                              label_smoothing=eps, reduction="none")
    lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]), -1)
    per_tok = (per_tok + zl * lse.square() * (labels.reshape(-1) != IGNORE)).view(labels.shape)
    (per_tok * weights).sum().backward()
    grads = [h.grad, C.grad, None if b is None else b.grad]
    if refine is not None:
        grads += [U.grad, P.grad]
    return per_tok.detach(), logits.detach(), *grads


def pad_rows(full, layer):
    """A [V, ...] tensor padded to V_pad rows (zeros) and cut to this rank's vocabulary range."""
    padded = full.new_zeros((layer.padded_vocab_size, *full.shape[1:]))
    padded[: full.shape[0]] = full
    return padded[layer.vocab_start: layer.vocab_end]


def run_case(V, K, bias, sp, eps, zl, empty, device, refine_rank=0):
    T, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    s, b, d = 8, 3, 16
    case = f"V={V} K={K} bias={bias} sp={sp} eps={eps} zl={zl} empty={empty} r={refine_rank} T={T}"
    gen = torch.Generator().manual_seed(V * 1009 + K * 31 + empty)
    cfg = VQLogitsConfig(vocab_size=V, hidden_size=d, codebook_size=K, per_token_bias=bias, seed=11,
                         codebook_init_std=0.5, label_smoothing=eps, z_loss=zl, refine_rank=refine_rank)
    layer = VQOutputLayer(cfg, sequence_parallel=sp, device=device, params_dtype=DTYPE)
    full_map = torch.randint(0, K - empty, (V,), generator=gen)
    full_map[: min(V, K - empty)] = torch.arange(min(V, K - empty))
    layer.set_map(full_map)
    full_bias = as_dtype(torch.randn(V, generator=gen)) if bias else None
    if bias:
        layer.bias.data.copy_(pad_rows(full_bias, layer))
    refine = None
    if refine_rank:
        refine = (as_dtype(torch.randn(V, refine_rank, generator=gen)), as_dtype(layer.refine_proj.detach().cpu().float() * 4))
        layer.refine_weight.data.copy_(pad_rows(refine[0], layer))
        layer.refine_proj.data.copy_(refine[1])
    h_full = as_dtype(torch.randn(s, b, d, generator=gen))
    labels = torch.randint(0, V, (s, b), generator=gen)
    labels[1::3, 0] = IGNORE
    weights = torch.rand(s, b, generator=gen)
    ref_loss, ref_logits, ref_dh, ref_dC, ref_db, *ref_refine = reference(
        h_full, layer.codebook, full_map, full_bias, labels, weights, eps, zl, refine)
    rows = slice(rank * s // T, (rank + 1) * s // T) if sp else slice(None)

    def local_hidden():
        return h_full[rows].clone().to(device, DTYPE).requires_grad_()

    # The collapsed loss both ways: split by tokens over TP (the default) and replicated on every rank.
    for path in ("collapsed-split", "collapsed-replicated", "materialised"):
        layer.zero_grad(set_to_none=True)
        h = local_hidden()
        if path.startswith("collapsed"):
            layer.config = dataclasses.replace(layer.config, tensor_parallel_loss=path.split("-")[1])
        fn = layer.loss if path.startswith("collapsed") else layer.materialised_loss
        loss = fn(h, labels.to(device))
        (loss * weights.to(device)).sum().backward()
        where = f"{case} path={path}"
        assert_close(loss, ref_loss, "per-token loss", where)
        assert_identical_across_tp(loss.detach(), "per-token loss", where)
        assert_close(h.grad, ref_dh[rows], "hidden grad", where)
        assert_close(layer.codebook.grad, ref_dC, "codebook grad", where)
        assert_identical_across_tp(layer.codebook.grad, "codebook grad", where)
        if bias:
            assert_close(layer.bias.grad, pad_rows(ref_db, layer), "bias grad", where)
        if refine_rank:
            assert_close(layer.refine_weight.grad, pad_rows(ref_refine[0], layer), "refine_weight grad", where)
            assert_close(layer.refine_proj.grad, ref_refine[1], "refine_proj grad", where)
            assert_identical_across_tp(layer.refine_proj.grad, "refine_proj grad", where)

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


def check_log_probs_and_entropy(device) -> int:
    """layer.log_probs / layer.entropy under TP vs the single-process functional API on the full fp64 tensors
    (which the unit tests check against the materialised distribution), values and hidden/codebook grads."""
    from vq_megatron.functional import vq_entropy, vq_log_probs

    T, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    s, b, d, V, K = 8, 3, 16, 103, 9
    cases = 0
    for bias, sp, r in itertools.product((False, True), (False, True), (0, 3)):
        gen = torch.Generator().manual_seed(17 + 2 * r + bias)
        cfg = VQLogitsConfig(vocab_size=V, hidden_size=d, codebook_size=K, per_token_bias=bias, seed=3,
                             codebook_init_std=0.5, refine_rank=r)
        layer = VQOutputLayer(cfg, sequence_parallel=sp, device=device)
        full_map = torch.randint(0, K - 1, (V,), generator=gen)                  # code K-1 stays empty
        full_map[: K - 1] = torch.arange(K - 1)
        layer.set_map(full_map)
        full_bias = torch.randn(V, generator=gen) if bias else None
        if bias:
            layer.bias.data.copy_(pad_rows(full_bias, layer))
        U = torch.randn(V, r, generator=gen) if r else None
        if r:
            layer.refine_weight.data.copy_(pad_rows(U, layer))
            layer.refine_proj.data.mul_(4.0)
        h_full = torch.randn(s, b, d, generator=gen)
        tokens = torch.randint(0, V, (s, b), generator=gen)
        ref_h = h_full.double().requires_grad_()
        ref_C = layer.codebook.detach().cpu().double().requires_grad_()
        refine = {} if not r else dict(refine_weight=U.double(), refine_proj=layer.refine_proj.detach().cpu().double())
        ref_bias = None if full_bias is None else full_bias.double().requires_grad_()
        ref_ent = vq_entropy(ref_h, ref_C, full_map, ref_bias, **refine)
        ref_lp = vq_log_probs(ref_h.detach(), ref_C.detach(), full_map, tokens,
                              None if ref_bias is None else ref_bias.detach(), **refine)
        (ref_ent.sum()).backward()
        rows = slice(rank * s // T, (rank + 1) * s // T) if sp else slice(None)
        h = h_full[rows].clone().to(device).requires_grad_()
        case = f"entropy/log_probs bias={bias} sp={sp} r={r} T={T}"
        ent = layer.entropy(h)
        ent.sum().backward()
        assert_close(ent, ref_ent, "entropy", case)
        assert_identical_across_tp(ent.detach(), "entropy", case)
        assert_close(h.grad, ref_h.grad[rows], "entropy hidden grad", case)
        assert_close(layer.codebook.grad, ref_C.grad, "entropy codebook grad", case)
        if bias:
            assert_close(layer.bias.grad, pad_rows(ref_bias.grad, layer), "entropy bias grad", case)
        with torch.no_grad():
            assert_close(layer.log_probs(h_full[rows].to(device), tokens.to(device)), ref_lp, "log_probs", case)
        cases += 1
    return cases


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
    # The two-level head (refine_rank > 0): label smoothing is rejected there, z-loss is defined.
    refined = 0
    for K, bias, sp, zl, empty in itertools.product((1, 9, 103), (False, True), (False, True), (0.0, 1e-3), (0, 3)):
        if empty and K - empty < 1:
            continue
        run_case(103, K, bias, sp, 0.0, zl, empty, device, refine_rank=3)
        refined += 1
    scores = check_log_probs_and_entropy(device)
    if dist.get_rank() == 0:
        T = ps.get_tensor_model_parallel_world_size()
        print(f"tp_layer_checks: {done} cases passed at TP={T}")
        print(f"tp_layer_checks: {refined} two-level cases passed at TP={T}")
        print(f"tp_layer_checks: {scores} log-prob/entropy cases passed at TP={T}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
