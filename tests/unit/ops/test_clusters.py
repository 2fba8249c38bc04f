"""Per-code statistics (ops/clusters.py) against plain torch loops."""

import torch

from vq_megatron.ops import CodeMembers, code_counts, code_log_mass, segment_logsumexp


def test_counts_and_log_mass_skip_padding_and_mark_empty_codes():
    m = torch.tensor([0, 2, 2, -1, 0, 2])
    assert code_counts(m, 4).tolist() == [2, 0, 3, 0]
    mass = code_log_mass(m, 4)
    assert torch.isneginf(mass[[1, 3]]).all()
    torch.testing.assert_close(mass[[0, 2]], torch.log(torch.tensor([2.0, 3.0])).double())


def test_segment_logsumexp_batched_equals_per_row_loops():
    gen = torch.Generator().manual_seed(0)
    m = torch.tensor([1, 1, 0, -1, 3, 1, 0])
    values = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64) * 30      # large: needs the max shift
    got = segment_logsumexp(values, m, 5)
    assert got.shape == (2, 3, 5)
    for k in range(5):
        members = m == k
        if members.any():
            torch.testing.assert_close(got[..., k], torch.logsumexp(values[..., members], -1))
        else:
            assert torch.isneginf(got[..., k]).all()
    torch.testing.assert_close(segment_logsumexp(values[0, 0], m, 5), got[0, 0])   # 1-D as before


def test_code_members_is_the_csr_of_the_map():
    m = torch.tensor([3, 0, 3, -1, 1, 3])
    members = CodeMembers.build(m, 5)
    assert members.counts.tolist() == [1, 1, 0, 3, 0]
    for k in range(5):
        got = members.tokens[members.offsets[k]: members.offsets[k + 1]].tolist()
        assert got == torch.nonzero(m == k).squeeze(1).tolist()
