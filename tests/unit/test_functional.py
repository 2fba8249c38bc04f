"""vq_cross_entropy (collapsed) vs plain torch cross-entropy on materialised vq_logits."""

import pytest
import torch
import torch.nn.functional as F

from vq_megatron.functional import vq_cross_entropy, vq_logits
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
