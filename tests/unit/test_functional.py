"""vq_cross_entropy (collapsed) vs plain torch cross-entropy on materialised vq_logits."""

import pytest
import torch
import torch.nn.functional as F

from vq_megatron.functional import vq_cross_entropy, vq_entropy, vq_log_probs, vq_log_softmax, vq_logits
from vq_megatron.ops import code_logits, scatter_code_logits
from tensor_probe import LargestOutput

IGNORE = -100


def reference_loss(h, C, m, y, b=None, eps=0.0, zl=0.0, reduction="mean"):
    """Independent reference: F.cross_entropy over the scattered N×V logits (+ z-loss)."""
    logits = vq_logits(h, C, m, b).reshape(-1, m.numel())
    y = y.reshape(-1)
    per_tok = F.cross_entropy(logits, y, ignore_index=IGNORE, label_smoothing=eps, reduction="none")
    if zl:
        lse = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1).to(per_tok.dtype)
        per_tok = per_tok + zl * lse.square() * (y != IGNORE)
    if reduction == "none":
        return per_tok
    if reduction == "sum":
        return per_tok.sum()
    return per_tok.sum() / (y != IGNORE).sum()


def make_inputs(shape, d, V, K, dtype, bias, empty_codes=0, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g).to(dtype).requires_grad_()
    C = (0.5 * torch.randn(K, d, generator=g)).to(dtype).requires_grad_()
    # Leave the last `empty_codes` codes without tokens.
    m = torch.randint(0, K - empty_codes, (V,), generator=g)
    m[: K - empty_codes] = torch.arange(K - empty_codes)[: min(V, K - empty_codes)]
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        y.view(-1)[1::ignore_every] = IGNORE  # keep position 0 a real target
    return h, C, m, b, y


def grads(loss, tensors):
    return torch.autograd.grad(loss.sum(), [t for t in tensors if t is not None])


CASES = [
    # (leading shape, d, V, K, empty codes)
    ((37,), 16, 101, 13, 0),
    ((5, 7), 8, 64, 64, 0),        # K = V
    ((3, 4, 5), 12, 50, 1, 0),     # K = 1, 3-D leading shape
    ((29,), 10, 97, 17, 5),        # empty codes
    ((1,), 4, 3, 2, 0),            # tiny
]


@pytest.mark.parametrize("shape,d,V,K,empty", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps,zl", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.3, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp64(shape, d, V, K, empty, bias, eps, zl, reduction):
    h, C, m, b, y = make_inputs(shape, d, V, K, torch.float64, bias, empty)
    ref = reference_loss(h, C, m, y, b, eps, zl, reduction)
    out = vq_cross_entropy(h, C, m, y, b, label_smoothing=eps, z_loss=zl, reduction=reduction)
    if reduction == "none":
        assert out.shape == y.shape
        out = out.reshape(-1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for go, gr in zip(grads(out, [h, C, b]), grads(ref, [h, C, b])):
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_fp32(bias):
    h, C, m, b, y = make_inputs((4, 33), 24, 211, 31, torch.float32, bias, empty_codes=3)
    ref = reference_loss(h, C, m, y, b, 0.1, 1e-3)
    out = vq_cross_entropy(h, C, m, y, b, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for go, gr in zip(grads(out, [h, C, b]), grads(ref, [h, C, b])):
        torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_within_dtype_tolerance_of_fp32(bias):
    """bf16 inputs: the collapsed loss accumulates in fp32, so it stays close to the fp32 answer."""
    h, C, m, b, y = make_inputs((64,), 32, 300, 40, torch.bfloat16, bias)
    out = vq_cross_entropy(h, C, m, y, b, label_smoothing=0.1)
    out_grads = grads(out, [h, C, b])
    h32, C32 = h.detach().float().requires_grad_(), C.detach().float().requires_grad_()
    b32 = None if b is None else b.detach().float().requires_grad_()
    ref = reference_loss(h32, C32, m, y, b32, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for go, gr in zip(out_grads, grads(ref, [h32, C32, b32])):
        assert go.dtype == torch.bfloat16
        # bf16 has an 8-bit mantissa: relative error ~2^-8 per element after the final cast.
        torch.testing.assert_close(go.float(), gr, rtol=2e-2, atol=1e-2 * gr.abs().max().item())


def test_gradcheck_double():
    h, C, m, b, y = make_inputs((6,), 5, 19, 4, torch.float64, True, empty_codes=1)

    def f(h, C, b):
        return vq_cross_entropy(h, C, m, y, b, label_smoothing=0.2, z_loss=0.05, reduction="none")

    assert torch.autograd.gradcheck(f, (h, C, b))


def test_all_targets_ignored_matches_torch():
    h, C, m, b, y = make_inputs((8,), 4, 20, 5, torch.float64, False, ignore_every=0)
    y[:] = IGNORE
    assert torch.isnan(vq_cross_entropy(h, C, m, y)) and torch.isnan(reference_loss(h, C, m, y))
    assert vq_cross_entropy(h, C, m, y, reduction="sum").item() == 0.0


def test_second_backward_with_retained_graph_is_unchanged():
    h, C, m, b, y = make_inputs((16,), 8, 40, 6, torch.float64, True)
    loss = vq_cross_entropy(h, C, m, y, b, label_smoothing=0.1)
    first = torch.autograd.grad(loss, [h, C, b], retain_graph=True)
    second = torch.autograd.grad(loss, [h, C, b])
    for a, c in zip(first, second):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_never_materialises_n_by_v(bias):
    """Every tensor produced in forward AND backward is O(N·K + V), far below N×V."""
    N, d, V, K = 256, 16, 4096, 8
    h, C, m, b, y = make_inputs((N,), d, V, K, torch.float32, bias)
    probe = LargestOutput()
    with probe:
        loss = vq_cross_entropy(h, C, m, y, b, label_smoothing=0.1, z_loss=1e-4)
        loss.backward()
    assert probe.largest <= max(N * max(K, d), V) < N * V // 10
    with probe:  # and the probe really sees the materialised path
        vq_logits(h, C, m, b)
    assert probe.largest >= N * V


def test_invalid_inputs_raise_clear_errors():
    h, C, m, b, y = make_inputs((8,), 4, 20, 5, torch.float32, True)
    with pytest.raises(ValueError, match="labels must be token ids in"):
        vq_cross_entropy(h, C, m, torch.full((8,), 20))
    with pytest.raises(ValueError, match="labels must be token ids in"):
        vq_cross_entropy(h, C, m, torch.full((8,), -3))
    bad_map = m.clone()
    bad_map[3] = 5
    with pytest.raises(ValueError, match="outside"):
        vq_cross_entropy(h, C, bad_map, y)
    with pytest.raises(ValueError, match="hidden size"):
        vq_cross_entropy(h[:, :3], C, m, y)
    with pytest.raises(ValueError, match="labels shape"):
        vq_cross_entropy(h, C, m, y[:4])
    with pytest.raises(ValueError, match="bias shape"):
        vq_cross_entropy(h, C, m, y, b[:5])
    with pytest.raises(ValueError, match="reduction"):
        vq_cross_entropy(h, C, m, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        vq_cross_entropy(h, C, m, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="1-D integer"):
        vq_cross_entropy(h, C, m.float(), y)


def test_padded_map_entries_get_no_mass():
    """Map entries < 0 (padded vocab slots, the TP layer's convention) scatter to -inf logits."""
    h = torch.randn(3, 4)
    C = torch.randn(2, 4)
    m = torch.tensor([0, 1, 1, -1, -1])
    logits = scatter_code_logits(code_logits(h, C), m)
    assert torch.isinf(logits[:, 3:]).all() and (logits[:, 3:] < 0).all()
    torch.testing.assert_close(torch.softmax(logits, -1)[:, :3].sum(-1), torch.ones(3))


def test_public_api_rejects_padded_map_entries():
    """One rule for the public functional API: every map entry is a code in [0, K) (padding is the TP
    layer's business), in vq_logits as in vq_cross_entropy."""
    h, C, y = torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 2])
    m = torch.tensor([0, 1, 1, -1, -1])
    with pytest.raises(ValueError, match="outside"):
        vq_logits(h, C, m)
    with pytest.raises(ValueError, match="outside"):
        vq_cross_entropy(h, C, m, y)


# ------------------------------------------------------------------ the two-level head (refine_weight/proj)
def two_level_log_probs(h, C, m, b, U, P):
    """Independent reference: the full normalised log p(v|h) [N, V] built code by code from its definition,
    log softmax_k(z + B)_{M(v)} + log softmax over the tokens of code M(v) of (b + u·P h)_v."""
    h2 = h.reshape(-1, h.shape[-1])
    V, K = m.shape[0], C.shape[0]
    b = torch.zeros(V, dtype=h.dtype) if b is None else b
    scores = b + (h2 @ P.t()) @ U.t()
    within = torch.zeros_like(scores)
    B = []
    for k in range(K):
        members = m == k
        B.append(torch.logsumexp(b[members], 0) if members.any() else torch.tensor(float("-inf"), dtype=h.dtype))
        if members.any():
            within[:, members] = torch.log_softmax(scores[:, members], -1)
    return torch.log_softmax(h2 @ C.t() + torch.stack(B), -1)[:, m] + within


def refined_reference(h, C, m, y, b, U, P, zl=0.0, reduction="mean"):
    logp = two_level_log_probs(h, C, m, b, U, P)
    flat = y.reshape(-1)
    per_tok = F.nll_loss(logp, flat, ignore_index=IGNORE, reduction="none")
    if zl:
        V, K = m.shape[0], C.shape[0]
        bb = torch.zeros(V, dtype=h.dtype) if b is None else b
        B = torch.stack([torch.logsumexp(bb[m == k], 0) if (m == k).any() else torch.tensor(float("-inf"), dtype=h.dtype)
                         for k in range(K)])
        lse = torch.logsumexp(h.reshape(-1, h.shape[-1]).to(torch.promote_types(h.dtype, torch.float32)) @ C.t().to(
            torch.promote_types(h.dtype, torch.float32)) + B, -1).to(per_tok.dtype)
        per_tok = per_tok + zl * lse.square() * (flat != IGNORE)
    if reduction == "none":
        return per_tok
    return per_tok.sum() if reduction == "sum" else per_tok.sum() / (flat != IGNORE).sum()


def refine_factors(V, d, r, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, r, generator=g).to(dtype).requires_grad_(),
            (0.5 * torch.randn(r, d, generator=g)).to(dtype).requires_grad_())


@pytest.mark.parametrize("shape,d,V,K,empty", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("zl", [0.0, 1e-2])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_refined_matches_the_independent_reference_fp64(shape, d, V, K, empty, bias, zl, reduction):
    h, C, m, b, y = make_inputs(shape, d, V, K, torch.float64, bias, empty)
    U, P = refine_factors(V, d, 3, torch.float64)
    ref = refined_reference(h, C, m, y, b, U, P, zl, reduction)
    out = vq_cross_entropy(h, C, m, y, b, U, P, z_loss=zl, reduction=reduction)
    if reduction == "none":
        assert out.shape == y.shape
        out = out.reshape(-1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for go, gr in zip(grads(out, [h, C, b, U, P]), grads(ref, [h, C, b, U, P])):
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bias", [False, True])
def test_refined_vq_log_softmax_is_the_normalised_two_level_distribution(bias):
    h, C, m, b, y = make_inputs((4, 9), 12, 97, 11, torch.float64, bias, empty_codes=2)
    U, P = refine_factors(97, 12, 4, torch.float64)
    logp = vq_log_softmax(h, C, m, b, U, P)
    assert logp.shape == (4, 9, 97)
    torch.testing.assert_close(logp.reshape(-1, 97), two_level_log_probs(h, C, m, b, U, P), rtol=0, atol=1e-12)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 9, dtype=torch.float64))
    # without a refinement it is log_softmax of the VQ-Logits logits
    torch.testing.assert_close(vq_log_softmax(h, C, m, b), torch.log_softmax(vq_logits(h, C, m, b), -1))


@pytest.mark.parametrize("bias", [False, True])
def test_refined_fp32_and_bf16(bias):
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-5)), (torch.bfloat16, dict(rtol=0, atol=0.08))):
        h, C, m, b, y = make_inputs((3, 21), 24, 211, 31, dtype, bias, empty_codes=3)
        U, P = refine_factors(211, 24, 8, dtype)
        out = vq_cross_entropy(h, C, m, y, b, U, P)
        up = [t.detach().double().requires_grad_() if t is not None else None for t in (h, C, b, U, P)]
        ref = refined_reference(up[0], up[1], m, y, up[2], up[3], up[4])
        torch.testing.assert_close(out.double(), ref, **tol)
        if dtype == torch.float32:
            for go, gr in zip(grads(out, [h, C, b, U, P]), grads(ref, [t for t in up if t is not None])):
                torch.testing.assert_close(go.double(), gr, rtol=1e-4, atol=1e-5)


def test_zero_refinement_is_exactly_vq_logits_in_values_and_gradients():
    h, C, m, b, y = make_inputs((5, 7), 16, 120, 13, torch.float64, True, empty_codes=2)
    U = torch.zeros(120, 4, dtype=torch.float64, requires_grad=True)
    _, P = refine_factors(120, 16, 4, torch.float64)
    refined = vq_cross_entropy(h, C, m, y, b, U, P)
    plain = vq_cross_entropy(h, C, m, y, b)
    torch.testing.assert_close(refined, plain, rtol=1e-14, atol=1e-14)
    for go, gr in zip(grads(refined, [h, C, b]), grads(plain, [h, C, b])):
        torch.testing.assert_close(go, gr, rtol=1e-12, atol=1e-14)


def test_refined_loss_never_materialises_n_by_v():
    N, d, V, K = 256, 16, 4096, 256
    h, C, m, b, y = make_inputs((N,), d, V, K, torch.float32, True)
    U, P = refine_factors(V, d, 8, torch.float32)
    probe = LargestOutput()
    with probe:
        vq_cross_entropy(h, C, m, y, b, U, P, z_loss=1e-4).backward()
    # [N, K] code logits, [V, r] refinement, [pairs ≈ N·V/K, r] gathered operands: all far below N×V
    assert probe.largest <= max(N * K, V * 8, 2 * N * (V // K) * 8) < N * V // 10


def test_refined_inputs_are_checked():
    h, C, m, b, y = make_inputs((8,), 4, 20, 5, torch.float32, True)
    U, P = refine_factors(20, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="together or not at all"):
        vq_cross_entropy(h, C, m, y, refine_weight=U)
    with pytest.raises(ValueError, match=r"refine_weight must be \[V=20, r\]"):
        vq_cross_entropy(h, C, m, y, refine_weight=U[:5], refine_proj=P)
    with pytest.raises(ValueError, match=r"refine_proj must be \[r=2, d=4\]"):
        vq_cross_entropy(h, C, m, y, refine_weight=U, refine_proj=P[:, :3])
    with pytest.raises(ValueError, match="label_smoothing=0.1 cannot be combined"):
        vq_cross_entropy(h, C, m, y, refine_weight=U, refine_proj=P, label_smoothing=0.1)


# ------------------------------------------------------------------ log-probs and entropy (RL / evaluation)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [0, 3])
def test_log_probs_and_entropy_equal_the_materialised_distribution(bias, rank):
    h, C, m, b, y = make_inputs((4, 9), 12, 97, 11, torch.float64, bias, empty_codes=2, ignore_every=0)
    U, P = refine_factors(97, 12, rank, torch.float64) if rank else (None, None)
    if rank:
        logp = two_level_log_probs(h, C, m, b, U, P).view(4, 9, 97)
    else:
        logp = torch.log_softmax(vq_logits(h, C, m, b), -1)
    ref_entropy = -(logp.exp() * logp).sum(-1)
    got = vq_entropy(h, C, m, b, U, P, max_entries=97 * 5)          # several row chunks
    torch.testing.assert_close(got, ref_entropy, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (h, C, b, U, P) if t is not None]
    for go, gr in zip(grads(got, inputs), grads(ref_entropy, inputs)):
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-10)
    lp = vq_log_probs(h, C, m, y, b, U, P)
    torch.testing.assert_close(lp, logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), rtol=1e-10, atol=1e-10)


def test_entropy_never_materialises_n_by_v_for_vq_logits():
    N, d, V, K = 256, 16, 4096, 8
    h, C, m, b, _ = make_inputs((N,), d, V, K, torch.float32, True)
    probe = LargestOutput()
    with probe:
        vq_entropy(h, C, m, b).sum().backward()
    assert probe.largest <= max(N * max(K, d), V) < N * V // 10
