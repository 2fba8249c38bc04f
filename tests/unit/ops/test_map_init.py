"""Tests for vq_megatron.ops.map_init."""

import pytest
import torch

from vq_megatron.checks import check_map
from vq_megatron.ops import code_counts
from vq_megatron.ops.map_init import (
    MAP_INIT_STRATEGIES,
    build_map,
    contiguous_map,
    frequency_balanced_map,
    kmeans_map,
    nearest_code_map,
    normal_codebook,
    random_balanced_map,
)


def zipf_counts(vocab_size, exponent=1.0, scale=1e7):
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    counts = (scale / ranks.pow(exponent)).round().to(torch.int64)
    # Scatter ranks over token ids so "sorted by count" is not "sorted by id".
    return counts[torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))]


def assert_balanced_sizes(token_to_code, vocab_size, num_codes):
    sizes = code_counts(token_to_code, num_codes)
    assert set(sizes.tolist()) <= {vocab_size // num_codes, -(-vocab_size // num_codes)}
    assert int(sizes.sum()) == vocab_size


def assert_valid_map(token_to_code, vocab_size, num_codes):
    assert token_to_code.dtype == torch.int64 and token_to_code.shape == (vocab_size,)
    assert int(token_to_code.min()) >= 0 and int(token_to_code.max()) < num_codes


@pytest.mark.parametrize(("vocab_size", "num_codes"), [(1000, 64), (1000, 1), (1000, 1000), (7, 3)])
def test_random_map_is_balanced(vocab_size, num_codes):
    token_to_code = random_balanced_map(vocab_size, num_codes, seed=0)
    assert_valid_map(token_to_code, vocab_size, num_codes)
    assert_balanced_sizes(token_to_code, vocab_size, num_codes)


def test_random_map_deterministic_and_seed_sensitive():
    assert torch.equal(random_balanced_map(500, 16, seed=1), random_balanced_map(500, 16, seed=1))
    assert not torch.equal(random_balanced_map(500, 16, seed=1), random_balanced_map(500, 16, seed=2))


@pytest.mark.parametrize(("vocab_size", "num_codes"), [(1000, 64), (1000, 1), (1000, 1000), (10, 4)])
def test_contiguous_map_blocks(vocab_size, num_codes):
    token_to_code = contiguous_map(vocab_size, num_codes)
    assert_valid_map(token_to_code, vocab_size, num_codes)
    assert_balanced_sizes(token_to_code, vocab_size, num_codes)
    steps = token_to_code.diff()
    assert bool(((steps == 0) | (steps == 1)).all())  # monotone, every code used
    assert torch.equal(contiguous_map(vocab_size, num_codes), token_to_code)


def test_contiguous_map_small_example():
    assert contiguous_map(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_frequency_map_balances_total_frequency():
    vocab_size, num_codes = 5000, 64
    counts = zipf_counts(vocab_size)
    token_to_code = frequency_balanced_map(counts, num_codes)
    assert_valid_map(token_to_code, vocab_size, num_codes)
    totals = torch.zeros(num_codes, dtype=torch.int64).index_add_(0, token_to_code, counts)
    # LPT guarantee: spread is at most the largest single count.
    assert int(totals.max() - totals.min()) <= int(counts.max())
    random_totals = torch.zeros(num_codes, dtype=torch.int64).index_add_(
        0, random_balanced_map(vocab_size, num_codes), counts
    )
    assert int(totals.max() - totals.min()) < int(random_totals.max() - random_totals.min())
    assert torch.equal(frequency_balanced_map(counts, num_codes), token_to_code)


def test_frequency_map_total_ratio_on_flat_zipf():
    # Zipf-Mandelbrot (offset 500): the largest count p is small next to the mean total,
    # and LPT gives min >= max - p with max >= mean, so max/min <= mean / (mean - p) < 1.1.
    vocab_size, num_codes = 5000, 64
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    counts = (1e9 / (ranks + 500)).round().to(torch.int64)
    token_to_code = frequency_balanced_map(counts, num_codes)
    totals = torch.zeros(num_codes, dtype=torch.int64).index_add_(0, token_to_code, counts)
    largest, mean = float(counts.max()), float(counts.sum()) / num_codes
    ratio = float(totals.max()) / float(totals.min())
    assert ratio <= mean / (mean - largest) < 1.1


def test_frequency_map_lpt_small_example():
    # Sorted desc: 10(t1), 7(t3), 5(t0), 5(t4), 2(t2) -> codes 0,1,1,0,1 under LPT.
    counts = torch.tensor([5, 10, 2, 7, 5])
    assert frequency_balanced_map(counts, 2).tolist() == [1, 0, 1, 1, 0]


def test_frequency_map_no_empty_code_with_zero_counts():
    counts = torch.zeros(100, dtype=torch.int64)
    counts[3] = 1000
    token_to_code = frequency_balanced_map(counts, 10)
    assert int(code_counts(token_to_code, 10).min()) >= 1
    assert (token_to_code == token_to_code[3]).sum() == 1  # the heavy token sits alone


def test_frequency_map_float_counts_and_errors():
    token_to_code = frequency_balanced_map(torch.tensor([0.5, 3.0, 1.5, 2.0]), 2)
    assert_valid_map(token_to_code, 4, 2)
    with pytest.raises(ValueError, match="non-negative"):
        frequency_balanced_map(torch.tensor([1, -1, 2]), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        frequency_balanced_map(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        frequency_balanced_map(torch.ones(2, 2), 1)


def test_kmeans_map_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=g) * 10
    truth = torch.arange(8).repeat_interleave(40)
    embeddings = centres[truth] + 0.1 * torch.randn(len(truth), 16, generator=g)
    token_to_code, centroids = kmeans_map(embeddings, 8)
    assert_valid_map(token_to_code, len(truth), 8)
    assert centroids.shape == (8, 16)
    # Tokens of one blob share a code and blobs do not share codes.
    pairs = set(zip(truth.tolist(), token_to_code.tolist()))
    assert len(pairs) == 8 and len({code for _, code in pairs}) == 8
    assert torch.equal(nearest_code_map(embeddings, centroids), token_to_code)


@pytest.mark.parametrize("spherical", [False, True])
def test_nearest_code_map_matches_brute_force(spherical):
    g = torch.Generator().manual_seed(0)
    embeddings, codebook = torch.randn(300, 8, generator=g), torch.randn(20, 8, generator=g)
    token_to_code = nearest_code_map(embeddings, codebook, spherical=spherical)
    if spherical:
        unit = torch.nn.functional.normalize
        expected = torch.cdist(unit(embeddings, dim=1), unit(codebook, dim=1)).argmin(1)
    else:
        expected = torch.cdist(embeddings, codebook).argmin(1)
    assert torch.equal(token_to_code, expected)


def test_normal_codebook():
    codebook = normal_codebook(256, 64, std=0.02, seed=0, dtype=torch.bfloat16)
    assert codebook.shape == (256, 64) and codebook.dtype == torch.bfloat16
    assert float(codebook.float().std()) == pytest.approx(0.02, rel=0.05)
    assert torch.equal(normal_codebook(4, 3, seed=1), normal_codebook(4, 3, seed=1))
    assert not torch.equal(normal_codebook(4, 3, seed=1), normal_codebook(4, 3, seed=2))


def test_code_counts():
    assert code_counts(torch.tensor([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        check_map(torch.tensor([0, 2]), 2)


@pytest.mark.parametrize("strategy", MAP_INIT_STRATEGIES)
def test_build_map_dispatches(strategy):
    vocab_size, num_codes = 200, 16
    embeddings = torch.randn(vocab_size, 8, generator=torch.Generator().manual_seed(0))
    token_to_code, centroids = build_map(
        strategy, vocab_size, num_codes, token_counts=zipf_counts(vocab_size), embeddings=embeddings
    )
    assert_valid_map(token_to_code, vocab_size, num_codes)
    assert int(code_counts(token_to_code, num_codes).min()) >= 1
    assert (centroids is not None) == (strategy == "kmeans")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(strategy="hash"), "valid strategies: random, contiguous, frequency, kmeans"),
        (dict(strategy="frequency"), "requires token_counts"),
        (dict(strategy="kmeans"), "requires embeddings"),
        (dict(strategy="frequency", token_counts=torch.ones(9)), r"token_counts must have shape \[10\]"),
        (dict(strategy="kmeans", embeddings=torch.ones(9, 4)), r"embeddings must have shape \[10, d\]"),
        (dict(strategy="random", num_codes=0), "num_codes must be in"),
        (dict(strategy="random", num_codes=11), "num_codes must be in"),
    ],
)
def test_build_map_errors(kwargs, match):
    kwargs = {"vocab_size": 10, "num_codes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_map(**kwargs)
