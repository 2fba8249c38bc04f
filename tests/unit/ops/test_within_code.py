"""The within-code refinement's pieces (ops/within_code.py) against plain torch."""

import pytest
import torch

from vq_megatron.ops import CodeMembers, refined_logits, segment_logsumexp, target_code_pairs, within_code_logsumexp
from vq_megatron.ops.clusters import code_log_mass
from tensor_probe import LargestOutput


def test_pairs_list_every_member_of_each_target_code():
    m = torch.tensor([2, 0, 2, 1, 2, -1, 0])           # slot 5 is padding: in no code
    members = CodeMembers.build(m, 4)
    assert members.offsets.tolist() == [0, 2, 3, 6, 6]
    assert members.tokens.tolist() == [1, 6, 3, 0, 2, 4]
    rows, tokens = target_code_pairs(members, torch.tensor([2, 3, 0]), torch.tensor([True, True, False]))
    assert rows.tolist() == [0, 0, 0]                    # code 3 is empty, row 2 is ignored
    assert tokens.tolist() == [0, 2, 4]


def reference_lse(g, U, b, m, target_code, valid):
    out = torch.full((g.shape[0],), float("-inf"), dtype=torch.float64)
    for n in range(g.shape[0]):
        members = m == target_code[n]
        if valid[n] and members.any():
            s = U[members].double() @ g[n].double() + (0 if b is None else b[members].double())
            out[n] = torch.logsumexp(s, 0)
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_within_code_logsumexp_values_and_gradients(bias):
    gen = torch.Generator().manual_seed(0)
    V, K, r, N = 41, 6, 3, 17
    m = torch.randint(0, K - 1, (V,), generator=gen)      # code K-1 stays empty
    m[:3] = -1                                           # padded slots
    g = torch.randn(N, r, generator=gen, dtype=torch.float64, requires_grad=True)
    U = torch.randn(V, r, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    target_code = torch.randint(0, K, (N,), generator=gen)
    valid = torch.rand(N, generator=gen) > 0.2
    got = within_code_logsumexp(g, U, b, CodeMembers.build(m, K), target_code, valid)
    ref = reference_lse(g, U, b, m, target_code, valid)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-12, atol=1e-12)
    inputs = [t for t in (g, U, b) if t is not None]
    weights = torch.rand(N, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((got[finite] * weights[finite]).sum(), inputs)
    ref_grads = torch.autograd.grad((ref[finite] * weights[finite]).sum(), inputs)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    members = CodeMembers.build(m, K)
    assert torch.autograd.gradcheck(
        lambda g_, U_: within_code_logsumexp(g_, U_, None, members, target_code, valid)[finite],
        (g.detach().requires_grad_(), U.detach().requires_grad_()))


def test_within_code_logsumexp_in_low_precision_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(1)
    m = torch.randint(0, 5, (64,), generator=gen)
    g = torch.randn(9, 4, generator=gen)
    U = torch.randn(64, 4, generator=gen)
    target = torch.randint(0, 5, (9,), generator=gen)
    valid = torch.ones(9, dtype=torch.bool)
    got = within_code_logsumexp(g.bfloat16(), U.bfloat16(), None, CodeMembers.build(m, 5), target, valid)
    assert got.dtype == torch.float32
    ref = reference_lse(g.bfloat16().float(), U.bfloat16().float(), None, m, target, valid)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)


def test_refined_logits_are_vq_logits_at_zero_refinement_and_normalised_otherwise():
    gen = torch.Generator().manual_seed(2)
    V, K = 30, 4
    m = torch.arange(V) % K
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    z = torch.randn(5, K, generator=gen, dtype=torch.float64)
    B = code_log_mass(m, K, b)
    zero_scores = b.expand(5, V)
    logits = refined_logits(z, m, B, segment_logsumexp(zero_scores, m, K), zero_scores)
    torch.testing.assert_close(logits, z[:, m] + b, rtol=0, atol=1e-12)       # U = 0: exactly z_k + b_v
    scores = b + torch.randn(5, V, generator=gen, dtype=torch.float64)
    logits = refined_logits(z, m, B, segment_logsumexp(scores, m, K), scores)
    # the log-partition over V equals logsumexp_k(z_k + B_k): the refinement moves mass only inside codes
    torch.testing.assert_close(torch.logsumexp(logits, -1), torch.logsumexp(z + B, -1), rtol=0, atol=1e-12)
    code_mass = torch.zeros(5, K, dtype=torch.float64).index_add_(1, m, torch.softmax(logits, -1))
    torch.testing.assert_close(code_mass, torch.softmax(z + B, -1), rtol=0, atol=1e-12)


def test_loss_pairs_never_build_n_by_v():
    """The pair list is N·|code| long: with many small codes it stays far below N×V."""
    gen = torch.Generator().manual_seed(3)
    N, V, K, r = 256, 4096, 512, 8
    m = torch.arange(V) % K
    g = torch.randn(N, r, generator=gen, requires_grad=True)
    U = torch.randn(V, r, generator=gen, requires_grad=True)
    target = torch.randint(0, K, (N,), generator=gen)
    probe = LargestOutput()
    with probe:
        within_code_logsumexp(g, U, None, CodeMembers.build(m, K), target, torch.ones(N, dtype=torch.bool)).sum().backward()
    assert probe.largest <= max(V * r, N * (V // K) * r) < N * V // 10
